"""Step 3, enrich: who the touchpoint belongs to. This first identity step infers the person and their role
from the identifiers the event carries; the cross-channel identity graph builds on it."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pipeline.core.validate import BLANK_IDENTIFIERS


class Role(StrEnum):
    VISITOR = "visitor"  # only an anonymous or device id: not known to use or have bought anything
    USER = "user"  # signed in to the product or service, free or paid
    CUSTOMER = "customer"  # known to billing/CRM: has bought from us


def _present(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in BLANK_IDENTIFIERS


def person_and_role(identifiers: dict[str, Any]) -> tuple[str, Role]:
    """The most stable identifier present names the person; the strongest one implies the role."""
    customer_id = identifiers["customer_id"]
    if customer_id is not None and _present(customer_id):
        return "customer:" + customer_id, Role.CUSTOMER
    user_id = identifiers["user_id"]
    if user_id is not None and _present(user_id):
        return "user:" + user_id, Role.USER
    return "anonymous:" + identifiers["anonymous_id"], Role.VISITOR
