"""The indicator registry: what each indicator observes, the streaming cells against the batch reference on
randomized streams, and the generated documentation."""

import itertools
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.aggregate import ON_TIME, PartitionWindows
from pipeline.core.indicators import (
    BY_ID,
    DIMENSIONS,
    GROUPS,
    REGISTRY,
    Family,
    Kind,
    SessionSummary,
    catalogue,
    markdown,
    note_in_session,
    observation,
)
from pipeline.core.sketch import ALPHA, exact_quantile, quantile
from tests import reference
from tests.factories import (
    BASE_MS,
    contact,
    csat,
    page,
    stream_event,
    streams,
    survey,
    task,
    touchpoint,
    window_lengths,
)

MINUTE = 60_000
HOPPING, GAP, BLOCK, LATENESS = 5 * MINUTE, 3 * MINUTE, 30 * MINUTE, 10_000
DOC = Path(__file__).resolve().parents[2] / "docs" / "indicators.md"


def _value(indicator_id, event):
    seen = observation(BY_ID[indicator_id], event)
    return None if seen is None else seen[1]


def test_the_catalogue_has_every_indicator_of_the_issue():
    assert {
        "nps", "csat", "ces_mean", "ces_easy_share", "fcr", "first_response_time", "resolution_time", "aht",
        "sla_breach_rate", "escalation_rate", "repeat_contact_rate", "queue_abandonment", "sentiment",
        "task_success_rate", "time_on_task", "error_rate", "crash_free_sessions", "intermittency", "apdex",
        "lcp_p75", "lcp_good_share", "lcp_poor_share", "inp_p75", "inp_good_share", "inp_poor_share", "cls_p75",
        "cls_good_share", "cls_poor_share", "rage_click_rate", "funnel_abandonment", "search_no_result_rate",
        "channels_per_session", "contacts_per_issue",
    } == set(BY_ID)
    assert len(BY_ID) == len(REGISTRY)
    assert {i.family for i in REGISTRY} == set(Family)
    for indicator in REGISTRY:
        assert indicator.fed_by and indicator.definition and indicator.formula and indicator.unit
        assert (indicator.observe is None) != (indicator.observe_session is None), indicator.id
        assert set(indicator.dimensions) <= set(DIMENSIONS)
        assert (indicator.kind == Kind.QUANTILE) == (0 < indicator.q < 1), indicator.id


def test_surveys():
    assert observation(BY_ID["nps"], survey("NPS", 9, about="STORE")) == ("STORE", 100.0)
    assert [_value("nps", survey("NPS", s)) for s in (10, 8, 7, 6, 0)] == [100.0, 0.0, 0.0, -100.0, -100.0]
    assert _value("nps", csat(5)) is None
    assert [_value("ces_mean", survey("CES", s)) for s in (1, 7)] == [1.0, 7.0]
    assert [_value("ces_easy_share", survey("CES", s)) for s in (4, 5, 7)] == [0.0, 1.0, 1.0]
    assert _value("csat", csat(4)) == 1.0 and _value("csat", csat(3)) == 0.0
    assert _value("sentiment", csat(4, sentiment=-0.25)) == -0.25 and _value("sentiment", csat(4)) is None


def test_customer_support():
    day = 86_400_000
    assert _value("fcr", contact(resolved=True)) == 1.0
    assert _value("fcr", contact(resolved=True, previous_contact_ms=BASE_MS - day)) == 0.0  # a repeat
    assert _value("fcr", contact(resolved=True, previous_contact_ms=BASE_MS - 8 * day)) == 1.0
    assert _value("fcr", contact(resolved=None)) is None
    assert _value("repeat_contact_rate", contact(previous_contact_ms=BASE_MS - 7 * day)) == 1.0
    assert _value("repeat_contact_rate", contact(previous_contact_ms=BASE_MS - 7 * day - 1)) == 0.0
    assert _value("repeat_contact_rate", contact()) == 0.0
    assert _value("repeat_contact_rate", contact(event_type="ticket_resolved", channel="HELPDESK")) is None
    assert _value("aht", contact(handle_ms=1234)) == 1234.0
    assert _value("escalation_rate", contact(escalated=True)) == 1.0
    assert _value("queue_abandonment", contact(outcome="ABANDONED")) == 1.0
    assert _value("queue_abandonment", contact(queue_ms=None)) is None
    assert _value("sla_breach_rate", contact(queue_ms=61_000)) == 1.0  # contact centre default: 60 s
    assert _value("sla_breach_rate", contact(queue_ms=59_000)) == 0.0
    assert _value("sla_breach_rate", contact(queue_ms=59_000, attributes={"sla_target_ms": "20000"})) == 1.0
    assert _value("first_response_time", contact(first_response_ms=5)) == 5.0
    resolved = contact(event_type="ticket_resolved", channel="HELPDESK", handle_ms=700)
    assert _value("resolution_time", resolved) == 700.0
    assert _value("resolution_time", {**resolved, "duration_ms": 9_000}) == 9_000.0


