"""Hashed identifiers must be SHA-256 digests: a raw e-mail address or phone number is a contract violation."""

import hashlib

import pytest

from pipeline.core.validate import CONTRACT_VIOLATION, violation
from tests.factories import BASE_MS, touchpoint

DIGEST = hashlib.sha256(b"alice@example.com").hexdigest()


@pytest.mark.parametrize(("kind", "value"), [
    ("email_sha256", "alice@example.com"),
    ("phone_sha256", "+34600111222"),
    ("email_sha256", DIGEST.upper()),  # one person must not become two by letter case
    ("email_sha256", DIGEST[:63]),
    ("phone_sha256", DIGEST + "0"),
])
def test_a_hash_field_that_is_not_a_sha256_digest_is_a_contract_violation(kind, value):
    event = touchpoint(anonymous_id="a-1")
    event["identifiers"][kind] = value
    reason, detail = violation(event, BASE_MS, 300_000)
    assert reason == CONTRACT_VIOLATION
    assert f"identifiers.{kind} is not a SHA-256 digest" in detail and value not in detail  # no raw value in logs


@pytest.mark.parametrize("value", [DIGEST, None, "", "  "])
def test_digests_and_absent_hashes_are_accepted(value):
    event = touchpoint(anonymous_id="a-1")
    event["identifiers"]["email_sha256"] = value
    event["identifiers"]["phone_sha256"] = value
    assert violation(event, BASE_MS, 300_000) is None
