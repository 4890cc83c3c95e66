"""`touchpoint` command line: local stack, setup, publishing, the worker, live view and the benchmark."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.table import Table

from pipeline.settings import get_settings

app = typer.Typer(help="Touchpoint pipeline: customer touchpoints in, live CX and UX indicators out.",
                  no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: Apache Kafka (or Tansu) broker and ClickHouse server on loopback.",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")
alerts_app = typer.Typer(help="Alerts judged by `touchpoint alerter`: list, acknowledge, resolve, silence.",
                         no_args_is_help=True)
app.add_typer(alerts_app, name="alerts")
cases_app = typer.Typer(help="Follow-up cases of detractor customers: list, close.", no_args_is_help=True)
app.add_typer(cases_app, name="cases")
deadletters_app = typer.Typer(help="Dead letters: list them, replay them once the cause is fixed.",
                              no_args_is_help=True)
app.add_typer(deadletters_app, name="deadletters")
identity_app = typer.Typer(help="Identity decisions: list merges with their audit ids, undo a merge.",
                           no_args_is_help=True)
app.add_typer(identity_app, name="identity")
console = Console()
T = TypeVar("T")


def _print_services(statuses: list) -> None:
    table = Table("service", "state", "pid", "address", "detail")
    for s in statuses:
        table.add_row(s.name, "[green]running[/]" if s.running else "[red]stopped[/]",
                      str(s.pid or "-"), s.address, s.detail)
    console.print(table)


@stack_app.command("up")
def stack_up(timeout: float = typer.Option(90.0, help="Seconds to wait for each server.")) -> None:
    """Start the broker and ClickHouse (idempotent) and wait until both answer."""
    from pipeline.stack import local

    _print_services(local.up(get_settings(), timeout_s=timeout))


@stack_app.command("down")
def stack_down() -> None:
    """Stop the servers this project started."""
    from pipeline.stack import local

    _print_services(local.down(get_settings()))


@stack_app.command("status")
def stack_status() -> None:
    """Show whether each server runs and answers."""
    from pipeline.stack import local

    statuses = local.status(get_settings())
    _print_services(statuses)
    if not all(s.running for s in statuses):
        raise typer.Exit(1)


@app.command()
def init(
    status: bool = typer.Option(False, "--status", help="List applied and pending migrations with checksums; "
                                                        "change nothing."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the migration statements that would run; "
                                                          "change nothing."),
) -> None:
    """Create the Kafka topics, register the Avro schemas and apply ClickHouse migrations (idempotent)."""
    settings = get_settings()
    if status or dry_run:
        import logging

        from clickhouse_driver.errors import Error as ClickHouseError

        from pipeline.adapters.clickhouse import added_columns, migration_status

        logging.getLogger("clickhouse_driver").setLevel(logging.CRITICAL)  # the one line below says it all
        try:
            states = migration_status(settings.clickhouse)
        except (ClickHouseError, OSError) as exc:
            raise _unreachable(exc, f"ClickHouse at {settings.clickhouse.host}:{settings.clickhouse.port}") from None
        if status:
            print(f"{'version':<8} {'name':<28} {'state':<22} {'checksum':<17} {'applied at (UTC)':<20} "
                  "checksum when applied")
            for st in states:
                applied = st.applied_at.strftime("%Y-%m-%d %H:%M:%S") if st.applied_at else "-"
                print(f"{st.migration.version:04d}     {st.migration.name:<28} {st.state:<22} {st.checksum:<17} "
                      f"{applied:<20} {st.applied_checksum or '-'}")
            pending = sum(1 for st in states if st.applied_at is None)
            print(f"database {settings.clickhouse.database}: {len(states) - pending} applied, {pending} pending")
        if dry_run:
            pending_states = [st for st in states if st.applied_at is None]
            print(f"-- database {settings.clickhouse.database}: {len(pending_states)} pending migrations would run "
                  "(topics and schema registration are idempotent and not listed)")
            for st in pending_states:
                print(f"-- {st.migration.version:04d}_{st.migration.name} (checksum {st.checksum})")
                for statement in st.statements:
                    skip = "  -- skipped if its columns exist" if added_columns(statement) else ""
                    print(f"{statement};{skip}")
        return
    from pipeline.app.bootstrap import initialise

    report = initialise(settings)  # a database another pipeline owns ends it with one line (operator_message)
    console.print(f"kafka: topics created {report.topics_created or 'none (all there)'}, settings updated on "
                  f"{report.topics_reconfigured or 'none (all as stated in pipeline/topics.py)'}")
    console.print(f"registry: subject {settings.registry.subject} holds schema ids {report.schema_ids}")
    console.print(f"clickhouse: database {settings.clickhouse.database}, migrations applied "
                  f"{report.migrations_applied or 'none (up to date)'}")


@app.command()
def worker() -> None:
    """Run a stream worker: consume touchpoints, compute indicator windows, write to ClickHouse (alerts: alerter)."""
    from pipeline.adapters.worker import run_worker

    run_worker(get_settings())  # a database another pipeline owns ends it with one line (operator_message)


@app.command()
def collector() -> None:
    """Serve the HTTP collector: touchpoints, webhooks and the browser snippet in, Avro on Kafka out."""
    from pipeline.collector.app import run

    run(get_settings())


@app.command("collector-key")
def collector_key(
    tenant: str = typer.Argument(..., help="The tenant the key writes."),
    key_id: str = typer.Option("key-1", help="A name for the key (shown in answers and logs)."),
) -> None:
    """Make a new write key: prints the key once and the settings entry that holds only its SHA-256."""
    from pipeline.collector.keys import key_digest, new_key

    key = new_key()
    print(f"write key (give it to the sender; it is not stored): {key}")
    print(f'\n[[collector.tenants]]\nname = "{tenant}"\ncors_origins = []\n[[collector.tenants.keys]]\n'
          f'id = "{key_id}"\nsha256 = "{key_digest(key)}"\nevents_per_s = 2000\nburst = 10000')


@app.command()
def alerter() -> None:
    """Run the alert engine: judges the closed windows of every partition, notifies, opens cases (one active)."""
    from pipeline.app.alerter import run_alerter

    run_alerter(get_settings())


def _admin(call: Callable[[], T]) -> T:
    """Run an operator's command; their mistakes are one red line, not a traceback."""
    from pipeline.app.alert_admin import AdminError

    try:
        return call()
    except AdminError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None


