"""httpx transports: identical concurrent outbound GETs share one network round trip.

Install with ``pip install 'pysingleflight[httpx]'``::

    import httpx
    from singleflight.httpx import AsyncCoalescingTransport, CoalescingTransport

    client = httpx.Client(transport=CoalescingTransport())
    aclient = httpx.AsyncClient(transport=AsyncCoalescingTransport())

Requests are identical when they have the same method, URL and headers (the
client's default headers included, so requests with different credentials
never share).  Only ``GET`` and ``HEAD`` requests without a body are coalesced
by default; the others go straight to the wrapped transport.

The first request of a set (the leader) is sent; the others wait for its
response, and each caller gets a :class:`httpx.Response` of its own with the
same status, headers and raw body (decoded by its client as usual).  A body
longer than ``max_body`` bytes is not shared: the leader gets it streamed, the
others send their own requests.  So do the others when the leader's request
timed out (its timeouts are its own) or its caller was cancelled: one caller's
timeout or cancellation never fails the rest.

With a :class:`~singleflight.redis.RedisGroup` (``result_ttl=0``) the workers
of several processes share one request: keys are then text (the method, the
URL and a hash of the whole request) and responses travel through the group's
codec as JSON-friendly lists (base64 body).  A caller in another process whose
leader failed, or whose response could not cross, sends its own request.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from ._options import missing

try:
    # singleflight/httpx.py importing "httpx": imports are absolute, so this is
    # the third-party package, never this module.
    import httpx
except ImportError as exc:  # pragma: no cover - exercised without httpx installed
    raise missing("httpx", "httpx", "httpx 0.27 or later") from exc

from ._asyncio import AsyncGroup
from ._http import decode_response, encode_response
from ._protocols import AsyncGroupLike, GroupLike, check_coalesces_only, crosses_processes
from ._threads import Group
from .errors import AbortedError, SingleflightError, TooManyFlightsError

__all__ = ["AsyncCoalescingTransport", "CoalescingTransport"]

# What a flight hands every caller: status, raw headers, raw body, extensions.
_Shared = tuple[int, list[tuple[bytes, bytes]], bytes, dict[str, Any]]
# Extensions that describe the response rather than the connection that carried it.
_COPIED = ("http_version", "reason_phrase")


class _Unshared:
    """A leader's response too long to share: its caller alone reads the rest."""

    __slots__ = ("head", "headers", "response", "rest")

    def __init__(
        self,
        response: httpx.Response,
        head: list[bytes],
        rest: Any,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.response = response
        self.head = head
        self.rest = rest  # the iterator of raw chunks the head came from
        self.headers = list(response.headers.raw) if headers is None else headers


class _Rest(httpx.SyncByteStream):
    def __init__(self, head: list[bytes], rest: Iterator[bytes], response: httpx.Response):
        self._head = head
        self._rest = rest
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        yield from self._head
        yield from self._rest

    def close(self) -> None:
        self._response.close()


class _AsyncRest(httpx.AsyncByteStream):
    def __init__(self, head: list[bytes], rest: AsyncIterator[bytes], response: httpx.Response):
        self._head = head
        self._rest = rest
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._head:
            yield chunk
        async for chunk in self._rest:
            yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


def _key(request: httpx.Request) -> tuple[str, str, tuple[tuple[bytes, bytes], ...]]:
    return (request.method, str(request.url), tuple(request.headers.raw))


def _text_key(request: httpx.Request) -> str:
    """A key for a group that crosses processes: readable method and URL, and a hash of
    the whole key (headers included)."""
    digest = hashlib.blake2b(repr(_key(request)).encode(), digest_size=16).hexdigest()
    return f"{request.method} {request.url} {digest}"


def _encode(outcome: _Shared | _Unshared) -> list[Any] | None:
    """What crosses processes: a shared response as lists, strings and numbers; None
    for a response too long to share."""
    if isinstance(outcome, _Unshared):
        return None
    status, headers, body, extensions = outcome
    return [
        *encode_response(status, headers, body),
        {k: v.decode("latin-1") for k, v in extensions.items() if isinstance(v, bytes)},
    ]


def _decode(data: Any) -> _Shared | None:
    if data is None:
        return None
    status, headers, body, extensions = data
    return (
        *decode_response(status, headers, body),
        {k: v.encode("latin-1") for k, v in extensions.items()},
    )


def _remote_failure(exc: SingleflightError, crosses: bool, led: bool) -> bool:
    """Whether a caller of a cross-process group should send its own request after
    ``exc``: the leader's outcome did not reach it (a remote error, a codec's, Redis's)."""
    return crosses and not led and not isinstance(exc, TooManyFlightsError)


def _check_group(group: Any, who: str) -> bool:
    """Whether ``group`` crosses processes (``ValueError`` if it keeps results)."""
    check_coalesces_only(group, who)
    return crosses_processes(group)


def _shares(request: httpx.Request, methods: frozenset[str]) -> bool:
    if request.method not in methods:
        return False
    length = request.headers.get("content-length")
    return (length is None or length == "0") and "transfer-encoding" not in request.headers


def _response(shared: _Shared, request: httpx.Request) -> httpx.Response:
    status, headers, body, extensions = shared
    return httpx.Response(
        status,
        headers=headers,
        stream=httpx.ByteStream(body),
        request=request,
        extensions=dict(extensions),
    )


def _read_already(response: httpx.Response) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
    """The headers and raw body of a response whose body was read before it got here.

    ``httpx.Response(200, json=...)`` or ``content=b"..."`` (the way a
    :class:`httpx.MockTransport` handler usually answers) reads its body at once;
    streaming it again raises :class:`httpx.StreamConsumed`.  Returns None for a
    response still to be streamed.
    """
    if not response.is_stream_consumed:
        return None
    stream = response.stream
    if isinstance(stream, httpx.ByteStream):  # built from bytes: still holds them, raw
        return list(response.headers.raw), b"".join(stream)
    # Read from another stream: only the decoded body is left, so no Content-Encoding.
    body = response.content
    dropped = (b"content-encoding", b"content-length", b"transfer-encoding")
    headers = [(name, value) for name, value in response.headers.raw if name.lower() not in dropped]
    headers.append((b"content-length", str(len(body)).encode("ascii")))
    return headers, body


def _whole(
    response: httpx.Response,
    read: tuple[list[tuple[bytes, bytes]], bytes],
    max_body: int,
    rest: Any,
) -> _Shared | _Unshared:
    headers, body = read
    if len(body) > max_body:
        return _Unshared(response, [body], rest, headers)
    return _shared(response, headers, body)


def _shared(response: httpx.Response, headers: list[tuple[bytes, bytes]], body: bytes) -> _Shared:
    """What a flight hands its callers: ``response``'s status and the extensions
    that describe it, with ``headers`` and ``body``."""
    extensions = {
        name: response.extensions[name] for name in _COPIED if name in response.extensions
    }
    return (response.status_code, headers, body, extensions)


async def _no_more() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


def _check(max_body: int, methods: Iterable[str]) -> frozenset[str]:
    if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 0:
        raise ValueError(f"max_body must be a whole number of bytes >= 0, not {max_body!r}")
    if isinstance(methods, str):
        raise TypeError("methods is a collection of names, not one string")
    return frozenset(method.upper() for method in methods)


class CoalescingTransport(httpx.BaseTransport):
    """An :class:`httpx.BaseTransport` for :class:`httpx.Client` that coalesces identical GETs.

    Options: ``transport`` (what sends the requests, by default an
    :class:`httpx.HTTPTransport`), ``group`` (a :class:`~singleflight.Group`
    by default, or a :class:`~singleflight.redis.RedisGroup` made with
    ``result_ttl=0`` to share requests among processes; ``ValueError`` for one
    that keeps results, which would serve a response to later requests as a
    cache), ``methods`` (default ``GET`` and ``HEAD``) and ``max_body`` (the
    longest body shared, in bytes; default 1 MiB; with a Redis group keep it
    under three quarters of the group's ``max_payload``).
    """

    def __init__(
        self,
        transport: httpx.BaseTransport | None = None,
        *,
        group: GroupLike[Any, Any] | None = None,
        methods: Iterable[str] = ("GET", "HEAD"),
        max_body: int = 1 << 20,
    ) -> None:
        self._methods = _check(max_body, methods)
        self.transport = httpx.HTTPTransport() if transport is None else transport
        self.group: GroupLike[Any, Any] = Group(name="httpx") if group is None else group
        self._crosses = _check_group(self.group, "CoalescingTransport")
        self._max_body = max_body

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``, or wait for the identical one in flight and copy its response.

        Returns a response of this caller's own.  Raises what the wrapped
        transport raises for the request that was sent (a joiner whose leader
        timed out sends its own request and raises what that raises).
        """
        if not _shares(request, self._methods):
            return self.transport.handle_request(request)
        crosses = self._crosses
        led = False
        mine: _Shared | _Unshared | None = None  # the leader's own, across processes

        def send() -> Any:
            nonlocal led, mine
            led = True
            mine = self._send(request)
            return _encode(mine) if crosses else mine

        try:
            outcome = self.group.do(_text_key(request) if crosses else _key(request), send)
        except (httpx.TimeoutException, AbortedError):
            if led:
                raise
            return self.transport.handle_request(request)
        except SingleflightError as exc:
            if mine is not None:  # sent, but the group failed to share it: ours still
                outcome = mine
            elif _remote_failure(exc, crosses, led):
                return self.transport.handle_request(request)
            else:
                raise
        else:
            if crosses:
                outcome = mine if mine is not None else _decode(outcome)
        if outcome is None:  # too long to share, in another process
            return self.transport.handle_request(request)
        if isinstance(outcome, _Unshared):
            if not led:
                return self.transport.handle_request(request)
            response = outcome.response
            return httpx.Response(
                response.status_code,
                headers=outcome.headers,
                stream=_Rest(outcome.head, outcome.rest, response),
                request=request,
                extensions=response.extensions,
            )
        return _response(outcome, request)

    def _send(self, request: httpx.Request) -> _Shared | _Unshared:
        response = self.transport.handle_request(request)
        read = _read_already(response)
        if read is not None:
            response.close()
            return _whole(response, read, self._max_body, iter(()))
        chunks: list[bytes] = []
        size = 0
        try:
            stream = response.iter_raw()
            for chunk in stream:
                chunks.append(chunk)
                size += len(chunk)
                if size > self._max_body:
                    return _Unshared(response, chunks, stream)
        except BaseException:
            response.close()
            raise
        response.close()
        return _shared(response, list(response.headers.raw), b"".join(chunks))

    def close(self) -> None:
        self.transport.close()


class AsyncCoalescingTransport(httpx.AsyncBaseTransport):
    """An :class:`httpx.AsyncBaseTransport` for :class:`httpx.AsyncClient`; see
    :class:`CoalescingTransport`.

    ``transport`` defaults to an :class:`httpx.AsyncHTTPTransport` and
    ``group`` to an :class:`~singleflight.AsyncGroup` (an
    :class:`~singleflight.anyio.AnyIOGroup` on trio, an
    :class:`~singleflight.redis.AsyncRedisGroup` made with ``result_ttl=0``
    across processes).
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        group: AsyncGroupLike[Any, Any] | None = None,
        methods: Iterable[str] = ("GET", "HEAD"),
        max_body: int = 1 << 20,
    ) -> None:
        self._methods = _check(max_body, methods)
        self.transport = httpx.AsyncHTTPTransport() if transport is None else transport
        self.group: AsyncGroupLike[Any, Any] = AsyncGroup(name="httpx") if group is None else group
        self._crosses = _check_group(self.group, "AsyncCoalescingTransport")
        self._max_body = max_body

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``, or wait for the identical one in flight and copy its response.

        Returns a response of this caller's own.  Raises what the wrapped
        transport raises for the request that was sent.

        Cancellation: cancelling a caller affects it alone; the request in
        flight goes on for the others (a request whose every caller left runs
        to its end unless the group cancels orphaned flights).
        """
        if not _shares(request, self._methods):
            return await self.transport.handle_async_request(request)
        crosses = self._crosses
        led = left = False
        mine: _Shared | _Unshared | None = None  # the leader's own outcome
        key = _text_key(request) if crosses else _key(request)

        async def send() -> Any:
            nonlocal led, mine
            led = True
            mine = await self._send(request)
            if isinstance(mine, _Unshared) and left:
                # Its caller is gone: nobody else reads this response.
                await mine.response.aclose()
            return _encode(mine) if crosses else mine

        try:
            outcome = await self.group.do(key, send)
        except (httpx.TimeoutException, AbortedError):
            if led:
                raise
            return await self.transport.handle_async_request(request)
        except SingleflightError as exc:
            if mine is not None:  # sent, but the group failed to share it: ours still
                outcome = mine
            elif _remote_failure(exc, crosses, led):
                return await self.transport.handle_async_request(request)
            else:
                raise
        except BaseException:  # cancelled: a response kept for this caller is closed
            left = True
            if isinstance(mine, _Unshared):
                await mine.response.aclose()
            raise
        else:
            if crosses:
                outcome = mine if mine is not None else _decode(outcome)
        if outcome is None:  # too long to share, in another process
            return await self.transport.handle_async_request(request)
        if isinstance(outcome, _Unshared):
            if not led:
                return await self.transport.handle_async_request(request)
            response = outcome.response
            return httpx.Response(
                response.status_code,
                headers=outcome.headers,
                stream=_AsyncRest(outcome.head, outcome.rest, response),
                request=request,
                extensions=response.extensions,
            )
        return _response(outcome, request)

    async def _send(self, request: httpx.Request) -> _Shared | _Unshared:
        response = await self.transport.handle_async_request(request)
        read = _read_already(response)
        if read is not None:
            await response.aclose()
            return _whole(response, read, self._max_body, _no_more())
        chunks: list[bytes] = []
        size = 0
        try:
            stream = response.aiter_raw()
            async for chunk in stream:
                chunks.append(chunk)
                size += len(chunk)
                if size > self._max_body:
                    return _Unshared(response, chunks, stream)
        except BaseException:
            await response.aclose()
            raise
        await response.aclose()
        return _shared(response, list(response.headers.raw), b"".join(chunks))

    async def aclose(self) -> None:
        await self.transport.aclose()
