"""The pure policy and store: decisions, windows, XFetch, leases, eviction.

No threads or event loops here: the policy and store are plain code, so their
decisions are checked directly, with hypothesis where a property fits.
"""

from __future__ import annotations

import inspect
import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from singleflight import LoadingCache, RemoteError
from singleflight.cache._policy import (
    EARLY,
    FRESH,
    MAX_DRAW,
    MISS,
    STALE,
    Policy,
    named_as,
    not_found,
)
from singleflight.cache._store import JOIN, LOAD, REFRESH, SERVE, Store
from singleflight.errors import type_name

pytestmark = pytest.mark.timeout(60)

seconds = st.floats(min_value=0.001, max_value=1e6, allow_nan=False, allow_infinity=False)
draws = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


def policy(**options: Any) -> Policy:
    """A Policy with ``options`` and, for the rest, a LoadingCache's defaults."""
    defaults = inspect.signature(LoadingCache).parameters
    for name in inspect.signature(Policy).parameters:
        options.setdefault(name, defaults[name].default)
    return Policy(**options)


# -- entries and their windows ------------------------------------------------------------


@given(ttl=seconds, jitter=st.floats(0.0, 0.99), draw=draws, now=seconds)
def test_jittered_lifetime_stays_within_the_spread(
    ttl: float, jitter: float, draw: float, now: float
) -> None:
    entry = policy(ttl=ttl, jitter=jitter, random=lambda: draw).value_entry("v", now, 0.0)
    lifetime = entry.expires_at - now
    slack = 1e-9 * max(1.0, ttl, now)
    assert ttl * (1 - jitter) - slack <= lifetime <= ttl * (1 + jitter) + slack


def test_jitter_maps_draws_linearly() -> None:
    for draw, lifetime in [(0.0, 80.0), (0.25, 90.0), (0.5, 100.0), (0.75, 110.0)]:
        entry = policy(ttl=100.0, jitter=0.2, random=lambda d=draw: d).value_entry("v", 0.0, 0.0)
        assert entry.expires_at == pytest.approx(lifetime)


def test_windows_follow_expiry() -> None:
    p = policy(ttl=10.0, jitter=0.0, stale=5.0, stale_if_error=30.0)
    entry = p.value_entry("v", 100.0, 0.0)
    assert (entry.fresh_until, entry.expires_at) == (110.0, 110.0)
    assert (entry.stale_until, entry.error_until, entry.keep_until) == (115.0, 140.0, 140.0)
    assert p.state(entry, 109.999, True) == FRESH
    assert p.state(entry, 110.0, True) == STALE
    assert p.state(entry, 114.999, True) == STALE
    assert p.state(entry, 115.0, True) == MISS
    assert p.state(entry, 110.0, False) == MISS  # closed: nothing served stale
    assert p.can_stand_in(entry, 139.999) and not p.can_stand_in(entry, 140.0)
    assert not p.dead(entry, 139.999) and p.dead(entry, 140.0)


def test_no_ttl_never_expires() -> None:
    p = policy()
    entry = p.value_entry("v", 0.0, 5.0)
    assert entry.expires_at == math.inf
    assert p.state(entry, 1e300, True) == FRESH


def test_negative_entries_have_no_windows_and_never_refresh_early() -> None:
    p = policy(
        ttl=100.0,
        jitter=0.0,
        stale=50.0,
        stale_if_error=50.0,
        early_refresh=10.0,
        negative=lambda v: v is None,
        negative_ttl=5.0,
        random=lambda: 0.999999,
    )
    entry = p.value_entry(None, 0.0, 1.0)
    assert entry.negative
    assert (entry.expires_at, entry.stale_until, entry.error_until) == (5.0, 5.0, 5.0)
    assert p.state(entry, 4.9, True) == FRESH
    assert p.state(entry, 5.0, True) == MISS
    assert not p.can_stand_in(entry, 4.0)


def test_error_entries_always_take_the_slow_path_and_reraise() -> None:
    class NotFound(Exception):
        pass

    p = policy(ttl=100.0, jitter=0.0, negative=NotFound, negative_ttl=5.0)
    assert p.error_entry(ValueError(), 0.0, 0.0) is None
    try:
        raise NotFound("gone")
    except NotFound as exc:
        error = exc
    entry = p.error_entry(error, 0.0, 0.0)
    assert entry is not None
    assert entry.fresh_until == -math.inf and entry.expires_at == 5.0
    assert p.state(entry, 1.0, True) == FRESH
    with pytest.raises(NotFound, match="gone"):
        entry.outcome()