@alerts_app.command("list")
def alerts_list(all_states: bool = typer.Option(False, "--all", help="Also inactive and resolved alerts.")) -> None:
    """Current state per alert series."""
    from pipeline.app.alert_admin import list_alerts

    table = Table("fingerprint", "state", "rule", "tenant", "channel", "since (UTC)", "value", "acked by")
    for fp, rule, tenant, channel, state, since_ms, value, acked, _level in list_alerts(get_settings(), all_states):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(since_ms / 1000)) if since_ms else "-"
        table.add_row(fp, state, rule, tenant, channel, since, "-" if value is None else f"{value:.4g}", acked)
    console.print(table)


@alerts_app.command("ack")
def alerts_ack(fingerprint: str, by: str = typer.Option(..., "--by", help="Who acknowledges."),
               comment: str = "") -> None:
    """Acknowledge a firing alert: it stops repeating and escalating."""
    from pipeline.app.alert_admin import command

    fp = _admin(lambda: command(get_settings(), "ack", fingerprint, by, comment))
    console.print(f"acknowledgement of {fp} recorded; the alerter applies it in its next cycle")


@alerts_app.command("resolve")
def alerts_resolve(fingerprint: str, by: str = typer.Option(..., "--by", help="Who resolves."),
                   comment: str = "") -> None:
    """Resolve an alert by hand (it fires again if its next windows still breach)."""
    from pipeline.app.alert_admin import command

    fp = _admin(lambda: command(get_settings(), "resolve", fingerprint, by, comment))
    console.print(f"resolution of {fp} recorded; the alerter applies it in its next cycle")


