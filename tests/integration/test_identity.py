"""Identity on the real stack: one person across partitions and workers, roles in ClickHouse, erasure."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from kafka.partitioner import murmur2

from pipeline.adapters.clickhouse_queries import ConsoleQueries
from pipeline.adapters.identity_log import changelog_topic
from pipeline.adapters.kafka import TouchpointEncoder, TouchpointPublisher
from pipeline.contract.registry import open_registry
from pipeline.core.identity import audit_id_of, person_id_of
from pipeline.settings import to_env
from tests.factories import identity_config, task, touchpoint
from tests.integration.conftest import wait_until

DAY_MS = 86_400_000


def _partition(key: str, partitions: int) -> int:
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions  # kafka-python's default partitioner


def _ready(worker: object) -> bool:
    return "Worker ready" in worker.log_path.read_text()  # type: ignore[attr-defined]


def test_a_link_across_partitions_resolves_on_both_workers(isolated, publisher, start_worker, ch):
    partitions = isolated.kafka.partitions
    persons = []
    for i in range(200):  # pairs whose anonymous and user ids land on different partitions
        anonymous, user = f"dev-{i}", f"u-{i}"
        if _partition(f"anonymous_id:{anonymous}", partitions) != _partition(f"user_id:{user}", partitions):
            persons.append((anonymous, user))
        if len(persons) == 20:
            break
    first, second = start_worker(), start_worker()
    wait_until(lambda: _ready(first) and _ready(second), 60, "both workers ready", first)
    time.sleep(3)  # the group settles after the second member joins
    now = int(time.time() * 1000) - 60_000
    publisher.publish_many([touchpoint(f"visit-{u}", now, anonymous_id=a) for a, u in persons]
                           + [touchpoint(f"login-{u}", now + 1_000, event_type="identify", anonymous_id=a, user_id=u)
                              for a, u in persons])
    publisher.flush()
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints FINAL")[0][0] == 40, 60, "the first rows", first)
    time.sleep(2)  # the identity log reaches the other worker (it polls it between fetches)
    publisher.publish_many([touchpoint(f"again-{u}", now + 2_000, channel="MOBILE_APP", event_type="screen_view",
                                       anonymous_id=a) for a, u in persons])
    publisher.flush()
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints FINAL")[0][0] == 60, 60, "the later rows", first)
    assert first.process.poll() is None and second.process.poll() is None
    expected = {f"again-{u}": person_id_of(f"user_id:{u}") for _, u in persons}
    later = dict(ch.execute("SELECT event_id, person_id FROM touchpoints FINAL WHERE event_id LIKE 'again-%'"))
    assert later == expected
    roles = {r for (r,) in ch.execute("SELECT DISTINCT toString(role) FROM touchpoints FINAL WHERE "
                                      "event_id LIKE 'again-%'")}
    assert roles == {"user"}
    # Visits written before the login belong to the same person once aliases apply (late identify).
    per_person = ch.execute("SELECT current_person_id, count() FROM touchpoints_by_person GROUP BY current_person_id")
    assert dict(per_person) == {person_id_of(f"user_id:{u}"): 3 for _, u in persons}
    assert ch.execute("SELECT count() FROM persons")[0][0] == 20


def test_journey_visitor_signs_up_buys_buys_again_and_lapses(isolated, publisher, start_worker, ch):
    isolated.identity.habitual_days = 1
    isolated.identity.lapse_days = 2
    worker = start_worker(isolated)
    t0 = int(time.time() * 1000) - 5 * DAY_MS
    steps = [
        ("prospect", touchpoint("j1", t0, event_type="page_view", anonymous_id="cookie-j")),
        ("user", touchpoint("j2", t0 + 60_000, event_type="identify", anonymous_id="cookie-j", user_id="u-j")),
        ("customer", touchpoint("j3", t0 + 3_600_000, channel="BILLING", event_type="purchase", anonymous_id=None,
                                user_id="u-j", customer_id="c-j")),
        ("habitual_customer", touchpoint("j4", t0 + 7_200_000, channel="STORE", event_type="purchase",
                                         anonymous_id=None, customer_id="c-j")),
        ("former_customer", touchpoint("j5", t0 + 4 * DAY_MS, event_type="page_view", anonymous_id="cookie-j")),
    ]
    for count, (_, event) in enumerate(steps, start=1):  # one step after another, as a journey happens
        publisher.publish_many([event])
        publisher.flush()
        wait_until(lambda n=count: ch.execute("SELECT count() FROM touchpoints")[0][0] >= n, 60, event["event_id"],
                   worker)
        time.sleep(0.5)
    stored = ch.execute("SELECT event_id, toString(role), is_customer, is_user, purchase_count, person_id "
                        "FROM touchpoints FINAL ORDER BY event_time_ms")
    assert [row[1] for row in stored] == [role for role, _ in steps]
    assert [row[4] for row in stored] == [0, 0, 1, 2, 2]
    assert [(row[2], row[3]) for row in stored] == [(0, 0), (0, 1), (1, 1), (1, 1), (0, 1)]
    person = person_id_of("customer_id:c-j")
    assert {row[5] for row in stored[2:]} == {person}
    assert ch.execute("SELECT DISTINCT current_person_id FROM touchpoints_by_person") == [(person,)]
    transitions = ch.execute("SELECT at_ms - %(t0)s, from_role, to_role, cause FROM role_transitions FINAL "
                             "WHERE person_id = %(p)s ORDER BY at_ms", {"t0": t0, "p": person})
    assert transitions == [
        (60_000, "prospect", "user", "first_use"),
        (3_600_000, "user", "customer", "purchase"),
        (7_200_000, "customer", "habitual_customer", "repeat_purchase"),
        (3_600_000 + DAY_MS, "habitual_customer", "customer", "habit_lapsed"),
        (7_200_000 + 2 * DAY_MS, "customer", "former_customer", "lapsed"),
    ]
    merges = ch.execute("SELECT count() FROM identity_audit FINAL WHERE action = 'merge'")[0][0]
    assert merges == 2


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_forget_erases_a_person_everywhere_and_is_idempotent(isolated, publisher, start_worker, ch, store):
    isolated.journeys.gap_s = isolated.journeys.case_gap_s = 1  # journeys close once the partitions idle
    isolated.identity.store = store
    worker = start_worker(isolated)
    now = int(time.time() * 1000) - 60_000
    publisher.publish_many([
        touchpoint("f1", now, anonymous_id="dev-forget"),
        touchpoint("f2", now + 1_000, event_type="identify", anonymous_id="dev-forget", user_id="u-forget"),
        touchpoint("f3", now + 2_000, channel="BILLING", event_type="purchase", anonymous_id=None,
                   user_id="u-forget", customer_id="c-forget"),
        touchpoint("k1", now, anonymous_id="dev-keep", user_id="u-keep"),
    ])
    publisher.flush()
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints FINAL")[0][0] == 4, 60, "rows", worker)
    keep = person_id_of("user_id:u-keep")
    wait_until(lambda: ch.execute("SELECT count() FROM person_profiles FINAL WHERE person_id != %(k)s",
                                  {"k": keep})[0][0] >= 1, 90, "journeys closed", worker)
    time.sleep(1)
    # The tables forget finds the person through hold them (kept current from touchpoints on every flush).
    assert ch.execute("SELECT count() FROM person_touchpoints FINAL WHERE person_id != %(k)s", {"k": keep}) == [(3,)]
    assert ch.execute("SELECT person_id FROM identifier_persons WHERE identifier = 'user_id:u-forget'")
    env = {**os.environ, **to_env(isolated)}
    for _ in range(2):  # the second run finds nothing left and still succeeds
        done = subprocess.run([sys.executable, "-m", "pipeline.app.cli", "forget", "u-forget"], capture_output=True,
                              text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
    time.sleep(1)
    secrets = ("dev-forget", "u-forget", "c-forget")
    for table in ("touchpoints", "person_touchpoints", "identifier_persons", "person_aliases", "role_transitions",
                  "identity_audit"):
        dump = " ".join(str(row) for row in ch.execute(f"SELECT * FROM {table}"))
        assert not any(secret in dump for secret in secrets), table
    assert ch.execute("SELECT event_id FROM touchpoints FINAL") == [("k1",)]
    for table in ("journeys", "person_profiles", "person_touchpoints", "identifier_persons"):
        assert {p for (p,) in ch.execute(f"SELECT DISTINCT person_id FROM {table}")} <= {keep}, table
    audit = ch.execute("SELECT reason FROM identity_audit WHERE action = 'erasure' ORDER BY recorded_at_ms")
    assert [reason.split(",")[0] for (reason,) in audit] == ["3 identifiers", "0 identifiers"]
    assert worker.process.poll() is None
    # The identity log as compaction will leave it (the last value per key, tombstones gone): nothing of theirs.
    kept = _compacted(_read_log(isolated, changelog_topic(isolated)))
    assert kept, "the log holds the other person"
    dump = b" ".join(kept) + b" ".join(kept.values())
    assert not any(secret.encode() in dump for secret in secrets)
    assert b"dev-keep" in dump
    shutil.rmtree(isolated.stack.state_dir / "identity" / isolated.kafka.consumer_group, ignore_errors=True)


def _read_log(settings, topic: str) -> list[tuple[bytes, bytes | None]]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        end = consumer.end_offsets([tp])[tp]
        records: list[tuple[bytes, bytes | None]] = []
        deadline = time.monotonic() + 30
        while consumer.position(tp) < end and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records += [(r.key, r.value) for r in batch]
        return records
    finally:
        consumer.close()


def _compacted(records: list[tuple[bytes, bytes | None]]) -> dict[bytes, bytes]:
    latest: dict[bytes, bytes | None] = dict(records)
    return {key: value for key, value in latest.items() if value is not None}


def test_the_broker_compacts_an_erased_identifier_out_of_the_identity_log(isolated):
    """Compaction run by the broker itself (Apache Kafka): a log topic whose segments roll after 100 ms and are
    cleaned at once, an erased person's records tombstoned as a worker does, then the log read back."""
    from pipeline.adapters.identity_log import log_records, write_operations
    from pipeline.adapters.kafka import ensure_topics
    from pipeline.core.identity import Fact, FactKind, Forget, IdentityGraph, make_link

    isolated.identity.table = "compaction"
    topic = changelog_topic(isolated)
    # segment.bytes cannot go under 1 MiB on Kafka 4: the segment rolls by time, when the next record arrives.
    ensure_topics(isolated.kafka.bootstrap_servers, {topic: 1}, config={
        "cleanup.policy": "compact", "segment.ms": "100", "min.cleanable.dirty.ratio": "0.01",
        "delete.retention.ms": "100", "min.compaction.lag.ms": "0"})
    now = int(time.time() * 1000)
    ops = [Fact("user_id:gone-u", FactKind.SEEN, now), Fact("anonymous_id:gone-d", FactKind.SEEN, now),
           make_link("user_id:gone-u", "anonymous_id:gone-d", now, "identify", "e1"),
           Fact("user_id:gone-u", FactKind.PURCHASE, now + 1)]
    ops += [Fact(f"anonymous_id:stay-{i}", FactKind.SEEN, now) for i in range(200)]
    graph = IdentityGraph(identity_config())
    graph.apply(ops)
    graph.take_changes()
    graph.forget("user_id:gone-u", now + 10)
    write_operations(isolated, [*ops, Forget("user_id:gone-u", now + 10)], "compaction-test")
    write_operations(isolated, [], "compaction-test", erased=graph.take_changes().erased)
    written = _read_log(isolated, topic)
    assert any(b"gone-" in (value or b"") for _, value in written)  # before the cleaner ran
    started = time.monotonic()
    records = written
    while any(b"gone-" in (value or b"") for _, value in records) and time.monotonic() - started < 60:
        # The active segment is never cleaned: writing the survivors again rolls it, as workers' writes would.
        time.sleep(1)
        write_operations(isolated, ops[4:10], "compaction-test")
        records = _read_log(isolated, topic)
    assert not any(b"gone-" in (value or b"") for _, value in records), f"not compacted in 60 s: {len(records)}"
    assert {key for key, _ in log_records(ops[4:])} <= {key for key, value in records if value is not None}


