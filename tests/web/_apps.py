"""The apps the web tests serve: the same endpoints in Starlette and in Django, counted and gated.

``/hello``   counts its calls, waits at the gate, answers "hello <Authorization>"
``/stream``  counts its calls, waits at the gate, streams three chunks (no Content-Length)
``POST /hello`` counts, waits at the gate like GET
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio

from .._support import Gate

CHUNKS = [b"one,", b"two,", b"three"]


class Endpoint:
    """What the endpoints report: calls (started) and the gate they wait at."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.gate = Gate()

    def reset(self) -> None:
        with self.lock:
            self.calls = 0
        self.gate = Gate()

    def called(self) -> None:
        with self.lock:
            self.calls += 1


endpoint = Endpoint()


async def _gated_chunks() -> AsyncIterator[bytes]:
    await endpoint.gate.wait_async(timeout=30)
    for chunk in CHUNKS:
        yield chunk


# -- Starlette ------------------------------------------------------------------------------


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    async def hello(request: Request) -> PlainTextResponse:
        endpoint.called()
        await endpoint.gate.wait_async(timeout=30)
        return PlainTextResponse("hello " + request.headers.get("authorization", "anyone"))

    async def stream(request: Request) -> StreamingResponse:
        endpoint.called()
        return StreamingResponse(_gated_chunks())

    return Starlette(
        routes=[Route("/hello", hello, methods=["GET", "POST"]), Route("/stream", stream)]
    )


# -- Django ---------------------------------------------------------------------------------


def configure_django() -> None:
    """Settings for every Django test of this package (configured once per process)."""
    import django
    from django.conf import settings

    if settings.configured:
        return
    settings.configure(
        DEBUG=False,
        SECRET_KEY="singleflight-tests",
        ALLOWED_HOSTS=["*"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[],
        INSTALLED_APPS=[],
        USE_TZ=True,
        CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}},
    )
    django.setup()


async def django_hello(request: Any) -> Any:
    from django.http import HttpResponse

    endpoint.called()
    await endpoint.gate.wait_async(timeout=30)
    return HttpResponse("hello " + request.headers.get("authorization", "anyone"))


async def django_stream(request: Any) -> Any:
    from django.http import StreamingHttpResponse

    endpoint.called()
    return StreamingHttpResponse(_gated_chunks())


def _csrf_exempt(view: Any) -> Any:
    from django.views.decorators.csrf import csrf_exempt

    return csrf_exempt(view)


def django_app() -> Any:
    configure_django()
    from django.core.asgi import get_asgi_application

    return get_asgi_application()


def __getattr__(name: str) -> Any:
    # ROOT_URLCONF reads urlpatterns after settings are configured.
    if name == "urlpatterns":
        from django.urls import path

        return [path("hello", _csrf_exempt(django_hello)), path("stream", django_stream)]
    raise AttributeError(name)


async def asgi_get(
    app: Any, path: str, *headers: tuple[bytes, bytes], query: bytes = b""
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One GET through ``app`` (``path`` percent-decoded, as servers give it); the
    (status, headers, body) of its response.  The client never disconnects."""
    sent: list[Any] = []
    given = False

    async def receive() -> Any:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await anyio.sleep_forever()

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"test"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], dict(sent[0]["headers"]), body
