"""Coalescing in front of any ASGI app: concurrent identical requests share one call of the app.

Wrap the app (Starlette, FastAPI, Django's ASGI handler, Quart...)::

    from singleflight.asgi import CoalescingMiddleware

    app = CoalescingMiddleware(app)

Requests are *identical* when they have the same method, scheme, path and
query string and the same values of the headers that can change the response:
``Host``, ``Range`` and the conditional headers always, ``Authorization`` and
``Cookie`` by default (so one user is never served another's response; see
``vary=``), and the headers named by the ``Vary`` of the responses seen for
that path.  Only ``GET`` and ``HEAD`` requests without a body are coalesced
by default; everything else passes straight through.

The first of a set of identical requests (the *leader*) calls the app, which
answers it as usual, message by message; its response (status, headers, body)
is replayed to every request that arrived while it ran (the *joiners*).  A
response is not shared, and the joiners then call the app themselves, when it
streams (its first body message says more is coming and it has no
``Content-Length``), when its body grows past ``max_body`` bytes, when it sets
a cookie, when it has ``Vary: *`` or trailers, when the app fails or sends no
complete response, or when it varies on a header whose value differs between
the leader and a joiner.

The app's call on behalf of several requests is detached from the leader's
connection: it never sees the leader's ``http.disconnect`` while joiners may
still need its response (a joiner's disconnect only ever concerns that
joiner).  A leader whose own task is cancelled by its server makes the joiners
call the app themselves; they do not fail.

The group decides who leads: an :class:`~singleflight.AsyncGroup` by default,
an :class:`~singleflight.anyio.AnyIOGroup` for apps served on trio, or an
:class:`~singleflight.redis.AsyncRedisGroup` made with ``result_ttl=0`` to
share one call among the workers of several processes (responses then travel
through the group's codec as JSON-friendly lists; keep ``max_body`` under its
``max_payload``).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Final, TypeAlias

from ._http import decode_response, encode_response
from ._protocols import check_coalesces_only, crosses_processes

__all__ = ["ASGIApp", "CoalescingMiddleware", "STATUS_HEADER"]

Scope: TypeAlias = MutableMapping[str, Any]
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]

#: A name for ``status_header=``: ``singleflight-status: leader | shared | bypass``.
STATUS_HEADER: Final = "singleflight-status"

# Headers always part of a request's identity: a virtual host, a byte range and
# the conditional headers (a 304 or 206 must never reach a plain GET).
_ALWAYS = (
    b"host",
    b"range",
    b"if-range",
    b"if-match",
    b"if-none-match",
    b"if-modified-since",
    b"if-unmodified-since",
)
# Paths whose learned Vary names are kept; past this the memory starts afresh.
_MAX_LEARNED = 4096

# Empty body chunks read at most before a GET is taken for one with a body (passed through).
_MAX_EMPTY_CHUNKS = 8

_EMPTY_BODY: Final[Message] = {"type": "http.request", "body": b"", "more_body": False}

# A shared response: status, headers, body, and the (name, leader's value) of
# each header named by its Vary that was not already part of the key.
_Shared: TypeAlias = tuple[
    int, list[tuple[bytes, bytes]], bytes, tuple[tuple[bytes, bytes | None], ...]
]


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class _Lead:
    """One request's bid to lead: what its loader waits for, and what the leader decided."""

    __slots__ = ("decided", "leading", "role", "value", "verdict")

    def __init__(self) -> None:
        self.leading = False
        self.value: _Shared | None = None
        # Set once the leader knows whether its response is shared: an asyncio
        # future (the loader's own, asyncio groups) or an anyio event.
        self.verdict: Any = None
        self.decided = False
        # Set when this request learns its role, for groups that start loaders later.
        self.role: Any = None


class _AsyncioLead(_Lead):
    __slots__ = ()

    async def load(self) -> Any:
        self.leading = True
        if self.role is not None:
            self.role.set()
        if self.decided:
            return self.value
        self.verdict = asyncio.get_running_loop().create_future()
        return await self.verdict

    def decide(self, value: Any) -> None:
        if self.decided:
            return
        self.decided = True
        self.value = value
        verdict = self.verdict
        if verdict is not None and not verdict.done():
            verdict.set_result(value)


