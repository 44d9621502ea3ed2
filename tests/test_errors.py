"""The library's exceptions: one base, the builtin a caller expects, pickle and copy."""

from __future__ import annotations

import copy
import pickle

import pytest

import singleflight
from singleflight import (
    AbortedError,
    ReentryError,
    SingleflightError,
    TooManyFlightsError,
    WaitTimeoutError,
)
from singleflight.redis import CodecError, LoaderError, PayloadTooLargeError, RedisUnavailableError


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("the session is closed")

    def __reduce__(self) -> tuple[object, ...]:
        return (BadRepr, ())


EXAMPLES: list[tuple[SingleflightError, type[BaseException]]] = [
    (AbortedError("k", "its loader task was cancelled"), SingleflightError),
    (TooManyFlightsError("k", 3), SingleflightError),
    (WaitTimeoutError("k", 0.5), TimeoutError),
    (WaitTimeoutError("k", 2.0, "max_wait"), TimeoutError),
    (ReentryError(("user", 1)), RuntimeError),
    (LoaderError("k", "KeyError", "'x'"), singleflight.RemoteError),
    (RedisUnavailableError("Redis is unavailable for key 'k'"), ConnectionError),
    (CodecError("undecodable"), ValueError),
    (PayloadTooLargeError("too large"), CodecError),
]


@pytest.mark.parametrize("error,builtin", EXAMPLES, ids=lambda e: type(e).__name__)
def test_every_error_has_one_base_and_the_builtin_callers_expect(
    error: SingleflightError, builtin: type[BaseException]
) -> None:
    assert isinstance(error, SingleflightError)
    assert isinstance(error, builtin)


@pytest.mark.parametrize("error,builtin", EXAMPLES, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize(
    "clone",
    [
        lambda e: pickle.loads(pickle.dumps(e)),
        copy.copy,
        copy.deepcopy,
    ],
    ids=["pickle", "copy", "deepcopy"],
)
def test_every_error_survives_pickle_and_copy(
    error: SingleflightError, builtin: type[BaseException], clone: object
) -> None:
    again = clone(error)  # type: ignore[operator]
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert again.args == error.args
    assert {k: v for k, v in vars(again).items()} == {k: v for k, v in vars(error).items()}


def test_the_attributes_callers_read_survive_pickle() -> None:
    timeout = pickle.loads(pickle.dumps(WaitTimeoutError("k", 2.0, "max_wait")))
    assert (timeout.key, timeout.seconds, timeout.option) == ("k", 2.0, "max_wait")
    limit = pickle.loads(pickle.dumps(TooManyFlightsError("k", 3)))
    assert (limit.key, limit.limit) == ("k", 3)
    remote = pickle.loads(pickle.dumps(LoaderError("k", "myapp.NotFound", "no user 7")))
    assert (remote.type_name, remote.message) == ("myapp.NotFound", "no user 7")


@pytest.mark.parametrize(
    "make",
    [
        lambda key: AbortedError(key, "stopped"),
        lambda key: TooManyFlightsError(key, 1),
        lambda key: WaitTimeoutError(key, 1.0),
        ReentryError,
        lambda key: LoaderError(key, "KeyError", "x"),
    ],
)
def test_a_key_whose_repr_raises_still_gives_a_message(make: object) -> None:
    error = make(BadRepr())  # type: ignore[operator]
    assert "BadRepr object (repr failed)" in str(error)