@alerts_app.command("silence")
def alerts_silence(
    matchers: list[str] = typer.Argument(None, help="label=value pairs that must all match, e.g. tenant=bank."),
    duration: float = typer.Option(3600.0, help="Seconds from now."),
    by: str = typer.Option("", "--by"), comment: str = "",
    expire: str = typer.Option("", help="End this silence id now instead."),
) -> None:
    """Mute notifications of matching alerts until the silence ends (transitions are still recorded)."""
    from pipeline.app.alert_admin import expire_silence, silence

    if expire:
        _admin(lambda: expire_silence(get_settings(), expire))
        console.print(f"silence {expire} ended")
        return
    made = _admin(lambda: silence(get_settings(), matchers or [], duration, by, comment))
    console.print(f"silence {made.silence_id} until "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(made.ends_at_ms / 1000))} UTC")


@cases_app.command("list")
def cases_list(all_cases: bool = typer.Option(False, "--all", help="Also closed cases."),
               limit: int = 200) -> None:
    """Open (and escalated) follow-up cases, newest first."""
    from pipeline.app.alert_admin import list_cases

    table = Table("case", "status", "tenant", "person", "reason", "queue", "opened (UTC)", "SLA due (UTC)", "level")
    for c in list_cases(get_settings(), all_cases, limit):
        table.add_row(c.case_id, c.status, c.tenant, c.person_id, c.reason, c.queue,
                      time.strftime("%Y-%m-%d %H:%M", time.gmtime(c.opened_at_ms / 1000)),
                      time.strftime("%Y-%m-%d %H:%M", time.gmtime(c.sla_due_ms / 1000)), str(c.escalation_level))
    console.print(table)


@cases_app.command("close")
def cases_close(case_id: str, by: str = typer.Option(..., "--by", help="Who closes it."), comment: str = "") -> None:
    """Close a follow-up case."""
    from pipeline.app.alert_admin import command

    cid = _admin(lambda: command(get_settings(), "close_case", case_id, by, comment))
    console.print(f"closing of case {cid} recorded; the alerter applies it in its next cycle")


@app.command()
def forget(
    identifier: str = typer.Argument(..., help="kind:value (e.g. user_id:u-42), or a bare value to try every kind."),
) -> None:
    """Erase a person: identity state on every worker and their rows in ClickHouse. Idempotent and audited."""
    from pipeline.app.erasure import forget as erase

    report = erase(get_settings(), identifier)
    console.print(f"Erased {len(report.identifiers)} identifiers and {len(report.person_ids)} person ids "
                  f"({report.rows_before} touchpoints deleted). Indicator windows hold no person data and stay.")


@identity_app.command("audit")
def identity_audit(
    identifier: str = typer.Option("", help="kind:value, e.g. anonymous_id:dev-42."),
    person: str = typer.Option("", help="A person id, e.g. p-0123456789abcdef."),
    limit: int = 100,
) -> None:
    """The identity decisions (merges, refusals, unmerges) naming an identifier or a person, with their audit ids."""
    from pipeline.app.identity_admin import UnmergeRefused, audit_rows

    if not (identifier or person):
        raise UnmergeRefused("give --identifier kind:value or --person p-...")
    rows = audit_rows(get_settings(), identifier, person, limit)
    # Plain lines, never truncated: the id is copied from here into `touchpoint identity unmerge`.
    print("audit id             at (UTC)             action           identifiers -> persons (reason; event)")
    for row in rows:
        print(f"{row.audit_id:<20} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(row.at_ms / 1000))}  "
              f"{row.action:<16} {row.identifier_a} + {row.identifier_b} -> {row.from_person_id} into "
              f"{row.into_person_id} ({row.reason}; event {row.event_id or '-'})")
    print(f"{len(rows)} rows")


