"""The quantile sketch: mergeable exactly, and within its stated relative error of the exact quantile."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.sketch import ALPHA, GAMMA, ZERO_KEY, exact_quantile, key_of, merge, of_values, quantile, value_of

values = st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e9, allow_nan=False), st.integers(0, 10**7).map(float)),
                  max_size=200)
qs = st.sampled_from([0.0, 0.01, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0])


@settings(max_examples=300, deadline=None)
@given(values, values, values)
def test_merge_is_associative_commutative_and_equals_the_sketch_of_the_concatenation(a, b, c):
    sa, sb, sc = of_values(a), of_values(b), of_values(c)
    assert merge(sa, sb) == merge(sb, sa)
    assert merge(merge(sa, sb), sc) == merge(sa, merge(sb, sc)) == merge(sa, sb, sc)
    assert merge(sa, sb, sc) == of_values(a + b + c)


@settings(max_examples=300, deadline=None)
@given(values.filter(bool), qs)
def test_quantile_is_within_alpha_of_the_exact_value(xs, q):
    exact = exact_quantile(xs, q)
    estimate = quantile(of_values(xs), q)
    assert abs(estimate - exact) <= ALPHA * exact * (1 + 1e-9) + 1e-9  # float rounding of the bucket edges


def test_buckets_follow_the_definition():
    assert key_of(0.0) == key_of(-3.0) == key_of(1e-10) == ZERO_KEY and value_of(ZERO_KEY) == 0.0
    assert key_of(1.0) == 0 and key_of(GAMMA) == 1 and key_of(GAMMA * 1.0001) == 2
    assert value_of(0) == 2 / (GAMMA + 1)
    assert key_of(1000.0) == math.ceil(math.log(1000.0) / math.log(GAMMA))


def test_quantile_uses_the_lower_rank():
    sketch = of_values([10.0, 20.0, 30.0, 40.0])
    assert math.isclose(quantile(sketch, 0.75), 30.0, rel_tol=ALPHA)  # rank floor(0.75 * 3) = 2
    assert math.isclose(quantile(sketch, 0.5), 20.0, rel_tol=ALPHA)  # rank 1
    assert quantile((), 0.5) is None and exact_quantile([], 0.5) is None
    assert quantile(of_values([0.0, 0.0, 5.0]), 0.5) == 0.0
