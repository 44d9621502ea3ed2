"""Django: ``get_or_set`` that computes a missing value once, and cached views that coalesce misses.

Install with ``pip install 'pysingleflight[django]'``::

    from singleflight.django import CoalescingCache, coalesce_page

    cache = CoalescingCache("default")            # any alias of settings.CACHES
    report = cache.get_or_set("report", build_report, timeout=300)
    report = await cache.aget_or_set("report", build_report, timeout=300)

    @coalesce_page(60)                            # cache_page(60), misses coalesced
    def dashboard(request): ...

Concurrent misses of one key in a process (threads, or tasks of one event loop)
wait for one computation; give ``group=`` a
:class:`~singleflight.redis.RedisGroup` (and ``agroup=`` an
:class:`~singleflight.redis.AsyncRedisGroup`) to have one computation across
processes; the value then travels through the group's codec.  The cache is
read again before computing, so a caller that finds the value stored by a
computation that just ended does not compute it again.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterable
from typing import Any

from ._options import missing

try:
    import django  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised without Django installed
    raise missing("django", "django", "Django 4.2 or later") from exc

from django.core.cache import caches
from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.views.decorators.cache import cache_page

from ._asyncio import AsyncGroup
from ._protocols import AsyncGroupLike, GroupLike, crosses_processes
from ._threads import Group

__all__ = ["CoalescingCache", "coalesce_page"]

_MISSING = object()
_COMMAS = re.compile(r"\s*,\s*")


class CoalescingCache:
    """A Django cache whose ``get_or_set``/``aget_or_set`` compute a missing value once.

    ``cache`` is an alias of ``settings.CACHES`` (looked up on each call, as
    Django's connections are per thread) or a cache object.  Every other
    attribute (``get``, ``set``, ``delete``...) is the cache's own.
    ``group`` coalesces the threads' misses (a :class:`~singleflight.Group` by
    default) and ``agroup`` the tasks' (an :class:`~singleflight.AsyncGroup`).

    ``name`` names the cache in the flights' keys (by default its alias; for
    a cache object, the object's identity in this process).  A cache object
    with a group that crosses processes (a Redis group) needs one, the same in
    every process (``TypeError`` without): an object's identity means nothing
    in another process.  Two different caches must not share a name under one
    group: their misses of one key would share one computation, stored in the
    first cache only.
    """

    def __init__(
        self,
        cache: str | BaseCache = "default",
        *,
        name: str | None = None,
        group: GroupLike[str, Any] | None = None,
        agroup: AsyncGroupLike[str, Any] | None = None,
    ) -> None:
        self._alias = cache if isinstance(cache, str) else None
        self._cache = None if isinstance(cache, str) else cache
        self.group: GroupLike[str, Any] = Group(name="django") if group is None else group
        self.agroup: AsyncGroupLike[str, Any] = (
            AsyncGroup(name="django") if agroup is None else agroup
        )
        if name is None:
            name = self._alias
        if name is None and (crosses_processes(self.group) or crosses_processes(self.agroup)):
            raise TypeError(
                "CoalescingCache of a cache object with a group that crosses processes: "
                "give name=, the same in every process that shares this cache (the "
                "object's identity differs between processes, and one process's may be "
                "another cache's in the next)"
            )
        # The flights' keys start with it (a cache object: kept alive here, so its
        # id is never another's while this wrapper lives).
        self._prefix = f"{id(cache):x}" if name is None else name

    @property
    def cache(self) -> BaseCache:
        """The wrapped cache (for an alias, this thread's connection)."""
        if self._cache is not None:
            return self._cache
        return caches[self._alias]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)

    def _flight_key(self, cache: BaseCache, key: str, version: int | None) -> str:
        return f"{self._prefix}:{cache.make_key(key, version=version)}"

    def get_or_set(
        self, key: str, default: Any, timeout: object = DEFAULT_TIMEOUT, version: int | None = None
    ) -> Any:
        """The value of ``key``; on a miss, compute ``default()`` once, store it and return it.

        Returns the stored value, or what the computation returned (``default``
        itself when it is not callable).  Raises what the computation raises,
        in every caller that waited for it.  A ``None`` value is not stored,
        as with Django's own ``get_or_set``; ``timeout`` (seconds, ``None`` for
        ever) and ``version`` are its own too.
        """
        cache = self.cache
        value = cache.get(key, _MISSING, version=version)
        if value is not _MISSING:
            return value

        def compute() -> Any:
            found = cache.get(key, _MISSING, version=version)
            if found is not _MISSING:
                return found
            value = default() if callable(default) else default
            if value is not None:
                cache.set(key, value, timeout, version=version)
            return value

        return self.group.do(self._flight_key(cache, key, version), compute)

    async def aget_or_set(
        self, key: str, default: Any, timeout: object = DEFAULT_TIMEOUT, version: int | None = None
    ) -> Any:
        """As :meth:`get_or_set`, for coroutines; ``default`` may return an awaitable.

        Cancellation: a cancelled caller leaves alone; the computation goes on
        for the others (and is stored).
        """
        cache = self.cache
        value = await cache.aget(key, _MISSING, version=version)
        if value is not _MISSING:
            return value

        async def compute() -> Any:
            found = await cache.aget(key, _MISSING, version=version)
            if found is not _MISSING:
                return found
            value = default() if callable(default) else default
            if inspect.isawaitable(value):
                value = await value
            if value is not None:
                await cache.aset(key, value, timeout, version=version)
            return value

        return await self.agroup.do(self._flight_key(cache, key, version), compute)

    def __repr__(self) -> str:
        return f"<CoalescingCache {self._alias or self._cache!r}>"


