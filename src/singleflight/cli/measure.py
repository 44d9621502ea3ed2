"""What the demo measures, in plain functions that know nothing of threads or databases.

Zipf key choice, the summary of a mode's run (latency percentiles, queries
per second per time bucket, the peak at expiries, duplicate queries), all
from lists of numbers, so each can be tested on made-up data.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ModeSummary",
    "ZipfKeys",
    "bucket_rates",
    "duplicate_queries",
    "most_at_once",
    "percentile",
    "peak_rate",
    "summarize",
]


class ZipfKeys:
    """Draws from ``keys`` with Zipf's law: the key of rank ``r`` (from 1) has weight ``r**-s``.

    ``keys[0]`` is the hottest.  With ``s = 1.1`` over 100 keys, the hottest
    takes about 23% of the draws and the ten hottest about 63%.
    """

    __slots__ = ("_cumulative", "_keys", "_total")

    def __init__(self, keys: Sequence[int], s: float) -> None:
        if not keys:
            raise ValueError("ZipfKeys needs at least one key")
        if not s >= 0:
            raise ValueError(f"the Zipf exponent must be >= 0; got {s!r}")
        self._keys = list(keys)
        self._cumulative: list[float] = list(
            itertools.accumulate(float(r) ** -s for r in range(1, len(keys) + 1))
        )
        self._total = self._cumulative[-1]

    def share(self, rank: int) -> float:
        """The probability of drawing ``keys[rank]``."""
        low = self._cumulative[rank - 1] if rank else 0.0
        return (self._cumulative[rank] - low) / self._total

    def __call__(self, rng: random.Random) -> int:
        i = bisect.bisect_right(self._cumulative, rng.random() * self._total)
        return self._keys[min(i, len(self._keys) - 1)]


def percentile(ordered: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100) of sorted values, by nearest rank; 0.0 for none."""
    if not ordered:
        return 0.0
    rank = math.ceil(p / 100 * len(ordered))
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def bucket_rates(times: Iterable[float], duration: float, width: float) -> list[float]:
    """Events per second in consecutive buckets of ``width`` seconds over ``[0, duration)``.

    Times before 0 or from ``duration`` on are left out.
    """
    buckets = [0] * max(1, math.ceil(duration / width - 1e-9))
    for t in times:
        if 0 <= t < duration:
            buckets[min(int(t / width), len(buckets) - 1)] += 1
    return [count / width for count in buckets]


def peak_rate(rates: Sequence[float], width: float, since: float) -> float:
    """The highest rate among the buckets that start at ``since`` or later."""
    first = math.ceil(since / width - 1e-9)
    return max(rates[first:], default=0.0)


Query = tuple[float, float, int]  # (started, finished, key) of one executed query


def duplicate_queries(log: Iterable[Query]) -> int:
    """Queries that started while a query of the same key was still running.

    That is the stampede's waste: every caller that missed ran the query
    itself rather than wait for the one already running.  Coalescing makes it
    zero; a refresh of a key long after its last load is not counted.
    """
    running_until: dict[int, float] = {}
    duplicates = 0
    for started, finished, key in sorted(log):
        until = running_until.get(key)
        if until is not None and started < until:
            duplicates += 1
            running_until[key] = max(until, finished)
        else:
            running_until[key] = finished
    return duplicates


def most_at_once(log: Iterable[Query]) -> int:
    """The largest number of queries running at the same moment."""
    events = sorted(
        [(started, 1) for started, _, _ in log] + [(finished, -1) for _, finished, _ in log],
        key=lambda event: (event[0], event[1]),  # an end before a start at the same instant
    )
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


@dataclass(frozen=True, slots=True)
class ModeSummary:
    """One line of the demo's table."""

    mode: str
    title: str
    requests: int
    errors: int
    queries: int
    duplicates: int
    most_at_once: int
    keys_queried: int
    per_key_per_ttl: float  # DB queries per key queried per TTL of the run
    peak_qps: float  # the highest DB queries/s from the first expiry on
    p50: float  # seconds
    p99: float
    max: float
    rates: list[float]  # DB queries/s per bucket, for the chart


def per_key_per_ttl(log: Sequence[Query], duration: float, ttl: float) -> float:
    """DB queries per key queried per TTL: 1.0 is one load of each key per expiry
    (for the whole fleet of processes), counting the cold start's as one."""
    keys = len({key for _, _, key in log})
    if not keys or duration <= 0 or ttl <= 0:
        return 0.0
    return len(log) / keys / max(1.0, duration / ttl)


def summarize(
    mode: str,
    title: str,
    latencies: Iterable[float],
    errors: int,
    log: Sequence[Query],
    *,
    duration: float,
    ttl: float,
    width: float,
) -> ModeSummary:
    """Reduce one mode's raw run (every request's latency, every executed query's
    ``(started, finished, key)``) to its line in the table."""
    ordered = sorted(latencies)
    rates = bucket_rates((started for started, _, _ in log), duration, width)
    return ModeSummary(
        mode=mode,
        title=title,
        requests=len(ordered),
        errors=errors,
        queries=len(log),
        duplicates=duplicate_queries(log),
        most_at_once=most_at_once(log),
        keys_queried=len({key for _, _, key in log}),
        per_key_per_ttl=per_key_per_ttl(log, duration, ttl),
        # Until half a TTL the cache is being filled (a cold start, not an
        # expiry); from then on, what makes queries are expiries.
        peak_qps=peak_rate(rates, width, ttl / 2),
        p50=percentile(ordered, 50),
        p99=percentile(ordered, 99),
        max=ordered[-1] if ordered else 0.0,
        rates=rates,
    )