def test_a_persons_journey_is_read_from_the_tables_ordered_by_person(isolated, publisher, start_worker, ch):
    worker = start_worker()
    now = int(time.time() * 1000) - 60_000
    # The first visit is written under the device's person id, before the login joins it to the user.
    publisher.publish_many([touchpoint("l1", now, anonymous_id="dev-look"), touchpoint("o1", now, anonymous_id="o")])
    publisher.flush()
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints FINAL")[0][0] == 2, 60, "the visits", worker)
    publisher.publish_many([
        touchpoint("l2", now + 1_000, event_type="identify", anonymous_id="dev-look", user_id="u-look"),
        touchpoint("l3", now + 2_000, channel="MOBILE_APP", event_type="screen_view", anonymous_id=None,
                   user_id="u-look"),
    ])
    publisher.flush()
    # The view writes person_touchpoints in the same insert, just after touchpoints.
    wait_until(lambda: ch.execute("SELECT count() FROM person_touchpoints FINAL")[0][0] == 4, 60, "the login", worker)
    wait_until(lambda: ch.execute("SELECT count() FROM identity_audit")[0][0] >= 1, 60, "the merge", worker)
    person = person_id_of("user_id:u-look")
    assert dict(ch.execute("SELECT event_id, person_id FROM person_touchpoints FINAL WHERE event_id LIKE 'l%'")) == {
        "l1": person_id_of("anonymous_id:dev-look"), "l2": person, "l3": person}
    queries = ConsoleQueries(isolated.clickhouse)
    try:
        found = queries.journey(["user_id:u-look"])
        assert [t["event_id"] for t in found.touchpoints] == ["l1", "l2", "l3"]  # the alias joins l1
        assert found.identifiers == ["anonymous_id:dev-look", "user_id:u-look"]
        assert [(m["action"], m["into_person_id"]) for m in found.merges] == [("merge", person)]
        # With touchpoints emptied the journey is unchanged: it never reads that table.
        ch.execute("TRUNCATE TABLE touchpoints")
        again = queries.journey(["anonymous_id:dev-look"])
        assert [t["event_id"] for t in again.touchpoints] == ["l1", "l2", "l3"]
        assert [t["channel"] for t in again.touchpoints] == ["WEB", "WEB", "MOBILE_APP"]
    finally:
        queries.close()


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_identity_survives_a_restart(isolated, publisher, start_worker, ch, store):
    isolated.identity.store = store
    first = start_worker(isolated)
    now = int(time.time() * 1000) - 60_000
    publisher.publish_many([touchpoint("r1", now, event_type="identify", anonymous_id="dev-r", user_id="u-r")])
    publisher.flush()
    wait_until(lambda: ch.execute("SELECT count() FROM touchpoints")[0][0] == 1, 60, "the login", first)
    assert first.stop() == 0
    second = start_worker(isolated)
    publisher.publish_many([touchpoint("r2", now + 1_000, channel="MOBILE_APP", event_type="screen_view",
                                       anonymous_id="dev-r")])
    publisher.flush()
    wait_until(lambda: ch.execute("SELECT uniqExact(event_id) FROM touchpoints")[0][0] == 2, 60, "the later event",
               second)
    rows = dict(ch.execute("SELECT event_id, person_id FROM touchpoints FINAL"))
    assert rows == {"r1": person_id_of("user_id:u-r"), "r2": person_id_of("user_id:u-r")}
    assert "Identity graph ready: 2 identifiers" in second.log_path.read_text()
    assert "Identity log read from offset the start" in first.log_path.read_text()
    if store == "rocksdb://":  # the local store: only the log's tail since the first worker's last read
        read = re.search(r"Identity log read from offset (\d+) to (\d+): (\d+) operations",
                         second.log_path.read_text())
        assert read is not None and int(read.group(1)) > 0, second.log_tail()
        assert int(read.group(3)) < 3  # the first worker's own operations at most, not the whole log
    assert second.stop() == 0
    shutil.rmtree(isolated.stack.state_dir / "identity" / isolated.kafka.consumer_group, ignore_errors=True)


