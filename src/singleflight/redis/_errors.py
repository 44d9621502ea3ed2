"""The exceptions of the Redis tier, and which Redis errors are worth a retry.

A caller's deadline (``max_wait``) passing raises the library's one
:class:`~singleflight.WaitTimeoutError`, as a group's ``timeout=`` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from redis import exceptions as _rx

from ..errors import RemoteError, SingleflightError, safe_repr


class LoaderError(RemoteError):
    """The loader raised in another process; its type name and message, never the object.

    Raised in callers that waited on a leader in another process.  Callers in
    the leader's own process get the loader's exception itself.  ``type_name``
    is the qualified name of the original exception's class (``"ValueError"``,
    ``"myapp.errors.NotFound"``); ``message`` is its ``str()``, cut to 2,000
    characters.  Errors are never cached: the next call loads again.
    """

    def __init__(self, key: object, type_name: str, message: str) -> None:
        super().__init__(f"the loader of key {safe_repr(key)} raised {type_name}: {message}")
        self._made_with = (key, type_name, message)
        self.key = key
        self.type_name = type_name
        self.message = message


class RedisUnavailableError(SingleflightError, ConnectionError):
    """Redis failed (or the circuit breaker is open) under ``on_redis_error="closed"``.

    The Redis error is ``__cause__`` when there is one.
    """


# Errors a retry can cure: a dropped or refused connection, a timeout, a
# server still loading its data, a replica promoted under us, a cluster slot
# moving or a cluster failing over.
_TRANSIENT = (
    _rx.ConnectionError,
    _rx.TimeoutError,
    _rx.ReadOnlyError,
    _rx.TryAgainError,
    _rx.AskError,
    _rx.ClusterError,
)


@contextmanager
def cluster_errors() -> Iterator[None]:
    """A RedisCluster client that reaches no node for a key (its slot uncovered, or
    every node down) raises exceptions outside RedisError: make them ConnectionErrors."""
    try:
        yield
    except (_rx.SlotNotCoveredError, _rx.RedisClusterUnreachableError) as exc:
        raise _rx.ConnectionError(f"{type(exc).__name__}: {exc}") from exc


def is_transient(error: BaseException) -> bool:
    if isinstance(error, _TRANSIENT):
        return True
    # Cluster and failover states that pass (as plain ResponseErrors).
    return isinstance(error, _rx.ResponseError) and str(error).startswith(
        ("MASTERDOWN", "CLUSTERDOWN", "LOADING")
    )