def test_missing_entries_only_with_negative_caching() -> None:
    assert policy(ttl=1.0).missing_entry(1, 0.0) is None
    entry = policy(ttl=1.0, jitter=0.0, negative_ttl=2.0).missing_entry(1, 0.0)
    assert entry is not None and isinstance(entry.error, KeyError)
    assert entry.expires_at == 2.0


# -- XFetch ------------------------------------------------------------------------------


@given(
    now=st.floats(0.0, 1000.0),
    delta=st.floats(0.0, 10.0),
    beta=st.floats(0.01, 10.0),
    draw=draws,
)
def test_xfetch_is_the_papers_formula(now: float, delta: float, beta: float, draw: float) -> None:
    p = policy(ttl=100.0, jitter=0.0, early_refresh=beta, random=lambda: draw)
    entry = p.value_entry("v", 0.0, delta)
    u = 1.0 - draw
    expected = now - delta * beta * math.log(u) >= entry.expires_at
    assert p.xfetch(entry, now) == expected


@given(
    now=st.floats(0.0, 200.0),
    delta=st.floats(0.0, 10.0),
    beta=st.floats(0.01, 10.0),
    draw=draws,
)
def test_the_hit_path_skips_only_reads_no_draw_could_refresh(
    now: float, delta: float, beta: float, draw: float
) -> None:
    """The hit path compares with fresh_until and draws nothing before it: exact,
    because no draw of random.random() can reach further than MAX_DRAW."""
    p = policy(ttl=100.0, jitter=0.0, early_refresh=beta, random=lambda: draw)
    entry = p.value_entry("v", 0.0, delta)
    if now < entry.fresh_until:
        assert not p.xfetch(entry, now)
    assert -math.log(1.0 - draw) <= MAX_DRAW


def test_the_largest_draw_of_random_random_is_within_max_draw() -> None:
    largest = 1.0 - 2.0**-53  # the largest float random.random() returns
    assert -math.log(1.0 - largest) == pytest.approx(MAX_DRAW)
    # A source returning 1.0 (out of contract) is capped rather than infinite.
    p = policy(ttl=10.0, jitter=0.0, early_refresh=1.0, random=lambda: 1.0)
    entry = p.value_entry("v", 0.0, 0.1)
    assert p.xfetch(entry, entry.fresh_until)
    assert not p.xfetch(entry, entry.fresh_until - 0.01)


def test_early_state_only_when_drawn_and_not_already_refreshing() -> None:
    p = policy(ttl=10.0, jitter=0.0, early_refresh=1.0, random=lambda: 0.999)
    entry = p.value_entry("v", 0.0, 1.0)
    now = entry.expires_at - 1.0
    assert p.state(entry, now, True) == EARLY
    entry.refreshing = True
    assert p.state(entry, now, True) == FRESH
    entry.refreshing = False
    assert p.state(entry, now, False) == FRESH