@pytest.mark.parametrize("email_cap", [1, 2])
def test_one_event_fuses_two_persons_with_different_email_hashes_only_if_the_cap_allows(isolated, start_worker, ch,
                                                                                        email_cap):
    isolated.identity.max_values = {"email_sha256": email_cap}
    worker = start_worker(isolated)
    v3 = TouchpointEncoder(open_registry(isolated.registry.url), isolated.registry.subject, 3)
    publisher = TouchpointPublisher(isolated.kafka.bootstrap_servers, isolated.kafka.topic, v3)
    now = int(time.time() * 1000) - 60_000
    e1, e2 = (hashlib.sha256(address.encode()).hexdigest() for address in ("one@example.com", "two@example.com"))
    try:
        publisher.publish_many([touchpoint("m1", now, identifiers={"user_id": "u-m", "email_sha256": e1}),
                                touchpoint("m2", now + 1, identifiers={"anonymous_id": "a-m", "email_sha256": e2})])
        publisher.flush()
        wait_until(lambda: ch.execute("SELECT count() FROM identity_audit")[0][0] >= 2, 60, "two merges", worker)
        publisher.publish_many([touchpoint("m3", now + 2, identifiers={"user_id": "u-m", "anonymous_id": "a-m"})])
        publisher.flush()
        wait_until(lambda: ch.execute("SELECT count() FROM identity_audit")[0][0] >= 3, 60, "the shared device",
                   worker)
    finally:
        publisher.close()
    audit = ch.execute("SELECT action, identifier_a, identifier_b, reason, event_id FROM identity_audit FINAL "
                       "WHERE event_id = 'm3'")
    # The audit row is written after the flush's touchpoints and aliases, so the persons are complete here.
    persons = dict(ch.execute("SELECT current_person_id, count() FROM touchpoints_by_person GROUP BY "
                              "current_person_id"))
    if email_cap == 1:
        assert audit == [("refuse_max_values", "anonymous_id:a-m", "user_id:u-m",
                          "the merged person would hold 2 email_sha256 (at most 1)", "m3")]
        assert persons == {person_id_of("user_id:u-m"): 2, person_id_of(f"email_sha256:{e2}"): 1}
    else:
        assert [row[0] for row in audit] == ["merge"]
        assert persons == {person_id_of("user_id:u-m"): 3}


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_an_unmerge_by_audit_id_restates_rows_and_role_split_cells(isolated, publisher, start_worker, ch, store):
    isolated.identity.store = store
    worker = start_worker(isolated)
    anon, customer = "anonymous_id:dev-un", "customer_id:c-un"
    now = int(time.time() * 1000) - 120_000
    tasks = [task(outcome, event_id=f"after-{i}", event_time=now + 2_000 + i * 3_000, anonymous_id="dev-un")
             for i, outcome in enumerate(["SUCCESS", "FAILURE", "SUCCESS", "SUCCESS"])]
    events = [
        task("FAILURE", event_id="before", event_time=now, anonymous_id="dev-un"),
        touchpoint("buy", now + 500, channel="BILLING", event_type="purchase", anonymous_id=None, customer_id="c-un"),
        touchpoint("signin", now + 1_000, event_type="identify", anonymous_id="dev-un", customer_id="c-un"),
        *tasks,
    ]
    publisher.publish_many(events)
    publisher.flush()
    customer_tasks = "SELECT sum(count) FROM indicator_cells FINAL WHERE window_kind = '1m' AND " \
                     "indicator = 'task_success_rate' AND role = %(role)s"
    wait_until(lambda: ch.execute(customer_tasks, {"role": "customer"})[0][0] == len(tasks), 60,
               "the device's tasks counted under the customer's role", worker)
    assert {p for (p,) in ch.execute("SELECT DISTINCT person_id FROM touchpoints FINAL WHERE event_id LIKE "
                                     "'after-%'")} == {person_id_of(customer)}
    merge = ch.execute("SELECT action, identifier_a, identifier_b, at_ms, event_id FROM identity_audit FINAL "
                       "WHERE action = 'merge' AND event_id = 'signin'")[0]
    audit_id = audit_id_of(*merge)
    env = {**os.environ, **to_env(isolated)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipeline.app.cli", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    listed = cli("identity", "audit", "--identifier", anon)
    assert listed.returncode == 0 and audit_id in listed.stdout, listed.stdout + listed.stderr
    refused = cli("identity", "unmerge", f"{merge[3]:x}-00000000")
    assert refused.returncode == 2 and "no identity_audit row has id" in refused.stderr
    assert "Traceback" not in refused.stderr
    done = cli("identity", "unmerge", audit_id)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1 and "published" in done.stdout

    wait_until(lambda: {p for (p,) in ch.execute("SELECT DISTINCT person_id FROM touchpoints FINAL WHERE "
                                                 "event_id LIKE 'after-%'")} == {person_id_of(anon)}, 60,
               "the device's rows restated", worker)
    rows = dict(ch.execute("SELECT event_id, (person_id, toString(role)) FROM touchpoints FINAL"))
    assert rows == {**{e["event_id"]: (person_id_of(anon), "prospect") for e in [events[0], *tasks]},
                    "buy": (person_id_of(customer), "customer"), "signin": (person_id_of(customer), "customer")}
    # Every task is the device's, a prospect's: the cells split by role say so, to the count and the successes.
    expected = {"prospect": (len(tasks) + 1, sum(e["outcome"] == "SUCCESS" for e in [events[0], *tasks]))}
    cells = "SELECT role, sum(count), sum(total) FROM indicator_cells FINAL WHERE window_kind = %(kind)s AND " \
            "indicator = 'task_success_rate' GROUP BY role HAVING sum(count) > 0"
    wait_until(lambda: {r: (c, t) for r, c, t in ch.execute(cells, {"kind": "1m"})} == expected, 30,
               "the restated cells", worker)
    assert {r for r, _, _ in ch.execute(cells, {"kind": "15m"})} == {"prospect"}
    wait_until(lambda: {p for (p,) in ch.execute("SELECT DISTINCT person_id FROM person_touchpoints FINAL WHERE "
                                                 "event_id LIKE 'after-%'")} == {person_id_of(anon)}, 60,
               "the moved events gone from the customer's journey", worker)

    # Later touchpoints resolve to the split persons; the sign-in replayed does not merge them again.
    publisher.publish_many([
        task("SUCCESS", event_id="later", event_time=now + 30_000, anonymous_id="dev-un"),
        touchpoint("signin", now + 1_000, event_type="identify", anonymous_id="dev-un", customer_id="c-un"),
    ])
    publisher.flush()
    wait_until(lambda: ch.execute("SELECT count() FROM identity_audit WHERE action = 'refuse_unmerged'")[0][0], 60,
               "the replayed sign-in refused", worker)
    wait_until(lambda: ch.execute("SELECT person_id FROM touchpoints FINAL WHERE event_id = 'later'")
               == [(person_id_of(anon),)], 60, "the later touchpoint", worker)
    assert ch.execute("SELECT action FROM identity_audit FINAL WHERE action = 'unmerge'") == [("unmerge",)]
    assert worker.stop() == 0
    shutil.rmtree(isolated.stack.state_dir / "identity" / isolated.kafka.consumer_group, ignore_errors=True)


def test_late_identify_restates_rows_within_the_horizon_and_records_older_ones(isolated, publisher, start_worker,
                                                                                ch):
    isolated.identity.restate_horizon_s = 600
    worker = start_worker(isolated)
    now = int(time.time() * 1000) - 60_000
    buy = touchpoint("buy", now - 1_300_000, channel="BILLING", event_type="purchase", anonymous_id=None,
                     customer_id="c-late")
    old = task("FAILURE", event_id="old", event_time=now - 1_200_000, anonymous_id="dev-old")  # outside the horizon
    recent = [task(outcome, event_id=f"recent-{i}", event_time=now + i * 3_000, anonymous_id=device)
              for i, (outcome, device) in enumerate([("SUCCESS", "dev-new"), ("FAILURE", "dev-new"),
                                                     ("SUCCESS", "dev-old")])]
    publisher.publish_many([buy, old, *recent])
    publisher.flush()
    prospects = "SELECT sum(count) FROM indicator_cells FINAL WHERE window_kind = '1m' AND " \
                "indicator = 'task_success_rate' AND role = 'prospect'"
    wait_until(lambda: ch.execute(prospects)[0][0] == len(recent) + 1, 60, "the devices' tasks as a prospect's",
               worker)
    publisher.publish_many([
        touchpoint(f"signin-{device}", now + 20_000, event_type="identify", anonymous_id=device, customer_id="c-late")
        for device in ("dev-new", "dev-old")])
    publisher.flush()

    customer = person_id_of("customer_id:c-late")
    wait_until(lambda: {p for (p,) in ch.execute("SELECT DISTINCT person_id FROM touchpoints FINAL WHERE "
                                                 "event_id LIKE 'recent-%'")} == {customer}, 60,
               "the recent rows restated to the customer", worker)
    rows = dict(ch.execute("SELECT event_id, (person_id, toString(role)) FROM touchpoints FINAL "
                           "WHERE event_id IN ('old', 'recent-0', 'recent-1', 'recent-2')"))
    assert rows == {"old": (person_id_of("anonymous_id:dev-old"), "prospect"),
                    **{e["event_id"]: (customer, "customer") for e in recent}}
    cells = "SELECT role, sum(count), sum(total) FROM indicator_cells FINAL WHERE window_kind = '1m' AND " \
            "indicator = 'task_success_rate' GROUP BY role HAVING sum(count) > 0"
    expected = {"customer": (len(recent), sum(e["outcome"] == "SUCCESS" for e in recent)), "prospect": (1, 0)}
    wait_until(lambda: {r: (c, t) for r, c, t in ch.execute(cells)} == expected, 30, "the restated cells", worker)
    wait_until(lambda: ch.execute("SELECT identifier_a FROM identity_audit FINAL WHERE action = 'not_restated'")
               == [("anonymous_id:dev-old",)], 30, "the older row recorded as not restated", worker)
