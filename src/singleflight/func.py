"""Decorators: :func:`coalesce` (share in-flight calls) and :func:`cached` (a loading cache
in front of them).

Both keep the decorated function's signature for type checkers and its
metadata (``functools.wraps``); both detect coroutine functions and then
return one.  Keys come from the arguments (see :mod:`singleflight.keys`) or
from ``make_key=``, a function taking the same arguments.
"""

from __future__ import annotations

import functools
import inspect
import random as _random
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, ParamSpec, TypeVar, cast, overload

from ._asyncio import AsyncGroup
from ._protocols import crosses_processes
from ._threads import Group
from .cache._async import AsyncLoadingCache
from .cache._base import DEFAULT_MAXSIZE, MISS
from .cache._sync import LoadingCache
from .events import EventHook
from .keys import KeyBuilder

__all__ = ["cached", "coalesce"]

P = ParamSpec("P")
R = TypeVar("R")

_KeyFunction = Callable[..., Hashable]


def _check_function(fn: object, decorator: str) -> None:
    if isinstance(fn, classmethod | staticmethod):
        kind = type(fn).__name__
        raise TypeError(
            f"@{decorator} got a {kind} object; put @{kind} above @{decorator} so that "
            f"@{decorator} decorates the function itself"
        )
    if not callable(fn):
        raise TypeError(f"@{decorator} needs a function; got {type(fn).__name__} {fn!r}")
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(
            f"@{decorator} cannot share a generator's output between callers; "
            f"{fn!r} is a generator function"
        )


