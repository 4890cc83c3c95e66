"""Alert rules and the alert lifecycle, judged cluster-wide over closed windows (no I/O, time injected).

A rule turns the totals of one closed window into observations, one per series (rule, tenant, channel[, labels]);
the lifecycle turns each series' observations into states, Prometheus-style:

    inactive -> pending -> firing -> resolved        (and no_data when a series that reported goes silent)

`for_windows` consecutive breaching windows make a pending series fire; a firing series resolves only once a
window is back beyond the recovery threshold (hysteresis) and `keep_firing_for` has passed since its last breach.
Every change of state is an AlertEvent carrying the window, the values and the completeness of the data.

Rule kinds: threshold, wilson (a rate whose Wilson score interval lies wholly beyond the threshold), seasonal
(robust z-score against the same hour of the week in earlier weeks), divergence (UX verdict vs CX verdict per
tenant, each from several indicators) and no_data (a channel that reported goes silent).
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from pipeline.core.evaluate import WindowTotal
from pipeline.core.indicators import BY_ID, Kind

WEEK_MS = 7 * 86_400_000
HOUR_MS = 3_600_000
RULE_KINDS = ("threshold", "wilson", "seasonal", "divergence", "no_data")
WINDOW_KINDS = ("1m", "15m", "session")
SEVERITIES = ("info", "warning", "critical")


class State(StrEnum):
    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"
    NO_DATA = "no_data"


class RuleError(ValueError):
    """A rule that cannot be judged; the message names the rule and the field."""


# ---------------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True, slots=True)
class Signal:
    """One indicator's vote in a divergence verdict: bad beyond `bad`, good beyond `good`, else neutral."""

    indicator: str
    bad: float
    good: float

    @property
    def higher_is_better(self) -> bool:
        return self.good >= self.bad

    def verdict(self, value: float) -> str:
        if self.higher_is_better:
            return "bad" if value < self.bad else "good" if value >= self.good else "neutral"
        return "bad" if value > self.bad else "good" if value <= self.good else "neutral"


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    kind: str
    severity: str = "warning"
    window_kind: str = "1m"
    indicator: str = ""
    comparison: str = "above"  # above / below (seasonal also: both)
    threshold: float = 0.0
    recovery_threshold: float | None = None  # hysteresis: a firing alert resolves only beyond this
    min_count: float = 20.0  # observations a window needs to be judged
    for_windows: int = 1  # consecutive breaching windows before firing
    keep_firing_for_s: float = 0.0  # a firing alert stays firing this long after its last breach
    no_data_windows: int = 0  # windows without data before a series is no_data (0: never)
    confidence: float = 0.95  # wilson
    weeks: int = 4  # seasonal: earlier weeks in the baseline
    min_weeks: int = 3  # seasonal: fewer weeks of history than this: no verdict
    z: float = 3.5  # seasonal: robust z-score beyond which a window is anomalous
    min_mad: float = 0.0  # seasonal: floor of the baseline spread (absolute), so a flat history is not brittle
    divergence: str = "ux_bad_cx_good"  # or ux_good_cx_bad
    ux: tuple[Signal, ...] = ()
    cx: tuple[Signal, ...] = ()
    min_signals: int = 2  # divergence: indicators that must agree for a UX or CX verdict
    tenants: tuple[str, ...] = ()  # empty: every tenant
    channels: tuple[str, ...] = ()  # empty: every channel
    labels: tuple[tuple[str, str], ...] = ()  # extra labels for routing

    @property
    def family(self) -> str:
        if self.kind == "divergence":
            return "CX/UX"
        if self.kind == "no_data":
            return "DATA"
        family = BY_ID[self.indicator].family.value
        return "CX" if family == "CS" else family  # support is part of CX; routes match on CX or UX

    def recovery(self) -> float:
        return self.threshold if self.recovery_threshold is None else self.recovery_threshold

    def indicators(self) -> set[str]:
        if self.kind == "divergence":
            return {s.indicator for s in (*self.ux, *self.cx)}
        return {self.indicator} if self.indicator else set()

    def kind_of(self, indicator: str) -> str:
        """Which window kind an indicator is read in: the rule's, or 'session' for session indicators."""
        windows = BY_ID[indicator].windows
        return self.window_kind if self.window_kind in windows else windows[0]


