"""The quantile sketch as its specification states it, written independently of pipeline/core/sketch.py, so
the SQL and the code are checked against the definition rather than against each other."""

from __future__ import annotations

import math

ALPHA = 0.01
GAMMA = (1 + ALPHA) / (1 - ALPHA)
ZERO_KEY = -(2**31) + 1


def spec_key(x: float) -> int:
    return ZERO_KEY if x <= 1e-9 else math.ceil(math.log(x) / math.log(GAMMA))


def spec_quantile(buckets: dict[int, int], q: float) -> float:
    n = sum(buckets.values())
    cumulative = 0
    for key in sorted(buckets):
        cumulative += buckets[key]
        if cumulative > q * (n - 1):
            return 0.0 if key == ZERO_KEY else 2 * GAMMA**key / (GAMMA + 1)
    raise AssertionError("unreachable: the last key's cumulative count is n")
