"""Which Redis keys a flight uses: one flight per (namespace, key), one cluster slot per flight."""

from __future__ import annotations

from typing import Any

import pytest
from _redis_server import RedisServer
from _redis_sides import Loader
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from singleflight.redis._protocol import Keys, check_namespace

# Characters that build or break the key layout, and a few plain ones.
_TRICKY = st.sampled_from([":", "{", "}", "%", "3", "A", "a", "é", "done", "res"])
_NAMESPACES = st.lists(_TRICKY.filter(lambda c: "{" not in c and "}" not in c), min_size=1).map(
    "".join
)
_KEYS = st.lists(_TRICKY).map("".join)


def _names(namespace: str, key: str) -> list[str]:
    keys = Keys(namespace, key)
    return [keys.res, keys.lease, keys.fence, keys.done("0" * 32), keys.done("f" * 32)]


@settings(max_examples=500, deadline=None)
@given(_NAMESPACES, _KEYS, _NAMESPACES, _KEYS)
def test_distinct_namespace_and_key_pairs_never_share_a_redis_key(
    ns1: str, key1: str, ns2: str, key2: str
) -> None:
    check_namespace(ns1)
    check_namespace(ns2)
    first, second = _names(ns1, key1), _names(ns2, key2)
    assert len(set(first)) == len(first)
    assert len({key_slot(name.encode()) for name in first}) == 1, first
    if (ns1, key1) != (ns2, key2):
        assert not set(first) & set(second), (first, second)
    else:
        assert first == second


@settings(max_examples=300, deadline=None)
@given(st.lists(_TRICKY, min_size=3).map("".join), st.data())
def test_one_text_cut_at_two_colons_gives_two_flights(text: str, data: st.DataObject) -> None:
    """The adversary's move: ``<ns>:<key>`` read with the cut at another colon."""
    cuts = [i for i, c in enumerate(text) if c == ":" and i and "{" not in text[:i]]
    cuts = [i for i in cuts if "}" not in text[:i]]
    if len(cuts) < 2:
        return
    first, second = data.draw(st.lists(st.sampled_from(cuts), min_size=2, max_size=2, unique=True))
    one = (text[:first], text[first + 1 :])
    other = (text[:second], text[second + 1 :])
    assert not set(_names(*one)) & set(_names(*other)), (one, other)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (("users", "admin:42"), ("users:admin", "42")),
        (("a", ":b"), ("a:", "b")),
        (("a", ""), ("a:", "")),
        (("a%3A", "b"), ("a:", "b")),
        (("n", "x}:res"), ("n", "x}:lease")),
    ],
)
def test_adversarial_pairs_have_distinct_keys(one: tuple[str, str], other: tuple[str, str]) -> None:
    assert not set(_names(*one)) & set(_names(*other))


def test_groups_of_colliding_names_share_no_flight_and_no_result(
    sides: Any, server: RedisServer
) -> None:
    users = sides(server.port, namespace="users")
    admins = sides(server.port, namespace="users:admin")
    assert users.call("admin:42", Loader("user admin:42")).value == "user admin:42"
    # Stored for result_ttl under the first group's key: never the second's hit.
    other = Loader("admin 42")
    assert admins.call("42", other).value == "admin 42"
    assert other.runs == 1
    assert admins.stats().hits == 0


@pytest.mark.parametrize("key", ["a\udc80b", ("user", "\ud800"), "\udfff"])
def test_a_key_that_is_not_valid_unicode_is_refused_before_anything_runs(
    sides: Any, server: RedisServer, key: Any
) -> None:
    a = sides(server.port)
    loader = Loader("never")
    outcome = a.call(key, loader)
    assert isinstance(outcome.error, ValueError), outcome
    assert not isinstance(outcome.error, UnicodeError), outcome
    assert "surrogate" in str(outcome.error) and "key_to_str" in str(outcome.error)
    assert loader.runs == 0
    assert a.stats().redis_errors == 0
