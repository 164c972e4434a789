"""The msgpack wire codec: round trips, and a clear ProtocolError for everything that does not fit."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import msgpack
import pytest

from duet.transfer.compat import KVLayout
from duet.transfer.transport import RemoteRegion
from duet.transfer.wire import PROTOCOL_VERSION, Message, ProtocolError, decode, encode, registered_types


@dataclass
class Point:
    x: int
    y: float


@dataclass
class Everything(Message):
    TYPE = "test.everything"
    name: str
    count: int
    ratio: float
    flag: bool
    blob: bytes
    maybe: Optional[int]
    ids: list[int]
    by_id: dict[int, str]
    nested: dict[str, list[bytes]]
    pair: tuple[int, str]
    many: tuple[float, ...]
    point: Point
    points: list[Point]
    role: Literal["prefill", "decode"]
    anything: Any = None
    union: int | str = 0
    tags: list[str] = field(default_factory=list)


@dataclass
class Small(Message):
    TYPE = "test.small"
    request_id: str
    token_ids: list[int]
    layout: KVLayout | None = None
    region: RemoteRegion | None = None


def _everything() -> Everything:
    return Everything(
        name="ü-req", count=-(2**40), ratio=0.25, flag=True, blob=b"\x00\xff" * 3, maybe=None, ids=[1, 2, 3],
        by_id={7: "seven", -1: "minus"}, nested={"k": [b"a", b""]}, pair=(4, "four"), many=(1.0, 2.5),
        point=Point(1, 2.0), points=[Point(3, 4.5)], role="decode", anything={"free": [1, None]}, union="s",
        tags=["a"],
    )


def _raw(**fields) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, **fields}, use_bin_type=True)


def test_round_trip_all_field_kinds():
    msg = _everything()
    assert decode(encode(msg)) == msg


def test_round_trip_nested_transfer_types():
    layout = KVLayout(model="m", dtype="bfloat16", num_layers=2, num_kv_heads=8, head_dim=128, block_size=16)
    region = RemoteRegion(agent="d-1", region_id=3, nbytes=1 << 30, addr=0x7F0000000000, mem_type="VRAM", device_id=1)
    msg = Small("r", list(range(1000)), layout, region)
    assert decode(encode(msg)) == msg
    assert decode(encode(Small("r", []))) == Small("r", [])


def test_encoded_form_is_a_plain_versioned_map():
    obj = msgpack.unpackb(encode(Small("r", [1])), raw=False)
    assert obj == {"v": PROTOCOL_VERSION, "type": "test.small", "request_id": "r", "token_ids": [1],
                   "layout": None, "region": None}


def test_int_widens_to_float_and_unknown_keys_are_ignored():
    msg = decode(_raw(type="test.small", request_id="r", token_ids=[], extra_field_from_newer_peer=1))
    assert msg == Small("r", [])
    wire = msgpack.unpackb(encode(_everything()), raw=False, strict_map_key=False)
    wire["ratio"] = 3
    assert decode(msgpack.packb(wire, use_bin_type=True)).ratio == 3.0


def test_version_mismatch():
    with pytest.raises(ProtocolError, match="version mismatch"):
        decode(msgpack.packb({"v": PROTOCOL_VERSION + 1, "type": "test.small", "request_id": "r", "token_ids": []}))
    with pytest.raises(ProtocolError, match="version"):
        decode(msgpack.packb({"type": "test.small", "request_id": "r", "token_ids": []}))


def test_unknown_type_and_garbage():
    with pytest.raises(ProtocolError, match="unknown message type 'nope'"):
        decode(_raw(type="nope"))
    with pytest.raises(ProtocolError, match="not a msgpack message"):
        decode(b"\xc1garbage")
    with pytest.raises(ProtocolError, match="expected a msgpack map"):
        decode(msgpack.packb([1, 2]))


@pytest.mark.parametrize("fields, match", [
    ({"token_ids": [1]}, "missing field 'request_id'"),
    ({"request_id": 5, "token_ids": []}, r"request_id: expected str"),
    ({"request_id": "r", "token_ids": [1, "2"]}, r"token_ids\[1\]: expected int"),
    ({"request_id": "r", "token_ids": [True]}, r"token_ids\[0\]: expected int"),
    ({"request_id": "r", "token_ids": {}}, "expected a list"),
    ({"request_id": "r", "token_ids": [], "layout": {"model": "m"}}, "layout"),
    ({"request_id": "r", "token_ids": [], "layout": {"model": "m", "dtype": "int4", "num_layers": 1,
                                                     "num_kv_heads": 1, "head_dim": 1, "block_size": 1}}, "layout"),
])
def test_wrong_or_missing_fields(fields, match):
    with pytest.raises(ProtocolError, match=match):
        decode(_raw(type="test.small", **fields))


def test_literal_and_tuple_checks():
    wire = msgpack.unpackb(encode(_everything()), raw=False, strict_map_key=False)
    for key, bad in (("role", "router"), ("pair", [1]), ("pair", ["x", "y"]), ("many", [1.0, "x"]), ("union", 1.5)):
        broken = dict(wire, **{key: bad})
        with pytest.raises(ProtocolError, match=key):
            decode(msgpack.packb(broken, use_bin_type=True))


def test_encode_checks_types_too():
    with pytest.raises(ProtocolError, match="token_ids"):
        encode(Small("r", ["not an int"]))  # type: ignore[list-item]
    with pytest.raises(ProtocolError, match="not a registered wire message"):
        encode(Point(1, 2.0))  # type: ignore[arg-type]


def test_registry():
    types = registered_types()
    assert types["test.small"] is Small and types["test.everything"] is Everything
    with pytest.raises(TypeError, match="already taken"):
        @dataclass
        class Clash(Message):  # noqa: F841 - defining it is the test
            TYPE = "test.small"
            x: int


def test_reserved_field_names_rejected():
    @dataclass
    class Bad(Message):
        TYPE = "test.bad_reserved"
        v: int

    with pytest.raises(TypeError, match="reserved"):
        encode(Bad(1))