def test_product():
    assert _value("time_on_task", task("SUCCESS", duration_ms=800)) == 800.0
    assert _value("time_on_task", task("FAILURE", duration_ms=800)) is None
    assert _value("funnel_abandonment", task("ABANDONED")) == 1.0
    assert _value("rage_click_rate", task("SUCCESS", rage_clicks=3)) == 1.0
    assert _value("rage_click_rate", page(rage_clicks=2)) == 0.0 and _value("rage_click_rate", page()) is None
    assert _value("lcp_p75", page(lcp_ms=2_600.0)) == 2_600.0
    assert [_value("lcp_good_share", page(lcp_ms=v)) for v in (2_500.0, 2_501.0)] == [1.0, 0.0]
    assert [_value("inp_poor_share", page(inp_ms=v)) for v in (500.0, 501.0)] == [0.0, 1.0]
    assert _value("cls_good_share", page(cls=0.0)) == 1.0 and _value("cls_p75", page(cls=None)) is None
    search = touchpoint(event_type="search", attributes={"results": "0"})
    assert _value("search_no_result_rate", search) == 1.0
    assert _value("search_no_result_rate", {**search, "attributes": {"results": "12"}}) == 0.0


def test_apdex_uses_the_flow_threshold():
    apdex = {i.id: i for i in catalogue({"login": 1_000}, apdex_default_t_ms=100)}["apdex"]

    def value(event):
        return observation(apdex, event)[1]

    assert [value(task("SUCCESS", flow="login", duration_ms=d)) for d in (1_000, 4_000, 4_001)] == [1.0, 0.5, 0.0]
    assert value(task("SUCCESS", flow="other", duration_ms=400)) == 0.5  # default T = 100 ms
    assert value(task("FAILURE", flow="login", duration_ms=10)) == 0.0
    assert "login 1000 ms" in apdex.definition


def test_session_indicators():
    summary = SessionSummary()
    events = [task("SUCCESS", event_id="1", event_time=BASE_MS), contact(event_id="2", journey_id="j1"),
              touchpoint(event_type="app_crash", event_id="3", event_time=BASE_MS + 1, channel="MOBILE_APP"),
              contact(event_id="4", journey_id="j1"), contact(event_id="5", journey_id="j2"),
              task("SUCCESS", event_id="6", event_time=BASE_MS + 2)]
    for event in events:
        note_in_session(summary, event)
    assert BY_ID["channels_per_session"].observe_session(summary) == [3.0]
    assert BY_ID["contacts_per_issue"].observe_session(summary) == [2.0, 1.0]
    assert BY_ID["crash_free_sessions"].observe_session(summary) == [0.0]
    assert BY_ID["intermittency"].observe_session(summary) == [1.0]
    assert BY_ID["crash_free_sessions"].observe_session(SessionSummary()) == []


