"""Codecs: round trips, refusals, and pickle run only on bytes this secret signed."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from singleflight.redis import Codec, CodecError, JsonCodec, MsgpackCodec, SignedPickleCodec

KEY = b"sf:{ns:k}"
SECRET = b"0123456789abcdef0123456789abcdef"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_json_round_trips_json_values(value: Any) -> None:
    codec = JsonCodec()
    assert codec.decode(KEY, codec.encode(KEY, value)) == value


def test_json_refuses_what_it_would_not_give_back() -> None:
    codec = JsonCodec()
    for value, match in [
        (("a", 1), "tuples"),
        ({1: "int key"}, "tuples"),
        ([("nested",)], "tuples"),
        ({"a", "set"}, "cannot encode"),
        (b"bytes", "cannot encode"),
        (float("nan"), "cannot encode"),
        (object(), "cannot encode"),
    ]:
        with pytest.raises(CodecError, match=match):
            codec.encode(KEY, value)
    assert JsonCodec(strict=False).decode(KEY, JsonCodec(strict=False).encode(KEY, (1, 2))) == [
        1,
        2,
    ]


def test_json_refuses_other_payloads() -> None:
    codec = JsonCodec()
    for payload in (b"", b"garbage", b"j1:{broken", b"j1:\xff\xfe", b"m1:\x81", "j1:[]"):
        with pytest.raises(CodecError):
            codec.decode(KEY, payload)  # type: ignore[arg-type]


def test_msgpack_round_trips_and_refuses() -> None:
    pytest.importorskip("msgpack")
    codec = MsgpackCodec()
    value = {"a": [1, 2.5, None, True], 3: b"\x00\xff", "n": {"x": "y"}}
    assert codec.decode(KEY, codec.encode(KEY, value)) == value
    with pytest.raises(CodecError, match="tuples"):
        codec.encode(KEY, {"t": (1, 2)})
    with pytest.raises(CodecError):
        codec.encode(KEY, object())
    for payload in (b"m1:\xc1", b"j1:[]", b"m1:"):
        with pytest.raises(CodecError):
            codec.decode(KEY, payload)


def test_msgpack_extension_types_stay_inert() -> None:
    msgpack = pytest.importorskip("msgpack")
    payload = b"m1:" + msgpack.packb(msgpack.ExtType(42, b"anything"))
    decoded = MsgpackCodec().decode(KEY, payload)
    assert decoded == msgpack.ExtType(42, b"anything")


def test_signed_pickle_round_trips_any_picklable_value() -> None:
    codec = SignedPickleCodec(SECRET)
    value = {("tuple", 1): {1, 2}, "b": b"x", "f": frozenset({3})}
    assert codec.decode(KEY, codec.encode(KEY, value)) == value


class _Exploit:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.sentinel}",))


def test_signed_pickle_never_unpickles_what_it_did_not_sign(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    codec = SignedPickleCodec(SECRET)
    evil = pickle.dumps(_Exploit(sentinel))
    good = codec.encode(KEY, "fine")
    mac = good[6:38]
    attempts = {
        "no signature": b"p1:k1:" + evil,
        "zero signature": b"p1:k1:" + b"\0" * 32 + evil,
        "signature of another payload": b"p1:k1:" + mac + evil,
        "other secret": SignedPickleCodec(b"x" * 32).encode(KEY, _Exploit(sentinel)),
        "unknown key id": b"p1:k9:" + mac + evil,
        "no key id": b"p1::" + mac + evil,
        "bare pickle": evil,
        "truncated": good[:20],
    }
    for name, payload in attempts.items():
        with pytest.raises(CodecError):
            codec.decode(KEY, payload)
        assert not sentinel.exists(), name


def test_signed_pickle_is_bound_to_its_key() -> None:
    codec = SignedPickleCodec(SECRET)
    payload = codec.encode(b"sf:{ns:a}", "for a")
    with pytest.raises(CodecError, match="bad signature"):
        codec.decode(b"sf:{ns:b}", payload)
    # The key is length-prefixed: moving bytes between key and payload breaks the MAC.
    with pytest.raises(CodecError):
        codec.decode(b"sf:{ns:a}p", payload)


def test_signed_pickle_rotation() -> None:
    old = SignedPickleCodec(b"o" * 32, key_id="v1")
    new = SignedPickleCodec(SECRET, key_id="v2", previous={"v1": b"o" * 32})
    assert new.decode(KEY, old.encode(KEY, "old")) == "old"
    assert new.encode(KEY, "x").startswith(b"p1:v2:")
    with pytest.raises(CodecError, match="unknown key id"):
        old.decode(KEY, new.encode(KEY, "new"))


def test_signed_pickle_options_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        SignedPickleCodec(b"short")
    with pytest.raises(TypeError):
        SignedPickleCodec(12345)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key_id"):
        SignedPickleCodec(SECRET, key_id="has:colon")
    with pytest.raises(ValueError, match="previous"):
        SignedPickleCodec(SECRET, previous={"old": b"short"})
    assert SignedPickleCodec("a str secret of at least 32 bytes!").encode(KEY, 1)


def test_signed_but_unloadable_payload_is_a_codec_error() -> None:
    codec = SignedPickleCodec(SECRET)
    data = b"\x80\x05\x95garbage"
    payload = b"p1:k1:" + codec._mac(SECRET, KEY, data) + data
    with pytest.raises(CodecError, match="unpickle"):
        codec.decode(KEY, payload)


def test_unpicklable_values_are_codec_errors() -> None:
    with pytest.raises(CodecError, match="cannot pickle"):
        SignedPickleCodec(SECRET).encode(KEY, lambda: None)


def test_codecs_satisfy_the_protocol() -> None:
    for codec in (JsonCodec(), SignedPickleCodec(SECRET)):
        assert isinstance(codec, Codec)
    assert "strict=True" in repr(JsonCodec())
    assert "k1" in repr(SignedPickleCodec(SECRET)) and "0123" not in repr(SignedPickleCodec(SECRET))
