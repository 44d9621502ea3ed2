"""What the ASGI middleware and the httpx transports share: a response's status,
headers and body as lists, strings and numbers (what any codec carries), and back."""

from __future__ import annotations

import base64
from typing import Any

# Raw headers: (name, value) pairs of bytes.
Headers = list[tuple[bytes, bytes]]


def encode_response(status: int, headers: Headers, body: bytes) -> list[Any]:
    """``[status, headers as latin-1 strings, body in base64]``."""
    return [
        status,
        [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers],
        base64.b64encode(body).decode("ascii"),
    ]


def decode_response(status: Any, headers: Any, body: Any) -> tuple[int, Headers, bytes]:
    """The status, headers and body back from what :func:`encode_response` made."""
    return (
        int(status),
        [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers],
        base64.b64decode(body),
    )