class _AnyIOLead(_Lead):
    __slots__ = ()

    def __init__(self, event: Any) -> None:
        super().__init__()
        self.verdict = event()
        self.role = event()

    async def load(self) -> Any:
        self.leading = True
        self.role.set()
        await self.verdict.wait()
        return self.value

    def decide(self, value: Any) -> None:
        if self.decided:
            return
        self.decided = True
        self.value = value
        self.verdict.set()


class CoalescingMiddleware:
    """ASGI middleware: concurrent identical requests share one call of ``app``.

    Options:

    * ``group``: who decides which request leads; an
      :class:`~singleflight.AsyncGroup` (the default), an
      :class:`~singleflight.anyio.AnyIOGroup` (trio), or an
      :class:`~singleflight.redis.AsyncRedisGroup` made with ``result_ttl=0``
      (across processes; ``ValueError`` for one that keeps results, which would
      serve a response to later requests as a cache).  It must not be shared
      with other uses (its values are this middleware's).
    * ``methods``: the methods coalesced (default ``GET`` and ``HEAD``).
    * ``vary``: request headers, beyond ``Host``, ``Range`` and the conditional
      ones, that are part of a request's identity (default ``Authorization``
      and ``Cookie``).  Pass ``()`` only for an app whose responses do not
      depend on who asks.
    * ``max_body``: the largest body shared, in bytes (default 256 KiB).
    * ``status_header``: a response header to add, e.g. :data:`STATUS_HEADER`:
      ``leader`` (this request called the app), ``shared`` (a copy of the
      leader's response) or ``bypass`` (the app was called for this request
      alone).  ``None`` (the default) adds nothing.
    """

    __slots__ = (
        "_crosses",
        "_learned",
        "_max_body",
        "_methods",
        "_status",
        "_use_future",
        "_vary",
        "app",
        "group",
    )

    def __init__(
        self,
        app: ASGIApp,
        *,
        group: Any = None,
        methods: Iterable[str] = ("GET", "HEAD"),
        vary: Iterable[str] = ("authorization", "cookie"),
        max_body: int = 256 * 1024,
        status_header: str | None = None,
    ) -> None:
        if isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 0:
            raise ValueError(f"max_body must be a whole number of bytes >= 0, not {max_body!r}")
        if isinstance(methods, str) or isinstance(vary, str):
            raise TypeError("methods and vary are collections of names, not one string")
        if group is None:
            from ._asyncio import AsyncGroup

            group = AsyncGroup(name="asgi")
        if not callable(getattr(group, "do", None)):
            raise TypeError(f"group must have a do() method, not {group!r}")
        check_coalesces_only(group, "CoalescingMiddleware")
        self.app = app
        self.group = group
        self._methods = frozenset(method.upper() for method in methods)
        self._vary = frozenset(_ALWAYS) | {name.lower().encode("latin-1") for name in vary}
        self._max_body = max_body
        self._status = None if status_header is None else status_header.lower().encode("latin-1")
        self._crosses = crosses_processes(group)
        # asyncio groups hand back asyncio futures from do_future(); the others
        # (AnyIOGroup) are driven through do() in a task group.
        self._use_future = callable(getattr(group, "do_future", None)) and not type(
            group
        ).__module__.startswith("singleflight.anyio")
        # Path -> the header names in its key, once a response named more in Vary.
        self._learned: dict[str, frozenset[bytes]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in self._methods:
            await self.app(scope, receive, send)
            return
        first, empty = await _read_empty_body(receive)
        if not empty:
            await self._bypass(scope, _replay(first, receive), send)
            return
        vary = self._learned.get(scope["path"], self._vary)
        picked = tuple(pair for pair in scope["headers"] if pair[0] in vary)
        key: Any = (
            scope["method"],
            scope.get("scheme", "http"),
            scope.get("root_path", ""),
            scope["path"],
            scope.get("query_string", b""),
            picked,
        )
        if self._crosses:
            key = _text_key(key)
        if self._use_future:
            lead = _AsyncioLead()
            waiter = self.group.do_future(key, lead.load)
            waiter.add_done_callback(_mark_retrieved)
            if not lead.leading and not waiter.done():
                # A group that starts its loader later (a Redis group asks Redis first).
                lead.role = role = asyncio.Event()
                waiter.add_done_callback(lambda _: role.set())
                await role.wait()
            if lead.leading:
                await self._lead(lead, scope, receive, send)
                return
            try:
                outcome = waiter.result()
            except Exception:
                outcome = None
            await self._join(outcome, scope, first, receive, send)
            return
        await self._via_task_group(key, scope, first, receive, send)

    async def _via_task_group(
        self, key: Any, scope: Scope, first: list[Message], receive: Receive, send: Send
    ) -> None:
        import anyio

        lead = _AnyIOLead(anyio.Event)
        outcome: Any = None

        async def call() -> None:
            nonlocal outcome
            try:
                outcome = await self.group.do(key, lead.load)
            except Exception:
                outcome = None
            finally:
                lead.role.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(call)
            await lead.role.wait()
            if lead.leading:
                # The call above stays a caller of the flight until it ends.
                await self._lead(lead, scope, receive, send)
                return
        await self._join(outcome, scope, first, receive, send)

    # -- the leader ------------------------------------------------------------------

    async def _lead(self, lead: Any, scope: Scope, receive: Receive, send: Send) -> None:
        max_body = self._max_body
        chunks: list[bytes] = []
        size = 0
        headers: list[tuple[bytes, bytes]] = []
        status = 0
        streaming = True  # until a Content-Length says otherwise
        gone = False  # the leader's own client: its send failed
        body_given = False
        parked: Any = None  # what receive() calls wait on while joiners may need the call

        def unshare() -> None:
            lead.decide(None)
            if parked is not None:
                parked.set()

        async def detached_receive() -> Message:
            nonlocal body_given, parked
            if not body_given:
                body_given = True
                return _EMPTY_BODY
            # While joiners may need this call's response, or have it, the
            # leader's disconnect is not this call's business.
            while not lead.decided or lead.value is not None:
                if parked is None:
                    parked = _event_like(lead)
                await parked.wait()
            return await receive()

        async def capture_send(message: Message) -> None:
            nonlocal size, status, headers, streaming, gone
            if lead.decided:
                if not gone:
                    await send(message)
                return
            kind = message["type"]
            if kind == "http.response.body":
                body = message.get("body", b"")
                more = message.get("more_body", False)
                size += len(body)
                if size > max_body or (more and streaming and not chunks):
                    unshare()
                else:
                    chunks.append(body)
                    if not more:
                        shared = self._shared(scope, status, headers, chunks)
                        if shared is None:
                            unshare()
                        else:
                            lead.decide(shared)
            elif kind == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                for name, _ in headers:
                    name = name.lower()
                    if name == b"content-length":
                        streaming = False
                    elif name == b"set-cookie":
                        unshare()
                if message.get("trailers", False):
                    unshare()
                if self._status is not None:
                    message = dict(message)
                    message["headers"] = [*headers, (self._status, b"leader")]
            else:  # trailers, pathsend...: not a response to replay
                unshare()
            if gone:
                return
            try:
                await send(message)
            except Exception:
                if lead.decided and lead.value is None:
                    raise
                gone = True  # the response goes on for the joiners

        try:
            await self.app(scope, detached_receive, capture_send)
        finally:
            unshare()

    def _shared(
        self, scope: Scope, status: int, headers: list[tuple[bytes, bytes]], chunks: list[bytes]
    ) -> Any:
        """The value of a shared response, or None when its Vary is ``*``."""
        vary: list[tuple[bytes, bytes | None]] = []
        names: set[bytes] = set()
        for name, value in headers:
            if name.lower() == b"vary":
                names.update(p.strip().lower() for p in value.split(b",") if p.strip())
        if b"*" in names:
            return None
        keyed = self._learned.get(scope["path"], self._vary)
        extra = names - keyed
        if extra:
            if len(self._learned) >= _MAX_LEARNED:
                self._learned.clear()
            self._learned[scope["path"]] = keyed | extra
            for name in sorted(extra):
                vary.append((name, _header(scope, name)))
        shared: _Shared = (status, headers, b"".join(chunks), tuple(vary))
        return _encode(shared) if self._crosses else shared

    # -- the joiners -----------------------------------------------------------------

    async def _join(
        self, outcome: Any, scope: Scope, first: list[Message], receive: Receive, send: Send
    ) -> None:
        shared: _Shared | None
        try:
            shared = _decode(outcome) if self._crosses else outcome
        except (TypeError, ValueError, IndexError):
            shared = None
        if shared is None or any(_header(scope, name) != value for name, value in shared[3]):
            await self._bypass(scope, _replay(first, receive), send)
            return
        status, headers, body, _ = shared
        if self._status is not None:
            headers = [*headers, (self._status, b"shared")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _bypass(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._status is None:
            await self.app(scope, receive, send)
            return
        mark = self._status

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), (mark, b"bypass")]
            await send(message)

        await self.app(scope, receive, marked)


async def _read_empty_body(receive: Receive) -> tuple[list[Message], bool]:
    """The request's first messages, and whether they make an empty body.

    A request without a body may still come in several empty chunks (httpx's
    ``ASGITransport`` sends an empty one with ``more_body`` before the last).
    Reading goes on while the messages are empty ``http.request`` chunks that
    say more is coming, at most :data:`_MAX_EMPTY_CHUNKS` of them.
    """
    messages = [await receive()]
    while (
        len(messages) < _MAX_EMPTY_CHUNKS
        and messages[-1]["type"] == "http.request"
        and messages[-1].get("more_body", False)
        and not messages[-1].get("body", b"")
    ):
        messages.append(await receive())
    last = messages[-1]
    empty = (
        last["type"] == "http.request"
        and not last.get("more_body", False)
        and not any(message.get("body", b"") for message in messages)
    )
    return messages, empty


def _replay(first: list[Message], receive: Receive) -> Receive:
    """A receive() that hands back ``first`` (already read) and then reads on."""
    given = list(first)

    async def replay() -> Message:
        if given:
            return given.pop(0)
        return await receive()

    return replay


def _header(scope: Scope, name: bytes) -> bytes | None:
    """The request's values of header ``name``, comma-joined; None when absent."""
    values = [value for key, value in scope["headers"] if key == name]
    return b", ".join(values) if values else None


def _event_like(lead: _Lead) -> Any:
    """An event of the lead's backend, for receive() calls parked while joiners may wait."""
    if isinstance(lead, _AnyIOLead):
        return type(lead.role)()
    return asyncio.Event()


def _text_key(key: tuple[Any, ...]) -> str:
    """A key for a group that crosses processes: readable path, and a hash of it all."""
    method, scheme, root, path, query, _ = key
    # The digest covers every part: the readable prefix alone is ambiguous (a
    # decoded path may hold "?", and root_path and path are run together).
    digest = hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()
    return f"{method} {scheme}:{root}{path}?{query.decode('latin-1')} {digest}"


def _encode(shared: _Shared) -> list[Any]:
    """A shared response as lists, strings and numbers: what any codec carries."""
    status, headers, body, vary = shared
    return [
        *encode_response(status, headers, body),
        [[name.decode("latin-1"), None if v is None else v.decode("latin-1")] for name, v in vary],
    ]


def _decode(data: Any) -> _Shared | None:
    if data is None:
        return None
    status, headers, body, vary = data
    return (
        *decode_response(status, headers, body),
        tuple((n.encode("latin-1"), None if v is None else v.encode("latin-1")) for n, v in vary),
    )