def test_windows_call_only_the_observers_an_event_type_feeds():
    windows = PartitionWindows(0, MINUTE, 0, **window_lengths())
    called = {event_type: {windows.event_indicators[slot].id for part in entries for slot, _ in part}
              for event_type, entries in windows.dispatch.items()}
    assert called["task"] == {"task_success_rate", "time_on_task", "error_rate", "apdex", "rage_click_rate",
                              "funnel_abandonment"}
    assert "identify" not in called
    assert {"error_rate", "rage_click_rate"} == called["page_view"]
    grouped = {windows.event_indicators[slot].id for slots, _, _ in windows.group_dispatch["page_view"]
               for slot in slots}
    assert grouped == {i.id for i in REGISTRY if i.group == "web_vitals"} and len(grouped) == 9
    assert "task" not in windows.group_dispatch


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.floats(0, 10_000)), st.one_of(st.none(), st.floats(0, 1_000)),
       st.one_of(st.none(), st.floats(0, 1)))
def test_a_group_observes_what_its_members_observe_one_by_one(lcp, inp, cls):
    event = page(lcp_ms=lcp, inp_ms=inp, cls=cls)
    for group, (members, observe) in GROUPS.items():
        assert observe(event) == tuple(_value(member, event) for member in members), group
    assert GROUPS["web_vitals"][1](touchpoint()) is None and _value("lcp_p75", touchpoint()) is None


def test_the_documentation_is_generated_from_the_registry():
    assert DOC.read_text() == markdown(), "run: python -m pipeline.core.indicators --markdown > docs/indicators.md"


def _stream_cells(steps, cuts):
    """Each person's events go to one of two partitions (as Kafka keys them); each partition runs in batches."""
    by_partition = {p: [stream_event(s) for s in steps if s[2] % 2 == p] for p in (0, 1)}
    cells, fates = {}, {}
    for partition, events in by_partition.items():
        windows = PartitionWindows(partition, MINUTE, LATENESS, hopping_ms=HOPPING, session_gap_ms=GAP,
                                   session_max_ms=BLOCK)
        bounds = [0, *sorted(c % (len(events) + 1) for c in cuts), len(events)]
        fates[partition] = []
        for a, b in itertools.pairwise(bounds):
            fates[partition] += windows.add(events[a:b], list(range(a, b)))
        windows.advance_idle(BASE_MS + 10**9)
        for c in windows.drain_closed():
            key = (c.window_kind, c.window_start_ms, c.window_end_ms, c.partition, *c.key)
            assert key not in cells, "a cell is emitted once"
            cells[key] = (c.count, c.total, c.sketch)
    return by_partition, cells, fates


@settings(max_examples=150, deadline=None)
@given(streams(), st.lists(st.integers(0, 10_000), max_size=5))
def test_streaming_equals_the_batch_reference(steps, cuts):
    by_partition, cells, fates = _stream_cells(steps, cuts)
    counted = {}
    for partition, events in by_partition.items():
        expected_fates = reference.counted(events, MINUTE, LATENESS)
        assert [fate == ON_TIME for fate in fates[partition]] == expected_fates
        counted[partition] = [e for e, ok in zip(events, expected_fates, strict=True) if ok]
    expected = reference.cells(counted, window_ms=MINUTE, hopping_ms=HOPPING, session_gap_ms=GAP,
                               session_max_ms=BLOCK)
    assert cells == expected  # counts and totals exactly; sketches equal, hence their quantiles
    values = reference.observed_values(counted, window_ms=MINUTE, hopping_ms=HOPPING)
    for cell_id, observed in values.items():
        q = BY_ID[cell_id[-1]].q
        exact = exact_quantile(observed, q)
        estimate = quantile(cells[cell_id][2], q)
        assert abs(estimate - exact) <= ALPHA * exact * (1 + 1e-9) + 1e-9, cell_id


def test_reference_sessions_cut_at_gaps_and_blocks():
    events = [touchpoint(str(i), BASE_MS + t * 1000, person_id="p") for i, t in enumerate((0, 100, 400, 1790, 1810))]
    found = reference.sessions(events, gap_ms=GAP, max_ms=BLOCK)
    # 0 and 100 s together; 400 s after a 5-minute gap; 1790 s alone; 1810 s is past the 30-minute block edge
    assert sorted(end for end, *_ in found) == [BASE_MS + 280_000, BASE_MS + 580_000, BASE_MS + 1_800_000,
                                                BASE_MS + 1_990_000]
