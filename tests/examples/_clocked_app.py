"""The web_service example's app, with its cache's clock moved by the test instead of by time.

The example's ``AsyncLoadingCache`` reads ``clock`` (by default ``time.monotonic``, bound when
the module defining it is imported).  Importing those modules while ``time.monotonic`` is this
module's clock makes the cache's default clock ours; everything else (asyncio, uvicorn) keeps
the real one.  ``POST /_test/advance?seconds=S`` moves the cache's time forward by S seconds,
so TTL windows open and close when the test says, however slowly a loaded machine serves.

Run it as uvicorn runs the example: ``uvicorn _clocked_app:app --app-dir tests/examples``.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "web_service"))

_lock = threading.Lock()
_now = 1000.0


def clock() -> float:
    return _now


_monotonic = time.monotonic
time.monotonic = clock
try:
    # The modules whose constructors take clock=time.monotonic as a default: imported
    # now, they bind ours (the package itself loads them lazily).
    import singleflight.cache._async
    import singleflight.cache._sync
    import singleflight.func  # noqa: F401
finally:
    time.monotonic = _monotonic

import app as example  # noqa: E402


async def advance(request: Request) -> JSONResponse:
    global _now
    with _lock:
        _now += float(request.query_params["seconds"])
    return JSONResponse({"now": _now})


example.app.router.routes.append(Route("/_test/advance", advance, methods=["POST"]))
app = example.app
