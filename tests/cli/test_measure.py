"""The demo's measuring functions, on made-up numbers: no database, no threads."""

from __future__ import annotations

import collections
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from singleflight.cli.measure import (
    ZipfKeys,
    bucket_rates,
    duplicate_queries,
    most_at_once,
    peak_rate,
    percentile,
    summarize,
)

# -- Zipf key choice ---------------------------------------------------------------------


def test_zipf_draws_follow_the_law() -> None:
    keys = [101, 202, 303, 404, 505]
    pick = ZipfKeys(keys, 1.0)
    rng = random.Random(7)
    draws = collections.Counter(pick(rng) for _ in range(100_000))
    harmonic = sum(1 / r for r in range(1, 6))
    for rank, key in enumerate(keys, start=1):
        expected = 1 / rank / harmonic
        assert pick.share(rank - 1) == pytest.approx(expected)
        assert draws[key] / 100_000 == pytest.approx(expected, abs=0.01)
    assert set(draws) == set(keys)


def test_zipf_exponent_zero_is_uniform_and_higher_is_more_skewed() -> None:
    keys = list(range(100))
    assert ZipfKeys(keys, 0).share(0) == pytest.approx(0.01)
    assert ZipfKeys(keys, 0).share(99) == pytest.approx(0.01)
    assert ZipfKeys(keys, 1.1).share(0) > ZipfKeys(keys, 0.8).share(0) > 0.01
    # what the demo's help and docs say of the default
    assert ZipfKeys(keys, 1.1).share(0) == pytest.approx(0.23, abs=0.01)
    assert sum(ZipfKeys(keys, 1.1).share(r) for r in range(10)) == pytest.approx(0.63, abs=0.01)


def test_zipf_is_deterministic_for_a_seed() -> None:
    pick = ZipfKeys(list(range(50)), 1.1)
    first = [pick(random.Random(3)) for _ in range(5)]
    assert first == [pick(random.Random(3)) for _ in range(5)]
    a, b = random.Random(3), random.Random(3)
    assert [pick(a) for _ in range(200)] == [pick(b) for _ in range(200)]


@pytest.mark.parametrize(("keys", "s"), [([], 1.0), ([1], -1.0), ([1], float("nan"))])
def test_zipf_rejects_what_it_cannot_draw_from(keys: list[int], s: float) -> None:
    with pytest.raises(ValueError):
        ZipfKeys(keys, s)


@given(st.lists(st.integers(), min_size=1, max_size=30, unique=True), st.floats(0, 5))
def test_zipf_only_draws_its_keys(keys: list[int], s: float) -> None:
    pick = ZipfKeys(keys, s)
    rng = random.Random(0)
    assert all(pick(rng) in keys for _ in range(50))


# -- latency percentiles -------------------------------------------------------------------


def test_percentile_by_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1
    assert percentile([5.0], 99) == 5
    assert percentile([], 50) == 0.0


# -- per-second bucketing ------------------------------------------------------------------


def test_bucket_rates_are_per_second() -> None:
    times = [0.0, 0.1, 0.2, 0.3, 0.6, 1.9, 2.0, -0.1]
    rates = bucket_rates(times, duration=2.0, width=0.5)
    # buckets [0,.5) [.5,1) [1,1.5) [1.5,2); 2.0 and -0.1 fall outside
    assert rates == [8.0, 2.0, 0.0, 2.0]


def test_bucket_rates_count_every_event_once() -> None:
    rng = random.Random(1)
    times = [rng.uniform(0, 10) for _ in range(1000)]
    rates = bucket_rates(times, duration=10.0, width=0.25)
    assert len(rates) == 40
    assert sum(rate * 0.25 for rate in rates) == pytest.approx(1000)


def test_peak_rate_skips_the_buckets_before_since() -> None:
    rates = [100.0, 5.0, 7.0, 3.0]
    assert peak_rate(rates, width=0.5, since=0.5) == 7.0
    assert peak_rate(rates, width=0.5, since=0.0) == 100.0
    assert peak_rate(rates, width=0.5, since=5.0) == 0.0


# -- duplicates and concurrency --------------------------------------------------------------


def test_duplicates_are_queries_of_a_key_that_overlap() -> None:
    log = [
        (0.00, 0.10, 1),  # the first query of key 1
        (0.02, 0.12, 1),  # started while it ran: a duplicate
        (0.11, 0.20, 1),  # started while the second one ran: a duplicate
        (0.50, 0.60, 1),  # after all of them: a new load, not a duplicate
        (0.05, 0.15, 2),  # another key at the same time: not a duplicate
    ]
    assert duplicate_queries(log) == 2
    assert duplicate_queries([]) == 0


def test_a_query_starting_as_another_ends_is_not_a_duplicate() -> None:
    assert duplicate_queries([(0.0, 1.0, 7), (1.0, 2.0, 7)]) == 0
    assert most_at_once([(0.0, 1.0, 7), (1.0, 2.0, 8)]) == 1


def test_most_at_once() -> None:
    log = [(0.0, 1.0, 1), (0.5, 1.5, 2), (0.6, 0.7, 3), (2.0, 3.0, 4)]
    assert most_at_once(log) == 3
    assert most_at_once([]) == 0


@given(
    st.lists(
        st.tuples(st.floats(0, 100), st.floats(0, 5), st.integers(0, 5)),
        max_size=40,
    )
)
def test_duplicates_never_exceed_queries_minus_keys(
    raw: list[tuple[float, float, int]],
) -> None:
    log = [(start, start + length, key) for start, length, key in raw]
    duplicates = duplicate_queries(log)
    assert 0 <= duplicates <= len(log) - len({key for _, _, key in log})
    assert most_at_once(log) <= len(log)
    # a log of one key whose queries never overlap has no duplicates
    serial = []
    t = 0.0
    for _, length, _ in raw:
        serial.append((t, t + length, 9))
        t += length + 0.001
    assert duplicate_queries(serial) == 0


# -- the summary line --------------------------------------------------------------------


def test_summarize() -> None:
    log = [
        (0.01, 0.05, 1),
        (0.02, 0.06, 1),  # duplicate
        (0.03, 0.04, 2),
        (0.20, 0.21, 3),
        (3.01, 3.02, 1),
        (3.02, 3.03, 2),
        (3.10, 3.20, 3),
    ]
    latencies = [0.001] * 98 + [0.05, 2.0]
    s = summarize(
        "naive", "naive cache-aside", latencies, 2, log, duration=4.0, ttl=3.0, width=0.25
    )
    assert (s.mode, s.title, s.requests, s.errors) == ("naive", "naive cache-aside", 100, 2)
    assert s.queries == 7
    assert s.duplicates == 1
    assert s.most_at_once == 3
    assert s.keys_queried == 3
    assert s.p50 == 0.001
    assert s.p99 == 0.05
    assert s.max == 2.0
    assert len(s.rates) == 16
    assert s.rates[0] == 4 / 0.25
    assert s.rates[12] == 3 / 0.25  # [3.0, 3.25)
    # the cold start at 0 is left out of the peak at expiry
    assert s.peak_qps == 3 / 0.25
