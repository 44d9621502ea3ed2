"""Decorators: :func:`coalesce` (share in-flight calls) and :func:`cached` (a loading cache
in front of them).

Both return a wrapper typed by the decorated function's parameters and return
type (:class:`CachedFunction`, :class:`CoalescedFunction`), carrying its
metadata (``functools.wraps``); both detect coroutine functions and then return
one.  The wrappers are descriptors: on a method, ``obj.method.invalidate(x)``
is bound to ``obj`` as ``obj.method(x)`` is; placed above ``@classmethod``, every
attribute is bound to the class; above or below ``@staticmethod``, never bound.
Keys come from the arguments (a key function compiled once per decorated
function, see :mod:`singleflight.keys`) or from ``make_key=``, a function taking
the same arguments.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Hashable
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    NamedTuple,
    ParamSpec,
    Protocol,
    Self,
    TypedDict,
    TypeVar,
    Unpack,
    overload,
)

from ._auto import AutoGroup
from ._protocols import crosses_processes
from ._threads import Group
from .cache._async import AsyncLoadingCache
from .cache._base import DEFAULT_MAXSIZE
from .cache._sync import LoadingCache
from .events import EventHook
from .keys import KeyBuilder

__all__ = ["CacheInfo", "CacheOptions", "CachedFunction", "CoalescedFunction", "cached", "coalesce"]

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)

_KeyFunction = Callable[..., Hashable]


class CacheInfo(NamedTuple):
    """What :meth:`CachedFunction.cache_info` returns: ``functools.lru_cache``'s fields."""

    hits: int
    misses: int
    maxsize: int | None
    currsize: int


# At run time a method's wrapper is a functools.partial object with no bound
# arguments (a call goes straight, by vectorcall, to the generated function) whose
# __get__ binds it; a function's wrapper is the generated function itself, with the
# same attributes.  Type checkers see one generic class with a typed __call__.
if TYPE_CHECKING:
    _Wrapper = object
else:
    _Wrapper = functools.partial


def _unwrap(fn: Any, decorator: str) -> tuple[Callable[..., Any], str]:
    """The function to wrap, and what it was given as: ``"function"``, ``"classmethod"``
    or ``"staticmethod"`` (the decorator placed above ``@classmethod``/``@staticmethod``)."""
    kind = "function"
    if isinstance(fn, classmethod | staticmethod):
        kind = type(fn).__name__
        fn = fn.__func__
    if not callable(fn):
        raise TypeError(
            f"@{decorator} needs a function; got {type(fn).__name__} {fn!r} (its options "
            f"are keywords: @{decorator}({'ttl' if decorator == 'cached' else 'make_key'}=...))"
        )
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(
            f"@{decorator} cannot share a generator's output between callers; "
            f"{fn!r} is a generator function"
        )
    return fn, kind


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