def _fail(rule: str, name: str, why: str) -> RuleError:
    return RuleError(f"alert rule {rule!r}, field {name!r}: {why}")


def _signals(rule: str, name: str, raw: Any) -> tuple[Signal, ...]:
    if not isinstance(raw, Mapping) or not raw:
        raise _fail(rule, name, "must map indicator ids to [bad, good] thresholds, e.g. {error_rate = [0.1, 0.05]}")
    out = []
    for indicator, pair in raw.items():
        if indicator not in BY_ID:
            raise _fail(rule, name, f"unknown indicator {indicator!r}")
        if not isinstance(pair, Sequence) or len(pair) != 2 or not all(isinstance(x, int | float) for x in pair):
            raise _fail(rule, name, f"{indicator} needs [bad, good] numbers, got {pair!r}")
        if pair[0] == pair[1]:
            raise _fail(rule, name, f"{indicator}: bad and good thresholds must differ")
        out.append(Signal(indicator, float(pair[0]), float(pair[1])))
    return tuple(out)


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Rule)}  # the type each declared field takes


def _coerce(rule: str, name: str, value: Any) -> Any:
    """A declared field's value in the type Rule holds, or an error naming the rule and field."""
    if name in ("tenants", "channels"):
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise _fail(rule, name, "must be a list of names")
        return tuple(str(v) for v in value)
    if name == "labels":
        if not isinstance(value, Mapping):
            raise _fail(rule, name, "must be a table of label = value")
        return tuple(sorted((str(k), str(v)) for k, v in value.items()))
    expected = float if name == "recovery_threshold" else type(_DEFAULTS[name])
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(rule, name, f"must be a number, got {value!r}")
        return float(value)
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _fail(rule, name, f"must be a whole number, got {value!r}")
    if expected is str and not isinstance(value, str):
        raise _fail(rule, name, f"must be text, got {value!r}")
    return value


