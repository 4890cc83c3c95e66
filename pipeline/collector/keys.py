"""Write keys: who may send for which tenant, how fast, and from which browser origins. Plain Python, time
injected; keys are compared by their SHA-256, never stored."""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import dataclass, field

from pipeline.settings import TenantSettings, WriteKeySettings

KEY_PREFIX = "tpk_"


def new_key() -> str:
    """A fresh write key: 32 random bytes, URL-safe, with a prefix that makes leaked keys easy to grep for."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens a second up to `burst`; one token per event."""

    rate: float
    burst: float
    tokens: float
    updated_s: float

    def take(self, count: int, now_s: float) -> float:
        """Take `count` tokens and return 0, or take none and return the seconds to wait until they are there.
        A request larger than the burst costs the whole burst, so it can still pass once the bucket is full."""
        self.tokens = min(self.burst, self.tokens + (now_s - self.updated_s) * self.rate)
        self.updated_s = now_s
        need = min(float(count), self.burst)
        if self.tokens >= need:
            self.tokens -= need
            return 0.0
        return (need - self.tokens) / self.rate


@dataclass(frozen=True, slots=True)
class Grant:
    tenant: str
    key_id: str
    cors_origins: frozenset[str]
    digest: str

    def allows_origin(self, origin: str | None) -> bool:
        """Server-to-server calls carry no Origin; a browser's must be listed for the tenant."""
        return origin is None or "*" in self.cors_origins or origin in self.cors_origins


class Denied(Exception):
    """A request the keys refuse: status 401, 403 or 429, a one-line reason, and for 429 the seconds to wait."""

    def __init__(self, status: int, reason: str, retry_after_s: int = 0) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class KeyRing:
    tenants: list[TenantSettings]
    _by_digest: dict[str, tuple[TenantSettings, WriteKeySettings]] = field(default_factory=dict)
    _buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for tenant in self.tenants:
            for key in tenant.keys:
                self._by_digest[key.sha256] = (tenant, key)

    def authenticate(self, key: str | None) -> Grant:
        """The tenant a key writes; 401 when the key is missing, unknown or revoked."""
        if not key:
            raise Denied(401, "no write key: send Authorization: Bearer <key> (or ?key=<key> from a browser)")
        digest = key_digest(key)
        found = self._by_digest.get(digest)
        # Constant-time compare of the digest we found, so timing tells nothing about near misses.
        if found is None or not hmac.compare_digest(found[1].sha256, digest):
            raise Denied(401, "unknown write key")
        tenant, settings = found
        if settings.revoked:
            raise Denied(401, f"write key {settings.id} is revoked")
        return Grant(tenant.name, settings.id, frozenset(tenant.cors_origins), digest)

    def admit(self, grant: Grant, events: int, now_s: float) -> None:
        """Charge `events` to the key's rate limit; 429 with the seconds to wait when it is spent."""
        settings = self._by_digest[grant.digest][1]
        bucket = self._buckets.get(grant.digest)
        if bucket is None:
            bucket = self._buckets[grant.digest] = TokenBucket(settings.events_per_s, settings.burst,
                                                               settings.burst, now_s)
        wait_s = bucket.take(events, now_s)
        if wait_s > 0:
            raise Denied(429, f"write key {grant.key_id} is over its limit of {settings.events_per_s:g} events/s",
                         max(1, math.ceil(wait_s)))

    def all_origins(self) -> frozenset[str]:
        return frozenset(o for t in self.tenants for o in t.cors_origins)

    def origins_of_tenant(self, tenant: str) -> frozenset[str]:
        return frozenset(o for t in self.tenants if t.name == tenant for o in t.cors_origins)