def _check_make_key(make_key: object) -> None:
    if make_key is not None and not callable(make_key):
        raise TypeError(
            "make_key= must be a function taking the same arguments; got "
            f"{type(make_key).__name__} {make_key!r}"
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


def _builder(
    fn: Callable[..., Any],
    make_key: _KeyFunction | None,
    group: object,
    typed: bool,
    track_deaths: bool,
) -> KeyBuilder:
    return KeyBuilder(
        fn,
        prefix=_prefix(fn, group),
        typed=typed,
        track_deaths=track_deaths,
        make_key=make_key,
    )


# -- the wrappers ----------------------------------------------------------------------------


class _Shared:
    """What a wrapper and the wrappers bound from it share."""

    __slots__ = (
        "builder",
        "cache",
        "fn",
        "group",
        "invalidate",
        "is_async",
        "key",
        "maxsize",
        "on_class",
        "refresh",
        "refresher",
        "typed",
    )

    fn: Callable[..., Any]
    builder: KeyBuilder
    key: Callable[..., Hashable]
    group: Any
    cache: Any
    is_async: bool
    maxsize: int | None
    on_class: bool  # a classmethod: bound to the class, however reached
    typed: bool
    refresh: Callable[..., Any]
    refresher: Any  # the group concurrent refreshes of one call share
    invalidate: Callable[[Hashable], None]


# How a wrapper binds, for type checkers.  They see every decorated function as a
# plain function (``@classmethod``/``@staticmethod`` above or below the decorator
# make no difference to what the decorator is given), so ``__get__`` tells the
# kinds apart by the first parameter's type: a class (``cls: type[C]``) is a
# classmethod, bound however reached; an instance of the owner is a method, bound
# through an instance; anything else is a staticmethod, never bound.  The self
# types are these protocols, not ``CachedFunction[Concatenate[type[T], P2], R]``:
# mypy picks overloads by the self type with type variables erased, and erasing
# ``P2`` drops the ``Concatenate`` prefix, so every function would look like a
# classmethod.  (A staticmethod whose first parameter accepts a class, e.g.
# ``object`` or ``Any``, is taken for a classmethod.)
class _OnClass(Protocol[T_contra, P, R_co]):
    """A function whose first parameter is a class: a classmethod."""

    def __call__(self, cls: type[T_contra], /, *args: P.args, **kwargs: P.kwargs) -> R_co: ...


class _OnInstance(Protocol[T_contra, P, R_co]):
    """A function whose first parameter is an instance: a method."""

    def __call__(self, obj: T_contra, /, *args: P.args, **kwargs: P.kwargs) -> R_co: ...


class _Signature:
    """A wrapper's ``__signature__`` (what ``inspect.signature``, so ``help()``, reads):
    the function's, less its first parameter (self or cls) once bound."""

    def __get__(self, wrapper: Any, owner: type[Any] | None = None) -> inspect.Signature | None:
        if wrapper is None:  # the class itself
            return None
        signature = inspect.signature(wrapper._shared.fn)
        if not wrapper._obj:
            return signature
        return signature.replace(parameters=list(signature.parameters.values())[1:])


class CoalescedFunction(_Wrapper, Generic[P, R]):
    """What :func:`coalesce` returns: the function, with concurrent equal calls sharing
    one execution.

    Called as the function (same parameters and return type).  Attributes:
    ``group`` (the group calls go through), ``cache_key(*args, **kwargs)`` (the
    key a call uses) and ``uncached(*args, **kwargs)`` (a call of the function
    itself, not shared).  A descriptor: on a method, ``obj.method`` is bound to
    ``obj`` with all of them.
    """

    _shared: _Shared
    _obj: tuple[Any, ...]
    if not TYPE_CHECKING:
        __signature__ = _Signature()

    if TYPE_CHECKING:

        def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

        # See _OnClass: a classmethod, then a method through its class, through an
        # instance, and a staticmethod through an instance.
        @overload
        def __get__(
            self: _OnClass[T, P2, R], obj: object, objtype: type[T] | None = None
        ) -> CoalescedFunction[P2, R]: ...
        @overload
        def __get__(self, obj: None, objtype: type[Any] | None = None) -> Self: ...
        @overload
        def __get__(
            self: _OnInstance[T, P2, R], obj: T, objtype: type[Any] | None = None
        ) -> CoalescedFunction[P2, R]: ...
        @overload
        def __get__(self, obj: object, objtype: type[Any] | None = None) -> Self: ...

        def __get__(self, obj: Any, objtype: type[Any] | None = None) -> Any: ...

    else:

        def __get__(self, obj, objtype=None):
            if self._obj:
                return self
            if self._shared.on_class:  # @cached above @classmethod: bound to the class
                obj = type(obj) if objtype is None else objtype
            elif obj is None:
                return self
            bound = type(self)(self.func, obj)
            bound.__dict__.update(self.__dict__)
            bound._obj = (obj,)
            return bound

    @property
    def group(self) -> Any:
        """The group calls go through (an ``AutoGroup`` for coroutine functions by
        default: asyncio's or AnyIO's, as the caller runs)."""
        return self._shared.group

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> Hashable:
        """The key a call with these arguments uses.

        Raises:
          - ``TypeError`` for arguments the function would not take, or an
            unhashable one that cannot be frozen (naming its parameter).
        """
        return self._shared.key(*self._obj, *args, **kwargs)

    def uncached(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function itself: no coalescing, no cache read or write.

        Returns:
          - what the function returns (a coroutine, for a coroutine function).
        """
        return self._shared.fn(*self._obj, *args, **kwargs)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        bound = f" bound to {self._obj[0]!r}" if self._obj else ""
        return f"<{type(self).__name__} {_qualified_name(self._shared.fn)}{bound}>"

    def __reduce__(self) -> Any:
        # Pickled by reference, as functions are.
        return self._shared.fn.__qualname__


class CachedFunction(CoalescedFunction[P, R]):
    """What :func:`cached` returns: the function with a loading cache in front.

    Called as the function (same parameters and return type).  Besides those of
    :class:`CoalescedFunction`: ``cache`` (the :class:`~singleflight.LoadingCache`
    or :class:`~singleflight.AsyncLoadingCache`), ``invalidate(*args, **kwargs)``,
    ``refresh(*args, **kwargs)`` (load anew and replace the entry; awaited for
    a coroutine function), and ``functools.lru_cache``'s ``cache_info()``,
    ``cache_clear()`` and ``cache_parameters()``.
    """

    if TYPE_CHECKING:
        # See _OnClass: a classmethod, then a method through its class, through an
        # instance, and a staticmethod through an instance.
        @overload
        def __get__(
            self: _OnClass[T, P2, R], obj: object, objtype: type[T] | None = None
        ) -> CachedFunction[P2, R]: ...
        @overload
        def __get__(self, obj: None, objtype: type[Any] | None = None) -> Self: ...
        @overload
        def __get__(
            self: _OnInstance[T, P2, R], obj: T, objtype: type[Any] | None = None
        ) -> CachedFunction[P2, R]: ...
        @overload
        def __get__(self, obj: object, objtype: type[Any] | None = None) -> Self: ...

        def __get__(self, obj: Any, objtype: type[Any] | None = None) -> Any: ...

    @property
    def cache(self) -> LoadingCache[Hashable, Any] | AsyncLoadingCache[Hashable, Any]:
        """The cache in front of the function (``stats()``, ``clear()``, ``aclose()``...)."""
        return self._shared.cache  # type: ignore[no-any-return]

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Drop the entry of a call with these arguments (see the cache's ``invalidate``).

        Raises:
          - ``TypeError`` as :meth:`cache_key` does.
        """
        shared = self._shared
        shared.invalidate(shared.builder.hashable(shared.key(*self._obj, *args, **kwargs)))

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function anew and replace the entry of this call with its outcome.

        Concurrent refreshes of one call share one execution; callers
        meanwhile are answered from the current entry.  See the cache's
        ``refresh``.

        Returns:
          - the new value (a coroutine to await, for a coroutine function).

        Raises:
          - what the function raises (the entry is then kept); ``TypeError`` as
            :meth:`cache_key` does.
        """
        return self._shared.refresh(*self._obj, *args, **kwargs)  # type: ignore[no-any-return]

    def cache_info(self) -> CacheInfo:
        """``CacheInfo(hits, misses, maxsize, currsize)``, as ``functools.lru_cache`` has."""
        stats = self._shared.cache.stats()
        return CacheInfo(stats.hits, stats.misses, self._shared.maxsize, stats.size)

    def cache_clear(self) -> None:
        """Drop every entry (the counters are kept; see the cache's ``clear``)."""
        self._shared.cache.clear()

    def cache_parameters(self) -> dict[str, Any]:
        """``{"maxsize": ..., "typed": ...}``, as ``functools.lru_cache`` has."""
        return {"maxsize": self._shared.maxsize, "typed": self._shared.typed}


_ATTRIBUTES = {
    CoalescedFunction: ("cache_key", "uncached"),
    CachedFunction: (
        "cache_key",
        "uncached",
        "invalidate",
        "refresh",
        "cache_info",
        "cache_clear",
        "cache_parameters",
    ),
}


def _wrap(
    cls: type[Any], generated: Any, fn: Callable[..., Any], shared: _Shared, kind: str
) -> Any:
    """The wrapper of ``fn``: a ``cls`` (a descriptor binding its attributes) for a
    method or classmethod; for a function, ``generated`` itself carrying the same
    attributes, as a plain function's call is the cheapest CPython has (no C-level
    indirection).  Given a staticmethod, a staticmethod of that wrapper (never bound)."""
    wrapper = cls(generated)
    functools.update_wrapper(wrapper, fn)
    wrapper._shared = shared
    wrapper._obj = ()
    if kind == "classmethod" or (kind == "function" and shared.builder.method):
        return wrapper
    functools.update_wrapper(generated, fn)
    generated._shared = shared
    generated.group = shared.group
    if shared.cache is not None:
        generated.cache = shared.cache
    for name in _ATTRIBUTES[cls]:
        setattr(generated, name, getattr(wrapper, name))
    return staticmethod(generated) if kind == "staticmethod" else generated


# -- coalesce --------------------------------------------------------------------------


class _Coalesce(Protocol):
    def __call__(self, fn: Callable[P, R], /) -> CoalescedFunction[P, R]: ...


class _Cache(Protocol):
    def __call__(self, fn: Callable[P, R], /) -> CachedFunction[P, R]: ...


@overload
def coalesce(fn: Callable[P, R], /) -> CoalescedFunction[P, R]: ...


@overload
def coalesce(
    *, make_key: _KeyFunction | None = None, group: Any = None, typed: bool = False
) -> _Coalesce: ...


def coalesce(
    fn: Any = None,
    /,
    *,
    make_key: _KeyFunction | None = None,
    group: Any = None,
    typed: bool = False,
) -> Any:
    """Concurrent calls with equal arguments share one execution of the function.

    Use as ``@coalesce`` or ``@coalesce(make_key=..., group=..., typed=...)``.  A
    call made while an equal one is running waits for it and gets its result
    (the same object) or its exception; a call after it has finished runs the
    function again (this is not a cache; see :func:`cached`).  Sync functions
    coalesce through a :class:`~singleflight.Group`, coroutine functions
    through an :class:`~singleflight.AsyncGroup` under asyncio or an
    :class:`~singleflight.anyio.AnyIOGroup` under trio (each decorated function
    gets its own unless ``group=`` is given; then the key starts with the
    function itself, or its qualified name for a group that crosses
    processes, unless ``make_key=`` builds it).

    ``make_key(*args, **kwargs)`` replaces the default key (the bound arguments,
    with ``self`` by identity and per-request web-framework parameters left
    out; see :mod:`singleflight.keys`); ``typed=True`` keys arguments of
    different types apart, as in ``functools.lru_cache``.

    Returns:
      - a :class:`CoalescedFunction` with the function's parameters and return type.

    Raises:
      - at decoration, ``TypeError`` for a generator function, a group that
        does not fit the function (sync vs async), or a function whose every
        parameter is filled per request;
      - at a call, what the group's ``do`` raises, and ``TypeError`` for an
        argument that cannot be part of a key (pass ``make_key=``).

    Cancellation: that of the group's ``do``.
    """

    def decorate(fn: Any) -> Any:
        fn, kind = _unwrap(fn, "coalesce")
        on_class = kind == "classmethod"  # bound to the class, however reached
        _check_make_key(make_key)
        is_async = inspect.iscoroutinefunction(fn)
        if group is not None:
            _check_group(group, is_async, fn, "coalesce")
        builder = _builder(fn, make_key, group, typed, False)
        chosen: Any = group
        if chosen is None:
            chosen = AutoGroup() if is_async else Group()
        shared = _Shared()
        shared.fn, shared.builder, shared.key = fn, builder, builder._raw
        shared.group, shared.is_async, shared.typed = chosen, is_async, typed
        shared.cache, shared.maxsize, shared.on_class = None, None, on_class
        aw = "await " if is_async else ""
        source = (
            f"{'async ' if is_async else ''}def __sf_wrapper({builder.params}):\n"
            f"    __sf_k = {builder.key}\n"
            "    try:\n"
            "        __sf_hash(__sf_k)\n"
            "    except TypeError:\n"
            "        __sf_k = __sf_hashable(__sf_k)\n"
            f"    return {aw}__sf_do(__sf_k, __sf_fn, {builder.call})\n"
        )
        generated = builder.compile(
            source,
            "__sf_wrapper",
            __sf_hash=hash,
            __sf_hashable=builder.hashable,
            __sf_do=chosen.do,
            __sf_fn=fn,
        )
        return _wrap(CoalescedFunction, generated, fn, shared, kind)

    if fn is not None:
        return decorate(fn)
    return decorate


# -- cached ------------------------------------------------------------------------------


class _FunctionCache(LoadingCache[Hashable, Any]):
    """A decorated function's cache: ``load(key)`` calls the function with the arguments
    the key stands for, so ``cache.get``/``cache.refresh`` work on default keys."""

    __slots__ = ("_builder",)
    _builder: KeyBuilder

    def refresh(self, key: Hashable) -> Any:
        self._builder.arguments(key)  # a clear TypeError before any load
        return super().refresh(key)


class _AsyncFunctionCache(AsyncLoadingCache[Hashable, Any]):
    __slots__ = ("_builder",)
    _builder: KeyBuilder

    async def refresh(self, key: Hashable) -> Any:
        self._builder.arguments(key)
        return await super().refresh(key)


class CacheOptions(TypedDict, total=False):
    """The options of :func:`cached`, each optional: those of
    :class:`~singleflight.LoadingCache` (defaults there), and the key's."""

    ttl: float | Callable[[Any], float | None] | None
    jitter: float
    maxsize: int | None
    stale: float
    stale_if_error: float
    early_refresh: float | None
    negative: Callable[[Any], bool] | type[BaseException] | tuple[type[BaseException], ...] | None
    negative_ttl: float | Callable[[Any], float] | None
    cache_if: Callable[[Any], bool] | None
    make_key: _KeyFunction | None
    typed: bool
    group: Any
    fleet: Any
    clock: Callable[[], float]
    random: Callable[[], float]
    name: str | None
    on_event: EventHook | None


@overload
def cached(fn: Callable[P, R], /) -> CachedFunction[P, R]: ...


@overload
def cached(**options: Unpack[CacheOptions]) -> _Cache: ...


def cached(fn: Any = None, /, **options: Unpack[CacheOptions]) -> Any:
    """Put a loading cache in front of the function: the decorator form of
    :class:`~singleflight.LoadingCache` (sync functions) and
    :class:`~singleflight.AsyncLoadingCache` (coroutine functions, under
    asyncio or trio).

    Use as ``@cached`` (no expiry, LRU-bounded) or ``@cached(ttl=..., ...)``
    with the options of :class:`~singleflight.LoadingCache` (listed in
    :class:`CacheOptions`; an unknown one is a ``TypeError``): ``ttl`` and
    ``negative_ttl`` may be functions of the value (per-entry lifetimes; a
    ``ttl`` of 0 stores nothing), ``cache_if`` a predicate on values (only
    those it accepts are stored; concurrent callers still share the call).  A
    call with the arguments of a cached entry is answered from it; concurrent
    calls that miss share one execution.  Keys are built as for
    :func:`coalesce` (``make_key=``, ``typed=``).  ``name`` labels the cache's
    events and metrics (default: the function's qualified name); ``on_event``
    receives every read's event, hits included, and the removal of entries
    (:class:`~singleflight.events.CacheRemoved`).
    ``fleet=`` (a ``redis.Redis`` / ``redis.asyncio.Redis`` client, or a
    :class:`~singleflight.redis.Fleet`) shares the entries with every process
    on that Redis, under the function's qualified name (see the cache's
    ``fleet=``).

    Returns:
      - a :class:`CachedFunction` with the function's parameters and return type.

    Raises:
      - at decoration, as :func:`coalesce` and the cache's options do;
      - at a call, what the cache's ``get`` raises, and ``TypeError`` for an
        argument that cannot be part of a key.

    Cancellation: that of the cache's ``get``.
    """

    unknown = sorted(options.keys() - CacheOptions.__optional_keys__)
    if unknown:
        raise TypeError(
            f"@cached got unknown options {', '.join(unknown)}; it takes "
            f"{', '.join(sorted(CacheOptions.__optional_keys__))}"
        )
    make_key = options.get("make_key")
    typed = options.get("typed", False)
    group = options.get("group")
    maxsize = options.get("maxsize", DEFAULT_MAXSIZE)
    cache_options: dict[str, Any] = {
        option: value for option, value in options.items() if option not in ("make_key", "typed")
    }

    def decorate(fn: Any) -> Any:
        fn, kind = _unwrap(fn, "cached")
        on_class = kind == "classmethod"  # bound to the class, however reached
        _check_make_key(make_key)
        is_async = inspect.iscoroutinefunction(fn)
        if group is not None:
            _check_group(group, is_async, fn, "cached")
        builder = _builder(fn, make_key, group, typed, True)
        qualname = _qualified_name(fn)
        arguments = builder.arguments
        name = options.get("name")
        with_name = {**cache_options, "name": qualname if name is None else name}
        cache: Any
        if is_async:

            async def aload(key: Hashable) -> Any:
                args, kwargs = arguments(key)
                return await fn(*args, **kwargs)

            cache = _AsyncFunctionCache(aload, **with_name)
        else:

            def load(key: Hashable) -> Any:
                args, kwargs = arguments(key)
                return fn(*args, **kwargs)

            cache = _FunctionCache(load, **with_name)
        cache._builder = builder
        get, reload, drop_where = cache._get, cache._reload, cache._drop_where
        dead, data = builder.dead, cache._data

        def sweep() -> None:
            # Entries of instances that no longer exist: no call can ask for them.
            # Each sweep reads every key, so it waits for deaths to add up to an
            # eighth of the entries: a few reads per death.
            dying = set(map(id, dead))
            dead.clear()
            index = builder.self_index
            drop_where(
                lambda key: isinstance(key, tuple) and len(key) > index and id(key[index]) in dying
            )

        miss: Callable[..., Any]
        refresh: Callable[..., Any]
        refreshes: Any
        if is_async:

            async def amiss(key: Hashable, /, *args: Any, **kwargs: Any) -> Any:
                if dead and len(dead) * 8 >= len(data):
                    sweep()
                return await get(key, functools.partial(fn, *args, **kwargs))

            arefresher: AutoGroup[Hashable, Any] = AutoGroup()

            async def arefresh(*args: Any, **kwargs: Any) -> Any:
                key = builder.hashable(builder._raw(*args, **kwargs))
                thunk = functools.partial(fn, *args, **kwargs)
                return await arefresher.do(key, reload, key, thunk)

            miss, refresh, refreshes = amiss, arefresh, arefresher
        else:

            def smiss(key: Hashable, /, *args: Any, **kwargs: Any) -> Any:
                if dead and len(dead) * 8 >= len(data):
                    sweep()
                return get(key, functools.partial(fn, *args, **kwargs))

            refresher: Group[Hashable, Any] = Group()

            def srefresh(*args: Any, **kwargs: Any) -> Any:
                key = builder.hashable(builder._raw(*args, **kwargs))
                return refresher.do(key, reload, key, functools.partial(fn, *args, **kwargs))

            miss, refresh, refreshes = smiss, srefresh, refresher

        shared = _Shared()
        shared.fn, shared.builder, shared.key = fn, builder, builder._raw
        shared.group, shared.is_async, shared.typed = cache._group, is_async, typed
        shared.cache, shared.maxsize, shared.on_class = cache, maxsize, on_class
        shared.refresh, shared.invalidate = refresh, cache.invalidate
        shared.refresher = refreshes
        aw = "await " if is_async else ""
        # The hit path is this one function: the key from the parameters (Python
        # binds them), a dict lookup, one clock reading.  A cache made with
        # on_event has no entries in __sf_fast: every read goes through get.
        source = (
            f"{'async ' if is_async else ''}def __sf_wrapper({builder.params}):\n"
            f"    __sf_k = {builder.key}\n"
            "    try:\n"
            "        __sf_e = __sf_fast[__sf_k]\n"
            "    except KeyError:\n"
            "        pass\n"
            "    except TypeError:\n"
            "        __sf_k = __sf_hashable(__sf_k)\n"
            "    else:\n"
            "        if __sf_clock() < __sf_e.fresh_until:\n"
            "            __sf_e.hits = __sf_e.hits + 1.0\n"
            "            return __sf_e.value\n"
            f"    return {aw}__sf_miss(__sf_k, {builder.call})\n"
        )
        generated = builder.compile(
            source,
            "__sf_wrapper",
            __sf_fast=cache._fast,
            __sf_clock=cache._clock,
            __sf_hashable=builder.hashable,
            __sf_miss=miss,
        )
        return _wrap(CachedFunction, generated, fn, shared, kind)

    if fn is not None:
        return decorate(fn)
    return decorate