@identity_app.command("unmerge")
def identity_unmerge(audit_id: str = typer.Argument(..., help="The merge's audit id (`touchpoint identity audit`).")
                     ) -> None:
    """Undo a merge: every worker splits the two persons again and restates their stored rows and cells."""
    from pipeline.app.identity_admin import unmerge

    merge, _ = unmerge(get_settings(), audit_id)
    print(f"unmerge of {merge.identifier_a} and {merge.identifier_b} (merged into {merge.into_person_id} at "
          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(merge.at_ms / 1000))} UTC) published to the identity "
          "log; workers split the persons and restate their rows and cells at their next flush")


BAD_LINES_SHOWN = 20


@app.command()
def publish(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSON Lines, one touchpoint per line."),
    schema_version: int = typer.Option(0, help="Subject version to write with; 0 = the newest."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Publish the good lines even if some are bad "
                                                            "(by default a file with a bad line publishes nothing)."),
) -> None:
    """Check every line (size, UTF-8, JSON, contract) first, report bad lines by number and reason, then publish
    nothing or every good line and print what the broker acknowledged."""
    from pipeline.app.publish import publish_file

    settings = get_settings()
    report = publish_file(settings, file, int(time.time() * 1000), schema_version=schema_version or None,
                          skip_bad=skip_bad)
    for line in report.bad[:BAD_LINES_SHOWN]:
        console.print(f"[red]line {line.line_number}[/]: {line.reason}", highlight=False)
    if len(report.bad) > BAD_LINES_SHOWN:
        console.print(f"... and {len(report.bad) - BAD_LINES_SHOWN} more bad lines")
    if not report.sent:
        console.print(f"published nothing: {len(report.bad)} bad lines, {report.good} good"
                      + ("; fix the file or pass --skip-bad" if report.bad else ""))
        raise typer.Exit(1 if report.bad else 0)
    for line in report.undelivered[:BAD_LINES_SHOWN]:
        console.print(f"[red]line {line.line_number}[/]: not delivered: {line.reason}", highlight=False)
    console.print(f"delivered {report.delivered} of {report.good} touchpoints to {settings.kafka.topic} "
                  f"(acknowledged by every in-sync replica); {len(report.bad)} bad lines skipped"
                  + (f"; {len(report.undelivered)} NOT delivered" if report.undelivered else ""))
    if report.bad or report.undelivered:
        raise typer.Exit(1)