def test_xfetch_refreshes_hot_keys_once_per_lifetime_on_average() -> None:
    """Simulated: 100 reads a second of one key whose load takes 0.5 s; XFetch moves
    the refresh ahead of expiry, so no read ever finds the key expired."""
    rng = random.Random(1)
    p = policy(ttl=60.0, jitter=0.0, early_refresh=1.0, random=rng.random)
    now, entry = 0.0, p.value_entry("v", 0.5, 0.5)
    early, expired = 0, 0
    while now < 6000.0:
        now += 0.01
        state = p.state(entry, now, True)
        if state == EARLY:
            early += 1
            entry = p.value_entry("v", now + 0.5, 0.5)  # refreshed 0.5 s later
        elif state == MISS:
            expired += 1
            entry = p.value_entry("v", now + 0.5, 0.5)
    assert expired == 0
    assert 90 <= early <= 110  # about one refresh per 60 s lifetime


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"ttl": 0}, ValueError, "ttl must be > 0"),
        ({"ttl": -1}, ValueError, "ttl must be > 0"),
        ({"ttl": "30"}, TypeError, "ttl must be a number of seconds"),
        ({"ttl": True}, TypeError, "ttl must be a number"),
        ({"ttl": math.nan}, ValueError, "ttl must be"),
        (
            {"ttl": 1, "jitter": 1.0},
            ValueError,
            r"jitter is a fraction of the lifetime in \[0, 1\)",
        ),
        ({"ttl": 1, "jitter": -0.1}, ValueError, "jitter must be >= 0"),
        ({"stale": 5}, ValueError, "stale= only applies to entries that expire"),
        ({"stale_if_error": 5}, ValueError, "stale_if_error= only applies"),
        ({"early_refresh": 1.0}, ValueError, "early_refresh= only applies"),
        ({"ttl": 1, "stale": -1}, ValueError, "stale must be >= 0"),
        ({"ttl": 1, "early_refresh": -1}, ValueError, "early_refresh must be >= 0"),
        ({"negative": KeyError}, ValueError, "give negative_ttl= too"),
        ({"negative_ttl": 0}, ValueError, "negative_ttl must be > 0"),
        ({"negative": (KeyError, 3), "negative_ttl": 1}, TypeError, "must hold exception types"),
        ({"negative": (), "negative_ttl": 1}, TypeError, "must hold exception types"),
        ({"negative": 3, "negative_ttl": 1}, TypeError, "predicate on loaded values"),
        ({"random": 0.5}, TypeError, "random must be callable"),
    ],
)
def test_bad_options_are_named(options: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        policy(**options)


def test_zero_options_disable() -> None:
    p = policy(ttl=1.0, stale=0, stale_if_error=0, early_refresh=0)
    assert (p.stale, p.stale_if_error, p.beta) == (0.0, 0.0, 0.0)
    p = policy(ttl=1.0, early_refresh=None)
    assert p.beta == 0.0


# -- the store: leases, re-checks, batches, eviction --------------------------------------


def store(maxsize: int | None = None, **options: Any) -> Store[Any]:
    options.setdefault("ttl", 10.0)
    options.setdefault("jitter", 0.0)
    return Store(policy(**options), maxsize)


def test_a_lease_lets_only_the_latest_load_write() -> None:
    s = store()
    _, _, old = s.begin_load("k", None, 0.0)
    s.invalidate("k")
    _, _, new = s.begin_load("k", None, 0.0)
    assert not s.finish_load("k", old, "old", 0.0, 1.0)
    assert s.finish_load("k", new, "new", 0.0, 1.0)
    assert s.data["k"].value == "new"
    assert s.leases == {}
    assert s.loads == 2


def test_put_and_force_revoke_leases_too() -> None:
    s = store()
    _, _, token = s.begin_load("k", None, 0.0)
    s.put("k", "written", 0.0)
    assert not s.finish_load("k", token, "loaded", 0.0, 1.0)
    assert s.data["k"].value == "written"
    _, _, token = s.begin_load("j", None, 0.0)
    assert s.force("j") is None
    assert not s.finish_load("j", token, "older", 0.0, 1.0)


def test_begin_load_rechecks_for_a_newer_usable_entry() -> None:
    s = store()
    _, _, token = s.begin_load("k", None, 0.0)
    s.finish_load("k", token, "v", 0.0, 0.0)
    written = s.data["k"]
    # A caller that saw nothing finds the entry written meanwhile: no load.
    assert s.begin_load("k", None, 1.0) == (written, None, 0)
    # A caller that saw this very entry (a refresh of it) loads.
    ready, _, token = s.begin_load("k", written, 1.0)
    assert ready is None and token > 0
    # An expired entry is not usable: load.
    ready, _, _ = s.begin_load("k", None, 11.0)
    assert ready is None
    # After force() the re-check is skipped once.
    s.force("k")
    ready, _, _ = s.begin_load("k", None, 1.0)
    assert ready is None and "k" not in s.forced


def test_begin_load_defers_to_a_batch_with_the_key() -> None:
    s = store()
    plan = s.plan_many(["a", "b"], 0.0, True, batch="B")
    assert plan.load == ["a", "b"] and set(plan.tokens) == {"a", "b"}
    assert s.begin_load("a", None, 0.0) == (None, "B", 0)
    action, _, batch = s.lookup("b", 0.0, True)
    assert (action, batch) == (JOIN, "B")
    s.finish_batch("B", plan.tokens, {"a": 1}, None, 0.0, 0.0)
    assert s.batches == {} and s.leases == {}
    assert s.data["a"].value == 1 and "b" not in s.data


def test_plan_many_sorts_keys_by_what_they_need() -> None:
    s = store(stale=5.0)
    s.put("fresh", 1, 0.0)
    s.put("stale", 2, -12.0)
    _, _, _ = s.begin_load("single", None, 0.0)
    s.plan_many(["other"], 0.0, True, batch="B1")
    plan = s.plan_many(["fresh", "stale", "single", "other", "new"], 0.0, True, batch="B2")
    assert set(plan.served) == {"fresh", "stale"}
    assert [k for k, _ in plan.refresh] == ["stale"]
    assert list(plan.single) == ["single"]
    assert plan.join == {"other": "B1"}
    assert plan.load == ["new"]
    # Without a batch every miss is loaded on its own.
    plan = s.plan_many(["new2"], 0.0, True, batch=None)
    assert list(plan.single) == ["new2"] and plan.load == []


def test_lookup_counts_and_marks_refreshes_once() -> None:
    s = store(stale=5.0)
    s.put("k", "v", 0.0)
    assert s.lookup("k", 1.0, True)[0] == SERVE
    assert s.lookup("k", 11.0, True)[0] == REFRESH
    assert s.lookup("k", 11.0, True)[0] == SERVE  # already refreshing
    assert s.lookup("k", 16.0, True)[0] == LOAD
    assert s.lookup("absent", 0.0, True)[0] == LOAD
    stats = s.stats()
    assert (stats.hits, stats.misses, stats.stale_served, stats.refreshes) == (3, 2, 2, 1)


def test_a_failed_load_never_evicts_and_not_found_is_written() -> None:
    class NotFound(Exception):
        pass

    s = store(stale=5.0, negative=NotFound, negative_ttl=1.0)
    s.put("k", "v", 0.0)
    _, _, token = s.begin_load("k", s.data["k"], 11.0)
    kept = s.fail_load("k", token, ConnectionError(), 11.0, 11.0)
    assert kept is s.data["k"] and s.data["k"].value == "v"
    assert s.load_failures == 1 and s.leases == {}
    _, _, token = s.begin_load("k", s.data["k"], 12.0)
    assert s.fail_load("k", token, NotFound(), 12.0, 12.0) is None
    assert isinstance(s.data["k"].error, NotFound)
    assert s.load_failures == 1 and s.loads == 1


@settings(max_examples=200)
@given(
    maxsize=st.integers(1, 8),
    ops=st.lists(st.tuples(st.sampled_from(["read", "write", "drop"]), st.integers(0, 15))),
)
def test_eviction_keeps_the_bound_and_the_counters_add_up(
    maxsize: int, ops: list[tuple[str, int]]
) -> None:
    s = store(maxsize)
    writes = 0
    for op, key in ops:
        if op == "read":
            s.lookup(key, 0.0, True)
        elif op == "write":
            before = key in s.data
            s.put(key, key, 0.0)
            writes += not before
        else:
            if key in s.data:
                writes -= 1
            s.invalidate(key)
        assert len(s.data) <= maxsize
        assert all(entry.value == key for key, entry in s.data.items())
    stats = s.stats()
    assert stats.evictions == writes - len(s.data)
    assert stats.hits + stats.misses == sum(op == "read" for op, _ in ops)


@given(st.lists(st.integers(0, 5), min_size=1))
def test_the_key_just_written_is_never_the_one_evicted(keys: list[int]) -> None:
    s = store(1)
    for key in keys:
        s.lookup(key, 0.0, True)
        s.put(key, key, 0.0)
        assert list(s.data) == [key]


def test_clear_returns_the_keys_in_flight_and_keeps_counters() -> None:
    s = store()
    s.put("a", 1, 0.0)
    s.lookup("a", 0.0, True)
    s.begin_load("b", None, 0.0)
    s.plan_many(["c"], 0.0, True, batch="B")
    assert sorted(s.clear()) == ["b", "c"]
    assert (s.data, s.leases, s.batches) == ({}, {}, {})
    assert s.stats().hits == 1


def test_xfetch_meets_both_outcomes() -> None:
    p = policy(ttl=100.0, jitter=0.0, early_refresh=1.0, random=lambda: 0.99)
    entry = p.value_entry("v", 0.0, 10.0)  # -ln(0.01) * 10 = 46 s ahead
    assert p.xfetch(entry, 60.0) and not p.xfetch(entry, 50.0)


# -- outcomes from other processes (groups that cross processes) ------------------------


class Remote(RemoteError):
    """What a group that crosses processes raises for a loader's error elsewhere."""

    def __init__(self, name: str) -> None:
        super().__init__(f"remote {name}")
        self.type_name = name


class NotFound(LookupError):
    pass


class GoneForGood(NotFound):
    pass


def test_a_remote_error_is_named_as_its_type_or_a_subclass_known_here() -> None:
    here = f"{__name__}.NotFound"
    assert type_name(NotFound) == here and type_name(KeyError) == "KeyError"
    assert named_as(Remote(here), (NotFound,))
    assert named_as(Remote(f"{__name__}.GoneForGood"), (NotFound,))  # a subclass
    assert named_as(Remote(f"{__name__}.GoneForGood"), (ValueError, LookupError))
    assert not named_as(Remote(here), (GoneForGood,))  # not the other way round
    assert not named_as(Remote("NotFound"), (NotFound,))  # the module is part of the name
    assert not named_as(Remote("ValueError"), (NotFound,))
    assert not named_as(RemoteError("no type name"), (NotFound,))


def test_not_found_is_a_key_error_here_or_remote() -> None:
    class GoneKey(KeyError):
        pass

    assert not_found(KeyError("k")) and not_found(GoneKey("k"))
    assert not_found(Remote("KeyError"))
    assert not_found(Remote(type_name(GoneKey)))
    assert not not_found(Remote("ValueError")) and not not_found(LookupError("k"))


def test_negative_caches_a_remote_error_by_name_only() -> None:
    p = policy(ttl=10.0, jitter=0.0, negative=(NotFound,), negative_ttl=2.0)
    remote = Remote(type_name(GoneForGood))
    entry = p.error_entry(remote, 5.0, 0.5)
    assert entry is not None and entry.negative and entry.error is remote
    assert entry.expires_at == 7.0
    assert p.error_entry(Remote("ValueError"), 5.0, 0.5) is None
    assert policy(ttl=10.0).error_entry(remote, 5.0, 0.5) is None  # negative caching off


def test_landed_writes_an_outcome_from_elsewhere_once_without_counting_a_load() -> None:
    s = store()
    first, second = s.hold("k", None), s.hold("k", None)
    assert first == second and s.holders == {first: 2}
    assert s.landed("k", first, "v", None, 1.0, 3.0)
    assert not s.landed("k", second, "v", None, 1.0, 3.0)  # written already
    entry = s.data["k"]
    assert (entry.value, entry.delta, entry.expires_at) == ("v", 2.0, 13.0)
    assert (s.loads, s.load_failures, s.leases, s.holders) == (0, 0, {}, {})


def test_a_load_run_here_replaces_the_held_lease_and_writes_alone() -> None:
    s = store()
    token = s.hold("k", None)
    _, _, own = s.begin_load("k", None, 1.0)
    assert own != token
    assert s.finish_load("k", own, "mine", 1.0, 2.0)
    assert not s.landed("k", token, "mine", None, 0.0, 2.0)
    assert s.data["k"].delta == 1.0 and s.loads == 1
    # A caller joining while that load runs shares its lease and writes nothing either.
    s.invalidate("k")
    _, _, own = s.begin_load("k", None, 3.0)
    joined = s.hold("k", None)
    assert joined == own and s.holders == {}
    s.unhold("k", joined)  # it leaves: the load's lease stays
    assert s.leases == {"k": own}


@pytest.mark.parametrize("meanwhile", ["invalidate", "put", "force", "clear"])
def test_a_held_lease_revoked_meanwhile_writes_nothing(meanwhile: str) -> None:
    s = store()
    token = s.hold("k", None)
    if meanwhile == "put":
        s.put("k", "newer", 1.0)
    elif meanwhile == "clear":
        s.clear()
    else:
        getattr(s, meanwhile)("k")
    assert not s.landed("k", token, "older", None, 0.0, 2.0)
    assert s.data.get("k") is None or s.data["k"].value == "newer"
    assert s.holders == {}


def test_hold_refuses_when_the_entry_changed_since_the_read() -> None:
    s = store()
    s.put("k", "v", 0.0)
    seen = s.data["k"]
    assert s.hold("k", None) == 0  # the read saw no entry; one was written since
    s.put("k", "w", 1.0)
    assert s.hold("k", seen) == 0
    assert s.hold("k", s.data["k"]) != 0


def test_landed_errors_negative_written_others_release_the_lease() -> None:
    s = store(stale_if_error=5.0, negative=NotFound, negative_ttl=1.0)
    s.put("k", "v", 0.0)
    token = s.hold("k", s.data["k"])
    assert not s.landed("k", token, None, Remote("ValueError"), 10.0, 11.0)
    assert s.data["k"].value == "v" and s.leases == {} and s.load_failures == 0
    token = s.hold("k", s.data["k"])
    assert s.landed("k", token, None, Remote(type_name(NotFound)), 10.0, 11.0)
    assert s.data["k"].negative and s.loads == 0


def test_the_last_holder_to_leave_releases_a_lease_nothing_wrote_with() -> None:
    s = store()
    token = s.hold("k", None)
    s.hold("k", None)
    s.unhold("k", token)
    assert s.leases == {"k": token}
    s.unhold("k", token)
    assert (s.leases, s.holders) == ({}, {})


def test_landed_releases_its_hold_when_the_negative_predicate_raises() -> None:
    def broken(value: object) -> bool:
        raise RuntimeError("predicate")

    s = store(negative=broken, negative_ttl=1.0)
    token = s.hold("k", None)
    with pytest.raises(RuntimeError):
        s.landed("k", token, "v", None, 0.0, 1.0)
    assert (s.leases, s.holders, s.data) == ({}, {}, {})
