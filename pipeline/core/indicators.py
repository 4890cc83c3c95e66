"""The indicator registry: one place defines each CX and UX indicator, and the stream, the tests and the
docs all read it. An indicator is a ratio of two sums (numerator / denominator), so per-partition and
per-window partials add up exactly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

Observation = tuple[str, float, float]  # (channel the observation is about, numerator, denominator)


class Family(StrEnum):
    CX = "CX"  # the whole journey across touchpoints
    CS = "CS"  # customer support: single interactions where someone has a problem (part of CX)
    UX = "UX"  # the interaction with the product itself


@dataclass(frozen=True, slots=True)
class Indicator:
    id: str
    family: Family
    name: str
    definition: str
    unit: str
    fed_by: str
    observe: Callable[[dict[str, Any]], Observation | None]


def _csat(event: dict[str, Any]) -> Observation | None:
    survey = event.get("survey")
    if survey is None or survey["kind"] != "CSAT":
        return None
    # Top-two-box: 4-5 on the usual 1-5 scale, the two best answers on any other scale.
    satisfied = survey["score"] >= survey["scale_max"] - 1
    return survey.get("about_channel") or event["channel"], float(satisfied), 1.0


def _task_success(event: dict[str, Any]) -> Observation | None:
    outcome = event.get("outcome")
    if event["event_type"] != "task" or outcome is None:
        return None
    return event["channel"], float(outcome == "SUCCESS"), 1.0


PRODUCT_INTERACTIONS = frozenset({"page_view", "screen_view", "task", "app_error", "app_crash"})
_ERROR_TYPES = frozenset({"app_error", "app_crash"})


def _error(event: dict[str, Any]) -> Observation | None:
    event_type = event["event_type"]
    if event_type not in PRODUCT_INTERACTIONS:
        return None
    failed = (event_type in _ERROR_TYPES or event.get("error_code") is not None
              or event.get("outcome") == "FAILURE")
    return event["channel"], float(failed), 1.0


REGISTRY: tuple[Indicator, ...] = (
    Indicator(
        id="csat", family=Family.CX, name="Customer satisfaction (CSAT)",
        definition="Share of CSAT answers in the top two boxes (4-5 on a 1-5 scale), attributed to the "
                   "channel the question was about.",
        unit="ratio", fed_by="survey_response with survey.kind = CSAT", observe=_csat,
    ),
    Indicator(
        id="task_success_rate", family=Family.UX, name="Task success rate",
        definition="Share of product task attempts whose outcome is SUCCESS.",
        unit="ratio", fed_by="task events with an outcome", observe=_task_success,
    ),
    Indicator(
        id="error_rate", family=Family.UX, name="Error rate",
        definition="Share of product interactions (page/screen views, tasks, app errors and crashes) that "
                   "met an error: an error_code, a FAILURE outcome, or an app_error/app_crash event.",
        unit="ratio", fed_by=", ".join(sorted(PRODUCT_INTERACTIONS)), observe=_error,
    ),
)

BY_ID: dict[str, Indicator] = {indicator.id: indicator for indicator in REGISTRY}
