"""A mergeable quantile sketch (DDSketch-style log buckets) with relative accuracy ALPHA.

A value x > MIN_POSITIVE falls in bucket key(x) = ceil(log(x) / log(GAMMA)), GAMMA = (1 + ALPHA) / (1 - ALPHA);
values <= MIN_POSITIVE (zero, or a CLS of 0) fall in ZERO_KEY. A sketch is its buckets as (key, count) pairs
sorted by key, so two sketches merge by adding counts per key: merging is associative and commutative, and the
merge of the sketches of two lists equals the sketch of their concatenation. ClickHouse stores the same pairs
as two arrays and computes the same quantile in SQL.

Stated error: for the exact value v at rank floor(q * (n - 1)) of the sorted values, the estimate e satisfies
|e - v| <= ALPHA * v (for v > MIN_POSITIVE; 0 for values <= MIN_POSITIVE).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

ALPHA = 0.01
GAMMA = (1 + ALPHA) / (1 - ALPHA)
LOG_GAMMA = math.log(GAMMA)
MIN_POSITIVE = 1e-9
ZERO_KEY = -(2**31) + 1  # fits ClickHouse Int32, below every real key

Sketch = tuple[tuple[int, int], ...]  # (key, count) sorted by key
EMPTY: Sketch = ()

_log = math.log
_ceil = math.ceil


def key_of(x: float) -> int:
    """The bucket of a value."""
    if x <= MIN_POSITIVE:
        return ZERO_KEY
    return _ceil(_log(x) / LOG_GAMMA)


def value_of(key: int) -> float:
    """The representative value of a bucket: within ALPHA of every value in (GAMMA^(k-1), GAMMA^k]."""
    if key == ZERO_KEY:
        return 0.0
    return 2 * GAMMA**key / (GAMMA + 1)


def add(buckets: dict[int, int], x: float) -> None:
    """Count one value into mutable buckets (the streaming form of a sketch)."""
    key = ZERO_KEY if x <= MIN_POSITIVE else _ceil(_log(x) / LOG_GAMMA)
    buckets[key] = buckets.get(key, 0) + 1


def freeze(buckets: dict[int, int]) -> Sketch:
    return tuple(sorted(buckets.items()))


def of_values(values: Iterable[float]) -> Sketch:
    buckets: dict[int, int] = {}
    for x in values:
        add(buckets, x)
    return freeze(buckets)


def merge(*sketches: Sketch) -> Sketch:
    """Add counts per key."""
    if len(sketches) == 1:
        return sketches[0]
    buckets: dict[int, int] = {}
    for sketch in sketches:
        for key, count in sketch:
            buckets[key] = buckets.get(key, 0) + count
    return freeze(buckets)


def size(sketch: Sketch) -> int:
    return sum(count for _, count in sketch)


def quantile(sketch: Sketch, q: float) -> float | None:
    """The q-quantile (lower rank floor(q * (n - 1))) of the values sketched; None for an empty sketch."""
    n = size(sketch)
    if n == 0:
        return None
    rank = math.floor(q * (n - 1))
    cumulative = 0
    for key, count in sketch:
        cumulative += count
        if cumulative > rank:
            return value_of(key)
    raise AssertionError("unreachable: the rank is below n")


def exact_quantile(values: Iterable[float], q: float) -> float | None:
    """The exact value the sketch estimates: the value at rank floor(q * (n - 1)) of the sorted values."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[math.floor(q * (len(ordered) - 1))]