def _key_of(fn: Callable[..., Any], make_key: _KeyFunction | None, prefix: Hashable | None) -> Any:
    """``build(args, kwargs) -> key`` for calls of ``fn``, with ``build.raw`` the same
    key before unhashable arguments are frozen."""
    if make_key is None:
        return KeyBuilder(fn, prefix=prefix)
    if not callable(make_key):
        raise TypeError(
            "make_key= must be a function taking the same arguments; got "
            f"{type(make_key).__name__} {make_key!r}"
        )

    def build(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        return make_key(*args, **kwargs)

    build.raw = build  # type: ignore[attr-defined]
    return build


def _is_async_group(group: object) -> bool:
    return inspect.iscoroutinefunction(getattr(group, "do", None))


def _check_group(group: object, is_async: bool, fn: object, decorator: str) -> None:
    if not callable(getattr(group, "do", None)):
        raise TypeError(f"group= must have a do(key, fn, *args) method; got {group!r}")
    if is_async and not _is_async_group(group):
        raise TypeError(f"@{decorator} on coroutine function {fn!r} needs an AsyncGroup as group=")
    if not is_async and _is_async_group(group):
        raise TypeError(
            f"@{decorator} on function {fn!r} needs a thread Group as group=, not an async one"
        )


def _qualified_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _prefix(fn: Callable[..., Any], group: object) -> Hashable | None:
    """What the default key starts with when ``group=`` is shared, or None for a group
    of the function's own.

    In a group that stays in this process, the function object itself: closures
    made by one factory, or lambdas, share a qualified name but never a key.  A
    group that crosses processes needs a key other processes can build: the
    qualified name (functions sharing it there share keys; pass ``make_key=``).
    """
    if group is None:
        return None
    return _qualified_name(fn) if crosses_processes(group) else fn


# -- coalesce --------------------------------------------------------------------------


@overload
def coalesce(fn: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def coalesce(
    *, make_key: _KeyFunction | None = None, group: Any = None
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def coalesce(
    fn: Callable[P, R] | None = None,
    /,
    *,
    make_key: _KeyFunction | None = None,
    group: Any = None,
) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
    """Concurrent calls with equal arguments share one execution of the function.

    Use as ``@coalesce`` or ``@coalesce(make_key=..., group=...)``.  A call made
    while an equal one is running waits for it and gets its result (the same
    object) or its exception; a call after it has finished runs the function
    again (this is not a cache; see :func:`cached`).  Sync functions coalesce
    through a :class:`~singleflight.Group`, coroutine functions through an
    :class:`~singleflight.AsyncGroup` (each decorated function gets its own
    unless ``group=`` is given; then the key starts with the function itself,
    or its qualified name for a group that crosses processes, unless
    ``make_key=`` builds it).

    ``make_key(*args, **kwargs)`` replaces the default key (the bound arguments, with
    ``self`` by identity).  Errors and cancellation are those of the group's
    ``do``; ``TypeError`` for an argument that cannot be made part of a key
    (pass ``make_key=``), for a generator function, and for a group that does not
    fit the function (sync vs async).  The wrapper's ``group`` attribute is the
    group used.
    """

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        _check_function(fn, "coalesce")
        is_async = inspect.iscoroutinefunction(fn)
        if group is not None:
            _check_group(group, is_async, fn, "coalesce")
        build = _key_of(fn, make_key, _prefix(fn, group))
        if is_async:
            agroup: Any = AsyncGroup() if group is None else group
            ado = agroup.do
            afn = cast(Callable[..., Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                return await ado(build(args, kwargs), afn, *args, **kwargs)

            async_wrapper.group = agroup  # type: ignore[attr-defined]
            return cast(Callable[P, R], async_wrapper)

        sgroup: Any = Group() if group is None else group
        do = sgroup.do

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return do(build(args, kwargs), fn, *args, **kwargs)

        wrapper.group = sgroup  # type: ignore[attr-defined]
        return cast(Callable[P, R], wrapper)

    if fn is not None:
        return decorate(fn)
    return decorate


# -- cached ------------------------------------------------------------------------------


@overload
def cached(fn: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def cached(
    *,
    ttl: float | None = None,
    jitter: float = 0.1,
    maxsize: int | None = DEFAULT_MAXSIZE,
    stale: float = 0.0,
    stale_if_error: float = 0.0,
    early_refresh: float | None = None,
    negative: Callable[[Any], bool]
    | type[BaseException]
    | tuple[type[BaseException], ...]
    | None = None,
    negative_ttl: float | None = None,
    make_key: _KeyFunction | None = None,
    group: Any = None,
    fleet: Any = None,
    clock: Callable[[], float] = time.monotonic,
    random: Callable[[], float] = _random.random,
    name: str | None = None,
    on_event: EventHook | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def cached(
    fn: Callable[P, R] | None = None,
    /,
    *,
    ttl: float | None = None,
    jitter: float = 0.1,
    maxsize: int | None = DEFAULT_MAXSIZE,
    stale: float = 0.0,
    stale_if_error: float = 0.0,
    early_refresh: float | None = None,
    negative: Callable[[Any], bool]
    | type[BaseException]
    | tuple[type[BaseException], ...]
    | None = None,
    negative_ttl: float | None = None,
    make_key: _KeyFunction | None = None,
    group: Any = None,
    fleet: Any = None,
    clock: Callable[[], float] = time.monotonic,
    random: Callable[[], float] = _random.random,
    name: str | None = None,
    on_event: EventHook | None = None,
) -> Callable[P, R] | Callable[[Callable[P, R]], Callable[P, R]]:
    """Put a loading cache in front of the function: the decorator form of
    :class:`~singleflight.LoadingCache` (sync functions) and
    :class:`~singleflight.AsyncLoadingCache` (coroutine functions).

    Use as ``@cached`` (no expiry, LRU-bounded) or ``@cached(ttl=..., ...)``
    with the options of :class:`~singleflight.LoadingCache`.  A call with the
    arguments of a cached entry is answered from it; concurrent calls that
    miss share one execution.  Keys are built as for :func:`coalesce`.

    The wrapper carries ``cache`` (the cache, for ``stats()``, ``clear()``,
    ``close()``/``aclose()``), ``cache_key(*args, **kwargs)`` (the key a call
    would use) and ``invalidate(*args, **kwargs)`` (drop that call's entry).
    ``name`` labels the cache's events and metrics (default: the function's
    qualified name); ``on_event`` receives every read's event, hits included.
    ``fleet=`` (a ``redis.Redis`` / ``redis.asyncio.Redis`` client, or a
    :class:`~singleflight.redis.Fleet`) shares the entries with every process
    on that Redis, under the function's qualified name (see the cache's
    ``fleet=``).
    Errors, cancellation and the handling of methods are as for the cache and
    for :func:`coalesce`.
    """

    options: dict[str, Any] = {
        "ttl": ttl,
        "jitter": jitter,
        "maxsize": maxsize,
        "stale": stale,
        "stale_if_error": stale_if_error,
        "early_refresh": early_refresh,
        "negative": negative,
        "negative_ttl": negative_ttl,
        "group": group,
        "fleet": fleet,
        "clock": clock,
        "random": random,
    }

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        _check_function(fn, "cached")
        is_async = inspect.iscoroutinefunction(fn)
        if group is not None:
            _check_group(group, is_async, fn, "cached")
        build = _key_of(fn, make_key, _prefix(fn, group))  # a fleet: its namespace
        raw = build.raw
        # A method's entries hold self by identity: stored, such a key drops its
        # entry when the instance dies (only misses pay for it).
        watched = isinstance(build, KeyBuilder) and build.by_identity
        qualname = _qualified_name(fn)
        options["name"] = qualname if name is None else name
        options["on_event"] = on_event

        def no_loader(cache_key: object) -> Any:
            raise TypeError(
                f"the cache of @cached {qualname} loads through the function's arguments; "
                "call the function rather than cache.get()"
            )

        if is_async:

            async def async_no_loader(cache_key: object) -> Any:
                no_loader(cache_key)

            acache: AsyncLoadingCache[Any, Any] = AsyncLoadingCache(async_no_loader, **options)
            ahit = acache._hit
            aget = _watching(acache._get, build, acache._dropped) if watched else acache._get
            afn = cast(Callable[..., Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                k = raw(args, kwargs)
                try:
                    value = ahit(k)
                except TypeError:  # an unhashable argument: freeze it (or _get says why not)
                    k = build(args, kwargs)
                else:
                    if value is not MISS:
                        return value
                return await aget(k, functools.partial(afn, *args, **kwargs))

            _expose(async_wrapper, acache, build)
            return cast(Callable[P, R], async_wrapper)

        cache: LoadingCache[Any, Any] = LoadingCache(no_loader, **options)
        hit = cache._hit
        get = _watching(cache._get, build, cache._dropped) if watched else cache._get

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            # A call that hits builds the key without copying the arguments and
            # hashes it once.  With on_event every call reads through _get.
            k = raw(args, kwargs)
            try:
                value = hit(k)
            except TypeError:  # an unhashable argument: freeze it (or _get says why not)
                k = build(args, kwargs)
            else:
                if value is not MISS:
                    return value
            return get(k, functools.partial(fn, *args, **kwargs))

        _expose(wrapper, cache, build)
        return cast(Callable[P, R], wrapper)

    if fn is not None:
        return decorate(fn)
    return decorate


def _watching(get: Callable[..., R], build: KeyBuilder, dropped: Callable[[Any], None]) -> Any:
    """``get(key, thunk)`` storing ``key`` so that its entry is dropped when the
    instance the key holds by identity dies."""
    watched = build.watched

    def watching_get(key: Any, thunk: Any) -> R:
        return get(watched(key, dropped), thunk)

    return watching_get


def _expose(wrapper: Any, cache: Any, build: Any) -> None:
    def cache_key(*args: Any, **kwargs: Any) -> Hashable:
        """The key a call with these arguments uses."""
        return build(args, kwargs)  # type: ignore[no-any-return]

    def invalidate(*args: Any, **kwargs: Any) -> None:
        """Drop the entry of a call with these arguments (see the cache's invalidate)."""
        cache.invalidate(build(args, kwargs))

    wrapper.cache = cache
    wrapper.cache_key = cache_key
    wrapper.invalidate = invalidate
