"""How values travel through Redis: JSON by default, msgpack optional, signed pickle opt-in.

A codec turns a value into bytes and back.  Both methods get the flight's
Redis key (bytes) as *context*: a signing codec binds its signature to it, so
an entry cannot be replayed under another key.  Every payload starts with its
codec's tag, so a group never decodes another codec's bytes: a mismatch, like
any payload that fails to decode, raises :class:`CodecError`, which the groups
treat as a miss (the value is loaded again), never as code to run.

Write your own by implementing :class:`Codec`'s two methods; ``decode`` must
raise :class:`CodecError` for anything it does not trust.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import json
import pickle
import struct
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from ..errors import SingleflightError

__all__ = [
    "Codec",
    "CodecError",
    "JsonCodec",
    "MsgpackCodec",
    "PayloadTooLargeError",
    "SignedPickleCodec",
]


class CodecError(SingleflightError, ValueError):
    """A value could not be encoded, or a payload could not be trusted or decoded."""


class PayloadTooLargeError(CodecError):
    """An encoded value is larger than the group's ``max_payload``."""


@runtime_checkable
class Codec(Protocol):
    """Encodes values for Redis and decodes them back.

    ``decode`` must raise :class:`CodecError` for a payload it cannot decode or
    does not trust; it must never run code taken from the payload.
    """

    def encode(self, key: bytes, value: Any) -> bytes: ...

    def decode(self, key: bytes, data: bytes) -> Any: ...


def _strip(tag: bytes, data: bytes, name: str) -> memoryview:
    if not isinstance(data, bytes) or not data.startswith(tag):
        raise CodecError(f"not a {name} payload")
    return memoryview(data)[len(tag) :]


class _PlainCodec:
    """A codec of plain data: ``strict`` refuses a value that would not come back equal."""

    __slots__ = ("_strict",)

    tag = b""
    _cannot = ""  # advice after "cannot encode"
    _unequal = ""  # what comes back different, and what to do

    def __init__(self, *, strict: bool = True) -> None:
        self._strict = strict

    def _dump(self, value: Any) -> bytes:
        raise NotImplementedError

    def _load(self, data: bytes | memoryview) -> Any:
        raise NotImplementedError

    def encode(self, key: bytes, value: Any) -> bytes:
        name, where = type(self).__name__, key.decode(errors="replace")
        try:
            data = self._dump(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise CodecError(
                f"{name} cannot encode the value of {where}: {exc}{self._cannot}"
            ) from exc
        if self._strict and self._load(data) != value:
            raise CodecError(
                f"{name} would not give back an equal value for {where} {self._unequal}"
            )
        return self.tag + data

    def decode(self, key: bytes, data: bytes) -> Any:
        name = type(self).__name__
        body = _strip(self.tag, data, name)
        try:
            return self._load(body)
        except Exception as exc:  # JSONDecodeError, UnicodeDecodeError, msgpack's several
            raise CodecError(f"undecodable {name} payload: {exc}") from exc

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strict={self._strict})"