# -- cached views ----------------------------------------------------------------------------


def _vary_names(response: HttpResponseBase) -> list[str]:
    if not response.has_header("Vary"):
        return []
    return [name.strip().lower() for name in _COMMAS.split(response["Vary"]) if name.strip()]


def _shareable(response: HttpResponseBase) -> bool:
    return (
        isinstance(response, HttpResponse)
        and not response.streaming
        and not response.cookies
        and "*" not in _vary_names(response)
    )


def _copy(response: HttpResponse) -> HttpResponse:
    copy = HttpResponse(response.content, status=response.status_code)
    copy.reason_phrase = response.reason_phrase
    for name, value in response.items():
        copy[name] = value
    return copy


def _serves(leader: HttpRequest, request: HttpRequest, response: HttpResponse) -> bool:
    """Whether the leader's response answers ``request`` too, as far as its Vary says."""
    return all(
        leader.headers.get(name) == request.headers.get(name) for name in _vary_names(response)
    )


def coalesce_page(
    timeout: float,
    *,
    cache: str | None = None,
    key_prefix: str | None = None,
    vary: Iterable[str] = ("authorization", "cookie"),
    group: GroupLike[Any, Any] | None = None,
    agroup: AsyncGroupLike[Any, Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Django's ``cache_page(timeout, cache=, key_prefix=)``, with concurrent misses coalesced.

    Concurrent ``GET``/``HEAD`` requests for one URL with the same ``Host`` and
    ``vary`` headers (``Authorization`` and ``Cookie`` by default) render the
    view once; the others get a copy of its response.  A response that is
    streamed, sets cookies, or varies (``Vary``) on a header with another value
    in a waiting request is not shared: those requests run the view
    themselves.  Works on sync and async views (``group`` and ``agroup``
    default to an in-process :class:`~singleflight.Group` and
    :class:`~singleflight.AsyncGroup`; responses are objects, so these groups
    must not cross processes: the page cache itself is what the processes share).
    """
    headers = tuple(name.lower() for name in ("host", *vary))
    sync_group: GroupLike[Any, Any] = Group(name="django-pages") if group is None else group
    async_group: AsyncGroupLike[Any, Any] = (
        AsyncGroup(name="django-pages") if agroup is None else agroup
    )

    def page_key(request: HttpRequest) -> tuple[object, ...]:
        return (
            request.method,
            request.scheme,
            request.get_full_path(),
            tuple(request.headers.get(name) for name in headers),
        )

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        cached_view = cache_page(timeout, cache=cache, key_prefix=key_prefix)(view)

        if inspect.iscoroutinefunction(view):

            @functools.wraps(view)
            async def async_wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
                if request.method not in ("GET", "HEAD"):
                    return await cached_view(request, *args, **kwargs)
                led = False

                async def render() -> tuple[HttpRequest, HttpResponseBase]:
                    nonlocal led
                    led = True
                    response = await cached_view(request, *args, **kwargs)
                    return request, response

                leader, response = await async_group.do(page_key(request), render)
                if led:
                    return response
                if not _shareable(response) or not _serves(leader, request, response):
                    return await cached_view(request, *args, **kwargs)
                return _copy(response)

            return async_wrapper

        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> Any:
            if request.method not in ("GET", "HEAD"):
                return cached_view(request, *args, **kwargs)
            led = False

            def render() -> tuple[HttpRequest, HttpResponseBase]:
                nonlocal led
                led = True
                return request, cached_view(request, *args, **kwargs)

            leader, response = sync_group.do(page_key(request), render)
            if led:
                return response
            if not _shareable(response) or not _serves(leader, request, response):
                return cached_view(request, *args, **kwargs)
            return _copy(response)

        return wrapper

    return decorator