@app.command()
def generate(
    scenario: str = typer.Option("mixed", help="banking_app, hospital_booking, mixed, conversion or churn."),
    rate: float = typer.Option(200.0, help="Events per second (event time and, when publishing, wall time)."),
    count: int = typer.Option(0, help="Events to make; 0 = run for --duration seconds."),
    duration: float = typer.Option(60.0, help="Seconds to run when --count is 0."),
    seed: int = typer.Option(0),
    schema_version: int = typer.Option(1, help="1, 2 or 3: which contract version to write."),
    out: Path | None = typer.Option(None, help="Write JSON Lines here instead of publishing."),
) -> None:
    """Make realistic multi-channel traffic, paced in real time, and publish it (or write it to a file)."""
    from pipeline.generate.scenarios import SCENARIOS

    if scenario not in SCENARIOS:
        raise typer.BadParameter(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    total = count or int(rate * duration)
    settings = get_settings()
    if out is not None:
        import json

        from pipeline.generate.scenarios import generate as make

        with out.open("w") as handle:
            for event in make(scenario, total, seed=seed, start_ms=int(time.time() * 1000), events_per_s=rate,
                              schema_version=schema_version):
                handle.write(json.dumps(event) + "\n")
        console.print(f"wrote {total} touchpoints to {out}")
        return
    from pipeline.app.live import publish_paced

    sent = publish_paced(settings, scenario, total, rate=rate, seed=seed, schema_version=schema_version)
    console.print(f"published {sent} touchpoints of scenario {scenario} at {rate:g}/s")


@app.command()
def watch(
    refresh: float = typer.Option(2.0, help="Seconds between refreshes."),
    minutes: int = typer.Option(10, help="How many minutes of windows to show."),
    once: bool = typer.Option(False, help="Print one snapshot and exit."),
) -> None:
    """Live CX and UX indicators and alerts, read from ClickHouse."""
    from pipeline.app.live import watch as live_watch

    live_watch(get_settings(), console, refresh_s=refresh, minutes=minutes, once=once)


@app.command("console")
def console_server(
    host: str = typer.Option("", help="Address to listen on (default: console.host, loopback)."),
    port: int = typer.Option(0, help="Port (default: console.port)."),
) -> None:
    """The operations console: a web page and a JSON API (OpenAPI at /openapi.json) over ClickHouse."""
    from pipeline.console.app import serve

    settings = get_settings()
    address = f"http://{host or settings.console.host}:{port or settings.console.port}/"
    actions = "actions need the token in console.token" if settings.console.token else \
        "actions off (set TOUCHPOINT_CONSOLE__TOKEN)"
    console.print(f"operations console at {address} ({actions})")
    serve(settings, host=host or None, port=port or None)


def _unreachable(exc: Exception, what: str) -> typer.Exit:
    """A server that does not answer: one line naming it, no traceback."""
    console.print(f"[red]{what} did not answer: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                  "[/]", highlight=False)
    return typer.Exit(1)


def _dead_letter_filters(reason: str | None, since: str | None) -> int | None:
    from pipeline.app.deadletters import DeadLetterError, parse_since

    try:
        return parse_since(since, int(time.time() * 1000)) if since else None
    except DeadLetterError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None


@deadletters_app.command("list")
def deadletters_list(
    reason: str | None = typer.Option(None, help="Only this reason (e.g. undecodable, contract_violation)."),
    since: str | None = typer.Option(None, help="Only dead-lettered since: 15m, 2h, 1d or an ISO time (UTC)."),
    newest: int = typer.Option(1000, help="Read at most this many of the newest records per partition."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per dead letter."),
) -> None:
    """List dead letters with their reason, decoded where they decode (hex where not)."""
    import json

    from kafka.errors import KafkaError

    from pipeline.app.deadletters import list_dead_letters

    settings = get_settings()
    try:
        listing = list_dead_letters(settings, reason=reason, since_ms=_dead_letter_filters(reason, since),
                                    newest=newest)
    except KafkaError as exc:
        raise _unreachable(exc, f"Kafka at {settings.kafka.bootstrap_servers}") from None
    if as_json:
        for letter in listing.dead_letters:
            print(json.dumps(letter.as_dict()))
        return
    table = Table("partition:offset", "dead-lettered (UTC)", "reason", "detail", "event id / bytes", "replayed",
                  "if replayed now")
    from datetime import UTC, datetime

    for d in listing.dead_letters:
        what = d.event_id if d.event_id is not None else f"{d.size} bytes: {(d.hex or '')[:32]}..."
        table.add_row(f"{d.partition}:{d.offset}", datetime.fromtimestamp(d.timestamp_ms / 1000, UTC)
                      .strftime("%Y-%m-%d %H:%M:%S"), d.reason, d.detail[:80], what, "yes" if d.replayed else "",
                      "passes" if d.problem_now is None else f"dead-lettered again ({d.problem_now[:60]})")
    console.print(table)
    counts = ", ".join(f"{r} {n}" for r, n in sorted(listing.by_reason.items())) or "none"
    console.print(f"{len(listing.dead_letters)} shown of {listing.scanned} read from "
                  f"{settings.kafka.dead_letter_topic}; by reason: {counts}")


@deadletters_app.command("replay")
def deadletters_replay(
    reason: str | None = typer.Option(None, help="Only this reason."),
    since: str | None = typer.Option(None, help="Only dead-lettered since: 15m, 2h, 1d or an ISO time (UTC)."),
    offset: list[str] = typer.Option([], help="PARTITION:OFFSET of a dead letter to replay; repeat for more."),
    again: bool = typer.Option(False, help="Replay dead letters that were replayed before, too."),
    force: bool = typer.Option(False, help="Replay even those that would be dead-lettered again."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be replayed; publish nothing."),
) -> None:
    """Re-publish chosen dead letters to the touchpoint topic with their original key and bytes (event ids kept:
    an event counts once per window, late ones are kept uncounted, so nothing is counted twice)."""
    from pipeline.app.deadletters import DeadLetterError, replay

    places = []
    for text in offset:
        partition, _, number = text.partition(":")
        if not (partition.isdigit() and number.isdigit()):
            console.print(f"[red]--offset {text!r}: give PARTITION:OFFSET, e.g. 0:42[/]")
            raise typer.Exit(2)
        places.append((int(partition), int(number)))
    settings = get_settings()
    if not (reason or since or places):
        console.print("[red]choose what to replay: --reason, --since and/or --offset (see `deadletters list`)[/]")
        raise typer.Exit(2)
    try:
        report = replay(settings, reason=reason, since_ms=_dead_letter_filters(reason, since), offsets=places,
                        again=again, force=force, dry_run=dry_run)
    except DeadLetterError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    verb = "would replay" if dry_run else "replayed"
    console.print(f"{verb} {len(report.replayed)} dead letters to {settings.kafka.topic}; skipped "
                  f"{len(report.already_replayed)} replayed before (--again to include) and "
                  f"{len(report.would_fail)} that would be dead-lettered again (--force to include)")
    for d in report.would_fail[:10]:
        console.print(f"  {d.partition}:{d.offset} {d.problem_now}", highlight=False, markup=False)


@app.command()
def bench(
    events: int = typer.Option(200_000, help="Generated events to publish and process."),
    identity: bool = typer.Option(True, help="Resolve persons through the identity graph (--no-identity: off)."),
    preload_identities: int = typer.Option(0, help="Identifiers to put in the identity graph before the run."),
    compare: bool = typer.Option(False, help="Run without identity, then with it and --preload-identities; "
                                             "print both and the ratio."),
    drain: bool = typer.Option(False, help="Publish the events while the worker is paused, then time the worker "
                                           "draining them (its own rate, publisher off the cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    profile: Path | None = typer.Option(None, help="Write a cProfile of the worker here (CPU time, every thread; "
                                                   "top functions in PATH.txt). Slows the worker down."),
    alerts: bool = typer.Option(False, "--alerts", help="Measure the alerter instead: 10,000 series per window, "
                                                        "window close to webhook notification."),
    collector: bool = typer.Option(False, "--collector", help="Instead: HTTP load on a collector on loopback "
                                                               "(--events touchpoints, 100 per request)."),
    concurrency: int = typer.Option(8, help="--collector: keep-alive connections posting at once."),
    collector_workers: int = typer.Option(1, help="--collector: collector server processes."),
    identity_scale: int = typer.Option(0, help="Instead: build an identity graph of this many identifiers in "
                                               "memory and on disk (rocksdb) in-process, and time enrichment."),
    identity_seed: Path | None = typer.Option(None, help="With --identity-scale: build the on-disk graph here and "
                                                         "keep it (reopened and timed if it exists; no memory run). "
                                                         "Otherwise: the worker starts with a copy of this store "
                                                         "as its local store."),
) -> None:
    """Measure end-to-end, raw consume and decode-only rates of the same events in one run."""
    import json

    from pipeline.app.bench import run_bench
    from pipeline.stack import local

    settings = get_settings()
    local.up(settings)
    if identity_scale:
        import tempfile

        from pipeline.app.bench import run_identity_scale

        if identity_seed is not None:
            print(json.dumps(run_identity_scale(identity_scale, "rocksdb", str(identity_seed),
                                                events=min(events, 100_000)).as_dict()))
            return
        with tempfile.TemporaryDirectory(prefix="identity-scale-") as directory:
            for store in ("memory", "rocksdb"):
                print(json.dumps(run_identity_scale(identity_scale, store, directory, events=min(events, 100_000))
                                 .as_dict()))
        return
    if alerts:
        from pipeline.app.alert_bench import print_alert_bench

        print_alert_bench(settings, console, as_json)
        return
    if collector:
        from pipeline.collector.bench import run_collector_bench

        figures = run_collector_bench(settings, events, batch=100, concurrency=concurrency,
                                      workers=collector_workers)
        if as_json:
            print(json.dumps(figures.as_dict()))
            return
        console.print(f"collector: {figures.accepted:,} of {figures.events:,} touchpoints accepted in "
                      f"{figures.seconds:.1f} s = [bold]{figures.accepted_events_per_s:,.0f} events/s[/] "
                      f"({figures.requests_per_s:,.0f} requests/s of {figures.batch}, {figures.concurrency} "
                      f"connections, {collector_workers} worker(s)); latency p50 {figures.p50_ms:.0f} ms, "
                      f"p99 {figures.p99_ms:.0f} ms, max {figures.max_ms:.0f} ms; answers {figures.statuses}; "
                      f"{figures.records_on_topic:,} records on the topic; collector RSS "
                      f"{figures.collector_rss_mib:,.0f} MiB, CPU {figures.collector_cpu_s:.1f} s = "
                      f"{figures.events_per_cpu_s:,.0f} events per CPU-second")
        return
    if compare:
        runs = [run_bench(settings, events, identity=False, drain=drain),
                run_bench(settings, events, identity=True, preload_identities=preload_identities, drain=drain)]
    else:
        runs = [run_bench(settings, events, identity=identity, preload_identities=preload_identities, drain=drain,
                          profile=profile, identity_seed=identity_seed)]
    if as_json:
        print(json.dumps([r.as_dict() for r in runs] if compare else runs[0].as_dict()))
        return
    for result in runs:
        table = Table("measure", "events/s", "vs end to end")
        e2e_name = ("end to end, draining a backlog (Kafka -> rows in ClickHouse)" if result.drain
                    else "end to end (published -> rows in ClickHouse)")
        for name, rate in ((e2e_name, result.e2e_events_per_s),
                           ("raw aiokafka consume", result.raw_consume_events_per_s),
                           ("fastavro decode only", result.decode_events_per_s),
                           ("kafka-python publish", result.publish_events_per_s)):
            table.add_row(name, f"{rate:,.0f}", f"{rate / result.e2e_events_per_s:.1f}x")
        console.print(table)
        identity_note = (f"identity on, {result.preloaded_identifiers:,} identifiers preloaded"
                         if result.identity else "identity off")
        console.print(f"{result.events:,} events, {result.partitions} partitions, one worker, {identity_note}, "
                      f"{result.e2e_seconds:.1f} s end to end, worker RSS {result.worker_rss_mib:,.0f} MiB")
        console.print(f"cost: worker CPU {result.worker_cpu_s:.1f} s = {result.worker_cpu_us_per_event:.1f} µs/event "
                      f"(user + system, every thread of the worker, clock start to last row; its threads waited "
                      f"{result.worker_runqueue_wait_s:.1f} s for a core); fastavro decode "
                      f"{result.decode_us_per_event:.1f} µs/event (the worker's own decode step "
                      f"{result.pipeline_decode_us_per_event:.1f}); CPU / decode {result.cpu_over_decode:.2f} "
                      f"(goal <= 1.0), end to end / decode {result.e2e_over_decode:.2f} (goal >= 1.0)"
                      + ("" if result.drain else f", end to end / publish {result.e2e_over_publish:.2f} "
                                                 "(goal >= 0.95)"))
        console.print(f"start-up: {result.startup_s:.1f} s from launching the worker to its first row; RSS over "
                      "the run (s, MiB): " + ", ".join(f"{t:g}: {m:,.0f}" for t, m in result.worker_rss_mib_over_time))
        if result.profile_path:
            console.print(f"profile: {result.profile_path} (top functions: {result.profile_path}.txt)")
        if result.graph_bytes_per_identifier:
            console.print(f"identity graph: {result.graph_bytes_per_identifier:,.0f} bytes per identifier")
    if compare:
        ratio = runs[1].e2e_events_per_s / runs[0].e2e_events_per_s
        console.print(f"end to end with identity / without: {ratio:.0%}")


@app.command()
def demo(
    duration: float = typer.Option(150.0, help="Seconds of generated traffic."),
    rate: float = typer.Option(300.0, help="Events per second."),
) -> None:
    """Bring up the local stack and run the whole pipeline on generated traffic, showing live results."""
    from pipeline.app.live import run_demo

    run_demo(get_settings(), console, duration_s=duration, rate=rate)


def operator_message(exc: BaseException) -> str | None:
    """One line for an operator's everyday mistake (a server not reachable, an invalid setting, a refused
    request), None for anything else: a bug, whose traceback is worth seeing."""
    from clickhouse_driver.errors import NetworkError, SocketTimeoutError
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError
    from pydantic import ValidationError

    from pipeline.adapters.clickhouse import ClusterNotConfigured, DatabaseInUse
    from pipeline.app.erasure import ErasureRefused
    from pipeline.app.identity_admin import UnmergeRefused
    from pipeline.contract.registry import RegistryError
    from pipeline.stack.local import StackError

    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for error in chain:
        if isinstance(error, ValidationError):
            problems = error.errors()
            first = problems[0]
            name = ".".join(str(part) for part in first["loc"])
            env = "TOUCHPOINT_" + "__".join(str(part).upper() for part in first["loc"])
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            return (f"invalid setting {name} ({env} or touchpoint.toml): {first['msg']}; "
                    f"got {first.get('input')!r}{more}")
        if isinstance(error, (ErasureRefused, UnmergeRefused, StackError, DatabaseInUse, ClusterNotConfigured)):
            return str(error)
        if isinstance(error, KafkaConnectionError) or (
                isinstance(error, KafkaTimeoutError) and "bootstrap" in str(error)):
            return (f"cannot reach the Kafka broker at {get_settings().kafka.bootstrap_servers} "
                    "(kafka.bootstrap_servers, TOUCHPOINT_KAFKA__BOOTSTRAP_SERVERS): is it running and is the "
                    "address right? `touchpoint stack status` shows the local stack")
        if isinstance(error, (NetworkError, SocketTimeoutError)):
            ch = get_settings().clickhouse
            reason = str(error).split("\n")[0]
            return (f"cannot reach ClickHouse at {ch.host}:{ch.port} (clickhouse.host, clickhouse.port, "
                    f"TOUCHPOINT_CLICKHOUSE__PORT): {reason}; is it running? `touchpoint stack status` shows the "
                    "local stack")
        if isinstance(error, RegistryError):
            return (f"schema registry problem (registry.url, TOUCHPOINT_REGISTRY__URL = "
                    f"{get_settings().registry.url}): {error}")
    return None


def main() -> None:
    """The `touchpoint` command: operators' mistakes end with one line on stderr and exit code 2."""
    if sys.argv[1:2] != ["worker"]:  # a one-shot command says "cannot reach ClickHouse" once, without the
        logging.getLogger("clickhouse_driver").setLevel(logging.ERROR)  # driver's own warning and traceback
    try:
        app()
    except Exception as exc:
        message = operator_message(exc)
        if message is None:
            raise
        Console(stderr=True).print(f"touchpoint: {message}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