class JsonCodec(_PlainCodec):
    """JSON values: ``None``, ``bool``, ``int``, ``float``, ``str``, lists and str-keyed dicts.

    With ``strict=True`` (the default) a value JSON would not give back equal,
    such as a tuple (it comes back a list) or a dict with int keys (they come
    back str), is refused with :class:`CodecError` when it is encoded, rather
    than reaching other processes in a different shape than the leader's
    callers got.  NaN and infinities are refused too.
    """

    __slots__ = ()

    tag = b"j1:"
    _cannot = "; return JSON types, or use MsgpackCodec or SignedPickleCodec"
    _unequal = (
        "(tuples come back as lists, dict keys as strings); return JSON types, "
        "or pass JsonCodec(strict=False)"
    )

    def _dump(self, value: Any) -> bytes:
        return json.dumps(
            value, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()

    def _load(self, data: bytes | memoryview) -> Any:
        return json.loads(bytes(data))


class MsgpackCodec(_PlainCodec):
    """msgpack values (needs the ``msgpack`` package: ``pip install 'pysingleflight[msgpack]'``).

    Like JSON plus ``bytes`` and non-str dict keys.  ``strict`` refuses values
    msgpack would not give back equal (tuples come back as lists).  Extension
    types are decoded as inert ``msgpack.ExtType`` records, never by a hook.
    """

    __slots__ = ("_msgpack",)

    tag = b"m1:"
    _unequal = "(tuples come back as lists); pass MsgpackCodec(strict=False) to accept that"

    def __init__(self, *, strict: bool = True) -> None:
        try:
            msgpack = importlib.import_module("msgpack")
        except ImportError as exc:
            raise ImportError(
                "MsgpackCodec needs the msgpack package: pip install 'pysingleflight[msgpack]'"
            ) from exc
        self._msgpack: Any = msgpack
        super().__init__(strict=strict)

    def _dump(self, value: Any) -> bytes:
        data: bytes = self._msgpack.packb(value, use_bin_type=True)
        return data

    def _load(self, data: bytes | memoryview) -> Any:
        return self._msgpack.unpackb(data, raw=False, strict_map_key=False)


_MAC_SIZE = hashlib.sha256().digest_size


def _secret(name: str, secret: object) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode()
    if not isinstance(secret, bytes):
        raise TypeError(f"{name} must be bytes or str; got {type(secret).__name__}")
    if len(secret) < 32:
        raise ValueError(
            f"{name} must be at least 32 bytes (got {len(secret)}); "
            "make one with secrets.token_bytes(32)"
        )
    return secret


def _key_id(key_id: object) -> bytes:
    if (
        not isinstance(key_id, str)
        or not 0 < len(key_id) <= 32
        or not key_id.isascii()
        or not key_id.isalnum()
    ):
        raise ValueError(f"key_id must be 1-32 ASCII letters or digits; got {key_id!r}")
    return key_id.encode()


class SignedPickleCodec:
    """Any picklable value, signed: pickle is only ever run on bytes this group's secret signed.

    Each payload carries ``key_id`` and an HMAC-SHA256 over the flight's key and
    the pickle bytes (the key length-prefixed, so no key/payload split can
    collide).  ``decode`` checks it with :func:`hmac.compare_digest` *before*
    unpickling; a forged payload, one replayed from another key, one signed
    with an unknown key id, or any other codec's payload raises
    :class:`CodecError` and is read as a miss.

    Anyone holding ``secret`` can make every process that trusts it run code,
    so keep it as secret as a password.  For rotation, sign with a new
    ``key_id``/``secret`` and keep accepting the old one through
    ``previous={"old-id": old_secret}`` until its entries have expired.
    """

    __slots__ = ("_key_id", "_keys", "_protocol", "_secret")

    tag = b"p1:"

    def __init__(
        self,
        secret: bytes | str,
        *,
        key_id: str = "k1",
        previous: Mapping[str, bytes | str] | None = None,
        protocol: int = pickle.HIGHEST_PROTOCOL,
    ) -> None:
        self._secret = _secret("secret", secret)
        self._key_id = _key_id(key_id)
        self._keys = {self._key_id: self._secret}
        for old_id, old_secret in (previous or {}).items():
            self._keys[_key_id(old_id)] = _secret(f"previous[{old_id!r}]", old_secret)
        self._protocol = protocol

    @staticmethod
    def _mac(secret: bytes, key: bytes, data: bytes | memoryview) -> bytes:
        mac = hmac.new(secret, struct.pack(">I", len(key)), hashlib.sha256)
        mac.update(key)
        mac.update(data)
        return mac.digest()

    def encode(self, key: bytes, value: Any) -> bytes:
        try:
            data = pickle.dumps(value, protocol=self._protocol)
        except Exception as exc:  # PicklingError, TypeError, AttributeError...
            raise CodecError(
                f"SignedPickleCodec cannot pickle the value of {key.decode(errors='replace')}: "
                f"{exc}"
            ) from exc
        mac = self._mac(self._secret, key, data)
        return b"".join((self.tag, self._key_id, b":", mac, data))

    def decode(self, key: bytes, data: bytes) -> Any:
        body = _strip(self.tag, data, "SignedPickleCodec")
        colon = body.tobytes()[:33].find(b":")
        if colon <= 0:
            raise CodecError("SignedPickleCodec payload without a key id")
        secret = self._keys.get(body[:colon].tobytes())
        if secret is None:
            raise CodecError("SignedPickleCodec payload signed with an unknown key id")
        mac = body[colon + 1 : colon + 1 + _MAC_SIZE]
        pickled = body[colon + 1 + _MAC_SIZE :]
        if len(mac) != _MAC_SIZE or not hmac.compare_digest(
            self._mac(secret, key, pickled), mac.tobytes()
        ):
            raise CodecError("SignedPickleCodec payload with a bad signature: not unpickled")
        try:
            return pickle.loads(pickled)
        except Exception as exc:  # signed but unloadable (a class that moved, say)
            raise CodecError(f"signed payload failed to unpickle: {exc!r}") from exc

    def __repr__(self) -> str:
        return f"SignedPickleCodec(key_id={self._key_id.decode()!r})"