def parse_rule(raw: Mapping[str, Any]) -> Rule:
    """A rule from its declarative form (TOML table / JSON object), with errors naming the rule and field."""
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RuleError(f"alert rule {dict(raw)!r}: field 'name' is required")
    known = {f.name for f in fields(Rule)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _fail(name, unknown[0], f"unknown field; known: {', '.join(sorted(known))}")
    kind = raw.get("kind", "threshold")
    if kind not in RULE_KINDS:
        raise _fail(name, "kind", f"{kind!r} is not one of {', '.join(RULE_KINDS)}")
    values: dict[str, Any] = {"name": name, "kind": kind}
    for field_name, value in raw.items():
        if field_name in ("ux", "cx"):
            values[field_name] = _signals(name, field_name, value)
        elif field_name not in ("name", "kind"):
            values[field_name] = _coerce(name, field_name, value)
    rule = Rule(**values)
    _check_common(rule)
    if rule.kind in ("threshold", "wilson", "seasonal"):
        _check_indicator_rule(rule)
    if rule.kind == "divergence":
        _check_divergence(rule)
    if rule.kind == "no_data" and rule.no_data_windows < 1:
        raise _fail(name, "no_data_windows", "a no_data rule needs no_data_windows >= 1")
    return rule


def _check_common(rule: Rule) -> None:
    n = rule.name
    if rule.severity not in SEVERITIES:
        raise _fail(n, "severity", f"{rule.severity!r} is not one of {', '.join(SEVERITIES)}")
    if rule.window_kind not in WINDOW_KINDS:
        raise _fail(n, "window_kind", f"{rule.window_kind!r} is not one of {', '.join(WINDOW_KINDS)}")
    if rule.for_windows < 1:
        raise _fail(n, "for_windows", "must be at least 1")
    for name in ("keep_firing_for_s", "no_data_windows", "min_count"):
        if getattr(rule, name) < 0:
            raise _fail(n, name, "must not be negative")


def _check_indicator_rule(rule: Rule) -> None:
    """threshold, wilson and seasonal rules: one indicator, in a window kind it is computed in."""
    n = rule.name
    if rule.indicator not in BY_ID:
        raise _fail(n, "indicator", f"unknown indicator {rule.indicator!r}")
    if rule.window_kind not in BY_ID[rule.indicator].windows:
        raise _fail(n, "window_kind", f"{rule.indicator} is computed in {', '.join(BY_ID[rule.indicator].windows)} "
                                      f"windows, not {rule.window_kind!r}")
    allowed = ("above", "below", "both") if rule.kind == "seasonal" else ("above", "below")
    if rule.comparison not in allowed:
        raise _fail(n, "comparison", f"must be one of {', '.join(allowed)}")
    if rule.kind != "seasonal" and rule.recovery_threshold is not None and (
            rule.recovery_threshold > rule.threshold if rule.comparison == "above"
            else rule.recovery_threshold < rule.threshold):
        side = "at or below" if rule.comparison == "above" else "at or above"
        raise _fail(n, "recovery_threshold", f"must be {side} the threshold {rule.threshold:g}")
    if rule.kind == "wilson" and BY_ID[rule.indicator].kind != Kind.RATIO:
        raise _fail(n, "indicator", f"{rule.indicator} is not a rate; the Wilson interval needs a ratio")
    if rule.kind == "wilson" and not 0.5 <= rule.confidence < 1:
        raise _fail(n, "confidence", "must be in [0.5, 1)")
    if rule.kind == "seasonal" and (rule.weeks < 1 or not 1 <= rule.min_weeks <= rule.weeks):
        raise _fail(n, "min_weeks", "must be between 1 and weeks")
    if rule.kind == "seasonal" and rule.z <= 0:
        raise _fail(n, "z", "must be positive")


def _check_divergence(rule: Rule) -> None:
    n = rule.name
    if rule.divergence not in ("ux_bad_cx_good", "ux_good_cx_bad"):
        raise _fail(n, "divergence", "must be ux_bad_cx_good or ux_good_cx_bad")
    if rule.min_signals < 1:
        raise _fail(n, "min_signals", "must be at least 1")
    for side, signals in (("ux", rule.ux), ("cx", rule.cx)):
        if len(signals) < rule.min_signals:
            raise _fail(n, side, f"needs at least min_signals ({rule.min_signals}) indicators")
        for s in signals:
            if rule.kind_of(s.indicator) not in (rule.window_kind, "session"):
                raise _fail(n, side, f"{s.indicator} is not computed in {rule.window_kind} windows")


def parse_rules(raws: Iterable[Mapping[str, Any]]) -> list[Rule]:
    rules = [parse_rule(raw) for raw in raws]
    names = [r.name for r in rules]
    for name in names:
        if names.count(name) > 1:
            raise RuleError(f"alert rule {name!r}, field 'name': two rules share this name")
    return rules


# ---------------------------------------------------------------------------------------------------- statistics


def wilson_interval(successes: float, n: float, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a proportion; (0, 1) for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    z = statistics.NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = min(max(successes / n, 0.0), 1.0)
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def robust_z(value: float, history: Sequence[float], min_mad: float = 0.0) -> tuple[float, float, float]:
    """(z, median, scale): how many robust standard deviations (1.4826 x MAD) value lies from the median."""
    median = statistics.median(history)
    mad = statistics.median(abs(x - median) for x in history)
    scale = max(1.4826 * mad, min_mad, 1e-12)
    return (value - median) / scale, median, scale


def seasonal_hours(window_start_ms: int, weeks: int) -> list[int]:
    """Starts of the same hour of the week in the `weeks` weeks before, most recent first."""
    hour = window_start_ms - window_start_ms % HOUR_MS
    return [hour - k * WEEK_MS for k in range(1, weeks + 1)]


# ---------------------------------------------------------------------------------------------------- judging


@dataclass(frozen=True, slots=True)
class Completeness:
    """How whole a judged window was: partitions closed by their watermark vs by idle timeout, and the tenant's
    channels that reported in it vs those that reported in the last hour of windows."""

    partitions: int = 0
    closed_by_watermark: tuple[int, ...] = ()
    closed_by_idle: tuple[int, ...] = ()
    channels_reporting: tuple[str, ...] = ()
    channels_expected: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"partitions": self.partitions, "closed_by_watermark": list(self.closed_by_watermark),
                "closed_by_idle": list(self.closed_by_idle), "channels_reporting": list(self.channels_reporting),
                "channels_expected": list(self.channels_expected)}


@dataclass(frozen=True, slots=True)
class Observation:
    """One series in one window: breaching, recovered (beyond the recovery threshold), or neither."""

    tenant: str
    channel: str
    breaching: bool
    recovered: bool
    value: float | None
    values: tuple[tuple[str, float], ...] = ()  # everything that led to the verdict (counts, intervals, signals)
    summary: str = ""
    judged: bool = True  # False: data, but too little to judge (too few observations, too short a history)


def _clock(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")


def _shown(value: float, indicator: str) -> str:
    unit = BY_ID[indicator].unit
    return f"{value:.1%}" if unit == "ratio" else f"{value:,.1f} {unit}"


def _wanted(rule: Rule, total: WindowTotal) -> bool:
    return ((not rule.tenants or total.tenant in rule.tenants)
            and (not rule.channels or total.channel in rule.channels))


def observe(rule: Rule, totals: Sequence[WindowTotal], baselines: Mapping[tuple[str, str, str], Sequence[float]]
            ) -> list[Observation]:
    """The rule's observations of one window, one per series with data."""
    out: list[Observation] = []
    if rule.kind == "divergence":
        return list(_divergence(rule, totals))
    if rule.kind == "no_data":
        seen = {(t.tenant, t.channel) for t in totals if t.denominator > 0 and _wanted(rule, t)}
        return [Observation(tenant, channel, False, True, None) for tenant, channel in sorted(seen)]
    for t in totals:
        if t.indicator != rule.indicator or t.window_kind != rule.window_kind or not _wanted(rule, t):
            continue
        value = t.value
        if t.denominator < max(rule.min_count, 1e-9) or value is None:
            out.append(Observation(t.tenant, t.channel, False, False, value, (("count", t.denominator),),
                                   f"only {t.denominator:.0f} observations", judged=False))
            continue
        base = (("count", t.denominator), ("value", value))
        above = rule.comparison == "above"
        if rule.kind == "threshold":
            breaching = value > rule.threshold if above else value < rule.threshold
            recovered = value <= rule.recovery() if above else value >= rule.recovery()
            out.append(Observation(t.tenant, t.channel, breaching, recovered, value, base,
                                   f"{_shown(value, rule.indicator)} ({t.numerator:.0f} of {t.denominator:.0f})"))
        elif rule.kind == "wilson":
            low, high = wilson_interval(t.numerator, t.denominator, rule.confidence)
            breaching = low > rule.threshold if above else high < rule.threshold
            recovered = value <= rule.recovery() if above else value >= rule.recovery()
            out.append(Observation(t.tenant, t.channel, breaching, recovered, value,
                                   (*base, ("interval_low", low), ("interval_high", high)),
                                   f"{_shown(value, rule.indicator)}, {rule.confidence:.0%} interval "
                                   f"[{low:.1%}, {high:.1%}] (n={t.denominator:.0f})"))
        else:  # seasonal
            history = baselines.get((t.tenant, t.channel, t.indicator), ())
            if len(history) < rule.min_weeks:
                out.append(Observation(t.tenant, t.channel, False, False, value, base,
                                       f"history of {len(history)} weeks, {rule.min_weeks} needed", judged=False))
                continue
            z, median, scale = robust_z(value, history, rule.min_mad)
            breaching = (z > rule.z if rule.comparison == "above" else z < -rule.z if rule.comparison == "below"
                         else abs(z) > rule.z)
            out.append(Observation(t.tenant, t.channel, breaching, abs(z) <= rule.z, value,
                                   (*base, ("baseline_median", median), ("baseline_scale", scale), ("z", z),
                                    ("history_weeks", float(len(history)))),
                                   f"{_shown(value, rule.indicator)} vs usual {_shown(median, rule.indicator)} "
                                   f"for this hour of the week (z={z:+.1f}, {len(history)} weeks)"))
    return out


def _divergence(rule: Rule, totals: Sequence[WindowTotal]) -> Iterable[Observation]:
    # Sum every channel of a tenant: the verdict is about the tenant's whole experience.
    sums: dict[tuple[str, str], list[float]] = {}
    sketches: dict[tuple[str, str], WindowTotal] = {}
    wanted = {(s.indicator, rule.kind_of(s.indicator)) for s in (*rule.ux, *rule.cx)}
    for t in totals:
        if (t.indicator, t.window_kind) not in wanted or (rule.tenants and t.tenant not in rule.tenants):
            continue
        acc = sums.setdefault((t.tenant, t.indicator), [0.0, 0.0])
        acc[0] += t.numerator
        acc[1] += t.denominator
        sketches[(t.tenant, t.indicator)] = t
    for tenant in sorted({tenant for tenant, _ in sums}):
        values: list[tuple[str, float]] = []
        verdicts: dict[str, str] = {}
        for side, signals in (("ux", rule.ux), ("cx", rule.cx)):
            votes = {"bad": 0, "good": 0, "neutral": 0}
            for s in signals:
                pair = sums.get((tenant, s.indicator))
                if pair is None or pair[1] < max(rule.min_count, 1e-9):
                    continue
                if BY_ID[s.indicator].kind == Kind.QUANTILE:
                    value = sketches[(tenant, s.indicator)].value  # one channel's sketch: quantiles don't add
                    if value is None:
                        continue
                else:
                    value = pair[0] / pair[1]
                votes[s.verdict(value)] += 1
                values.append((s.indicator, value))
            if votes["bad"] >= rule.min_signals and votes["bad"] > votes["good"]:
                verdicts[side] = "bad"
            elif votes["good"] >= rule.min_signals and votes["bad"] == 0:
                verdicts[side] = "good"
            else:
                verdicts[side] = "unclear"
            values += [(f"{side}_bad_signals", float(votes["bad"])), (f"{side}_good_signals", float(votes["good"]))]
        ux, cx = verdicts["ux"], verdicts["cx"]
        target = ("bad", "good") if rule.divergence == "ux_bad_cx_good" else ("good", "bad")
        breaching = (ux, cx) == target
        # Hysteresis: a firing divergence resolves once either side no longer holds its verdict at all.
        recovered = (ux not in (target[0], "unclear")) or (cx not in (target[1], "unclear"))
        shown = ", ".join(f"{name} {_shown(v, name)}" for name, v in values if name in BY_ID)
        yield Observation(tenant, "ALL", breaching, recovered, None, tuple(values),
                          f"UX {ux}, CX {cx} ({shown})")


# ---------------------------------------------------------------------------------------------------- lifecycle


def fingerprint(rule: str, tenant: str, channel: str, labels: Iterable[tuple[str, str]] = ()) -> str:
    text = "\x00".join([rule, tenant, channel, *(f"{k}={v}" for k, v in sorted(labels))])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass(slots=True)
class Series:
    """The lifecycle state of one alert series; a plain record so it can be stored and restored."""

    fingerprint: str
    rule: str
    tenant: str
    channel: str
    state: str = State.INACTIVE.value
    breaches: int = 0  # consecutive breaching windows
    missing: int = 0  # consecutive windows without data
    since_ms: int = 0  # wall time the current state began
    active_window_end_ms: int = 0  # end of the first breaching window of the current pending/firing spell
    last_breach_end_ms: int = 0
    value: float | None = None
    acked_by: str = ""
    acked_at_ms: int = 0
    escalation_level: int = 0
    window_end_ms: int = 0  # last window judged

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Series:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One transition of one alert series."""

    event_id: str
    fingerprint: str
    rule: str
    rule_kind: str
    severity: str
    family: str
    tenant: str
    channel: str
    from_state: str
    to_state: str
    window_kind: str
    window_start_ms: int
    window_end_ms: int
    value: float | None
    threshold: float
    values: tuple[tuple[str, float], ...]
    message: str
    completeness: Completeness
    at_ms: int
    cause: str = "judged"  # judged, manual, no_data
    actor: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    active_since_ms: int = 0

    def label_map(self) -> dict[str, str]:
        return {"alertname": self.rule, "rule": self.rule, "tenant": self.tenant, "channel": self.channel,
                "severity": self.severity, "family": self.family, "window_kind": self.window_kind,
                **dict(self.labels)}


def event_id(fp: str, window_end_ms: int, from_state: str, to_state: str, cause: str) -> str:
    return hashlib.sha1(f"{fp}|{window_end_ms}|{from_state}|{to_state}|{cause}".encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class Window:
    """A closed window being judged: its kind, bounds and completeness."""

    kind: str
    start_ms: int
    end_ms: int
    completeness: Completeness = field(default_factory=Completeness)


def step(rule: Rule, series: Series, obs: Observation | None, present: bool, window_end_ms: int,
         now_ms: int) -> tuple[str, str] | None:
    """Advance one series by one window; returns (from, to) when its state changed. `present` is False when the
    series had no data at all in the window; obs is None when it had data but too little to judge."""
    before = series.state
    series.window_end_ms = window_end_ms
    if not present:
        series.missing += 1
        if rule.no_data_windows and series.missing >= rule.no_data_windows and before != State.NO_DATA:
            series.state, series.breaches = State.NO_DATA.value, 0
    elif obs is None:
        series.missing = 0
        if before == State.NO_DATA:
            series.state = State.INACTIVE.value
    else:
        series.missing = 0
        if obs.value is not None:
            series.value = obs.value
        if obs.breaching:
            series.breaches += 1
            series.last_breach_end_ms = window_end_ms
            if before in (State.INACTIVE, State.RESOLVED, State.NO_DATA):
                series.active_window_end_ms = window_end_ms
                series.state = (State.FIRING if series.breaches >= rule.for_windows else State.PENDING).value
            elif before == State.PENDING and series.breaches >= rule.for_windows:
                series.state = State.FIRING.value
        else:
            series.breaches = 0
            if before == State.PENDING:
                series.state = State.INACTIVE.value
            elif before == State.NO_DATA:
                series.state = State.INACTIVE.value
            elif before == State.FIRING and obs.recovered and (
                    window_end_ms - series.last_breach_end_ms >= rule.keep_firing_for_s * 1000):
                series.state = State.RESOLVED.value
    if series.state == before:
        return None
    series.since_ms = now_ms
    if series.state != State.FIRING:
        series.acked_by, series.acked_at_ms, series.escalation_level = "", 0, 0
    return before, series.state


class AlertEngine:
    """Judges closed windows with the rules, keeping every series' lifecycle state."""

    def __init__(self, rules: Sequence[Rule], window_lengths_ms: Mapping[str, int]) -> None:
        self.rules = list(rules)
        self.lengths = dict(window_lengths_ms)
        self.series: dict[str, Series] = {}
        self._by_rule: dict[str, dict[tuple[str, str], str]] = {r.name: {} for r in self.rules}
        self._rule = {r.name: r for r in self.rules}
        self._channels: dict[str, dict[str, int]] = {}  # tenant -> channel -> end of the last window with data
        self._reporting: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}  # of the window being judged

    def indicators(self) -> dict[str, set[str]]:
        """Indicators each window kind must be read for (None-like empty set means every indicator)."""
        wanted: dict[str, set[str]] = {}
        for rule in self.rules:
            if rule.kind == "no_data":
                wanted.setdefault(rule.window_kind, set()).add("*")
            for indicator in rule.indicators():
                wanted.setdefault(rule.kind_of(indicator), set()).add(indicator)
        return wanted

    def restore(self, series: Iterable[Series]) -> None:
        for s in series:
            if s.rule in self._rule:
                self.series[s.fingerprint] = s
                self._by_rule[s.rule][(s.tenant, s.channel)] = s.fingerprint

    def _series(self, rule: Rule, tenant: str, channel: str) -> Series:
        fp = self._by_rule[rule.name].get((tenant, channel))
        if fp is None:
            fp = fingerprint(rule.name, tenant, channel, rule.labels)
            self.series[fp] = Series(fp, rule.name, tenant, channel)
            self._by_rule[rule.name][(tenant, channel)] = fp
        return self.series[fp]

    def judge(self, end_ms: int, totals: Sequence[WindowTotal], now_ms: int,
              completeness: Completeness = Completeness(),
              baselines: Mapping[tuple[str, str, str], Sequence[float]] | None = None) -> list[AlertEvent]:
        """Every rule over the windows of every kind ending at `end_ms` (totals of any kind ending there)."""
        events: list[AlertEvent] = []
        reporting: dict[str, set[str]] = {}
        for t in totals:
            if t.denominator > 0 and t.channel != "ALL":
                reporting.setdefault(t.tenant, set()).add(t.channel)
        for tenant, channels in reporting.items():
            for channel in channels:
                self._channels.setdefault(tenant, {})[channel] = end_ms
        recent = end_ms - 60 * self.lengths.get("1m", 60_000)
        self._reporting = {tenant: (tuple(sorted(reporting.get(tenant, ()))),
                                    tuple(sorted(c for c, last in seen.items() if last > recent)))
                           for tenant, seen in self._channels.items()}
        for rule in self.rules:
            window = Window(rule.window_kind, end_ms - self.lengths.get(rule.window_kind, 60_000), end_ms,
                            completeness)
            kinds = {rule.kind_of(i) for i in rule.indicators()} or {rule.window_kind}
            mine = [t for t in totals if t.window_kind in kinds]
            observations = observe(rule, mine, baselines or {})
            seen: set[tuple[str, str]] = set()
            for obs in observations:
                key = (obs.tenant, obs.channel)
                seen.add(key)
                judged = obs if obs.judged else None
                events += self._advance(rule, self._series(rule, *key), judged, True, window, now_ms, obs)
            for key, fp in list(self._by_rule[rule.name].items()):
                if key not in seen:
                    events += self._advance(rule, self.series[fp], None, False, window, now_ms, None)
        return events

    def _advance(self, rule: Rule, series: Series, obs: Observation | None, present: bool, window: Window,
                 now_ms: int, shown: Observation | None) -> list[AlertEvent]:
        changed = step(rule, series, obs, present, window.end_ms, now_ms)
        if changed is None:
            return []
        cause = "no_data" if not present else "judged"
        detail = shown.summary if shown is not None else "no data"
        return [self._event(rule, series, changed, window, now_ms, cause, "",
                            shown.values if shown is not None else (), detail)]

    def _event(self, rule: Rule, series: Series, changed: tuple[str, str], window: Window, now_ms: int,
               cause: str, actor: str, values: tuple[tuple[str, float], ...], detail: str) -> AlertEvent:
        before, after = changed
        what = rule.indicator or rule.divergence if rule.kind != "no_data" else "data"
        where = series.tenant if series.channel == "ALL" else f"{series.tenant} {series.channel}"
        message = (f"{rule.name} {after} for {where}: {what} {detail} in "
                   f"{_clock(window.start_ms)}-{_clock(window.end_ms)[-5:]} UTC ({rule.window_kind})")
        reporting, expected = self._reporting.get(series.tenant, ((), ()))
        window = replace(window, completeness=replace(window.completeness, channels_reporting=reporting,
                                                      channels_expected=expected))
        if window.completeness.closed_by_idle:
            message += (f"; partitions {', '.join(map(str, window.completeness.closed_by_idle))} closed by idle "
                        "timeout")
        return AlertEvent(
            event_id=event_id(series.fingerprint, window.end_ms, before, after, cause),
            fingerprint=series.fingerprint, rule=rule.name, rule_kind=rule.kind, severity=rule.severity,
            family=rule.family, tenant=series.tenant, channel=series.channel, from_state=before, to_state=after,
            window_kind=rule.window_kind, window_start_ms=window.start_ms, window_end_ms=window.end_ms,
            value=None if cause == "no_data" else series.value, threshold=rule.threshold, values=values,
            message=message,
            completeness=window.completeness, at_ms=now_ms, cause=cause, actor=actor, labels=rule.labels,
            active_since_ms=series.active_window_end_ms)

    def acknowledge(self, fp: str, actor: str, now_ms: int) -> bool:
        series = self.series.get(fp)
        if series is None or series.state != State.FIRING:
            return False
        series.acked_by, series.acked_at_ms = actor or "someone", now_ms
        return True

    def resolve_by_hand(self, fp: str, actor: str, now_ms: int) -> AlertEvent | None:
        series = self.series.get(fp)
        if series is None or series.state not in (State.FIRING, State.PENDING, State.NO_DATA):
            return None
        rule = self._rule[series.rule]
        before = series.state
        series.state, series.breaches, series.since_ms = State.RESOLVED.value, 0, now_ms
        series.acked_by, series.acked_at_ms, series.escalation_level = "", 0, 0
        window = Window(rule.window_kind, series.window_end_ms - self.lengths.get(rule.window_kind, 60_000),
                        series.window_end_ms)
        return replace(self._event(rule, series, (before, series.state), window, now_ms, "manual", actor, (),
                                   f"resolved by hand by {actor or 'someone'}"),
                       event_id=event_id(fp, now_ms, before, series.state, "manual"))
