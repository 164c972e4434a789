"""Versioned msgpack codec for Duet's typed wire messages. Never pickle.

A message is a ``@dataclass`` subclass of :class:`Message` with a class-level ``TYPE`` string. Defining the
class registers it; ``encode`` writes one msgpack map ``{"v": PROTOCOL_VERSION, "type": TYPE, <fields>}`` and
``decode`` turns such bytes back into the registered class, checking every field against its annotation::

    @dataclass
    class Abort(Message):
        TYPE = "abort"
        request_id: str
        reason: str | None = None

    decode(encode(Abort("r1")))  # -> Abort(request_id='r1', reason=None)

Field annotations may be ``int``, ``float`` (ints are accepted and widened), ``bool``, ``str``, ``bytes``,
``None``, ``Any``, unions / ``Optional``, ``Literal[...]``, ``list[X]``, ``tuple[X, ...]`` / ``tuple[A, B]``,
``dict[K, V]`` (non-string keys are fine), ``str``-valued enums (sent as their value; a value outside the enum
is a ProtocolError naming the field) and nested dataclasses (sent as maps of their fields, no version or type
of their own). Unknown keys are ignored, so a sender may add an optional field without a version
bump; anything else that does not fit (wrong version, unknown type, missing or mistyped field, bytes that
are not msgpack) raises :class:`ProtocolError`, on ``encode`` as well as on ``decode``.
"""
from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, ClassVar

import msgpack

PROTOCOL_VERSION = 1
_RESERVED_KEYS = frozenset({"v", "type"})


class ProtocolError(ValueError):
    """Bytes or a message that do not follow Duet's wire protocol."""


class Message:
    """Base of every wire message. Subclasses set ``TYPE`` and are ``@dataclass``es."""

    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        type_name = cls.__dict__.get("TYPE")
        if not type_name:
            return  # an intermediate base, not a message of its own
        if not isinstance(type_name, str):
            raise TypeError(f"{cls.__qualname__}.TYPE must be a str, got {type_name!r}")
        previous = _REGISTRY.get(type_name)
        # Re-registering the same class (a module imported again under the same name) replaces it.
        if previous is not None and (previous.__module__, previous.__qualname__) != (cls.__module__, cls.__qualname__):
            taken_by = f"{previous.__module__}.{previous.__qualname__}"
            raise TypeError(f"wire type {type_name!r} is already taken by {taken_by}")
        _REGISTRY[type_name] = cls
        _HINTS.pop(cls, None)


_REGISTRY: dict[str, type[Message]] = {}
_HINTS: dict[type, dict[str, Any]] = {}


def registered_types() -> dict[str, type[Message]]:
    """A copy of the registry: wire type name -> message class."""
    return dict(_REGISTRY)


def encode(msg: Message) -> bytes:
    """``msg`` as one msgpack map carrying the protocol version and the message type."""
    cls = type(msg)
    if not isinstance(msg, Message) or not cls.__dict__.get("TYPE") or _REGISTRY.get(cls.TYPE) is not cls:
        raise ProtocolError(f"{cls.__qualname__} is not a registered wire message")
    body = _fields_to_wire(msg, cls.TYPE)
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": cls.TYPE, **body}, use_bin_type=True)


def decode(data: bytes | bytearray | memoryview) -> Message:
    """The message encoded in ``data``; :class:`ProtocolError` when it is not a valid one."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"not a msgpack message: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a msgpack map, got {type(obj).__name__}")
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version mismatch: got {version!r}, this build speaks {PROTOCOL_VERSION}")
    type_name = obj.get("type")
    cls = _REGISTRY.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {type_name!r}")
    return _dataclass_from_wire(cls, obj, type_name)


# ---------------------------------------------------------------------------------------------- internals


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__qualname__} must be a @dataclass to go on the wire")
        all_hints = typing.get_type_hints(cls)
        hints = {f.name: all_hints[f.name] for f in dataclasses.fields(cls)}
        if issubclass(cls, Message) and _RESERVED_KEYS & hints.keys():
            raise TypeError(f"{cls.__qualname__} uses reserved field names {sorted(_RESERVED_KEYS & hints.keys())}")
        _HINTS[cls] = hints
    return hints


def _fields_to_wire(obj: Any, path: str) -> dict[str, Any]:
    out = {}
    for name, tp in _hints(type(obj)).items():
        wire_value = _to_wire(getattr(obj, name))
        _from_wire(wire_value, tp, f"{path}.{name}")  # the sender fails as the receiver would
        out[name] = wire_value
    return out


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {_to_wire(k): _to_wire(v) for k, v in value.items()}
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _dataclass_from_wire(cls: type, obj: Any, path: str) -> Any:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{path}: expected a map for {cls.__qualname__}, got {type(obj).__name__}")
    kwargs = {}
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        if field.name not in obj:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{path}: missing field {field.name!r}")
            continue
        kwargs[field.name] = _from_wire(obj[field.name], _hints(cls)[field.name], f"{path}.{field.name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # __post_init__ validation
        raise ProtocolError(f"{path}: invalid {cls.__qualname__}: {exc}") from exc


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _from_wire(value: Any, tp: Any, path: str) -> Any:
    """``value`` (as msgpack produced it) converted to ``tp``, or ProtocolError."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        for arm in args:
            try:
                return _from_wire(value, arm, path)
            except ProtocolError:
                pass
        raise ProtocolError(f"{path}: {value!r:.80} fits none of {_type_name(tp)}")
    if origin is typing.Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ProtocolError(f"{path}: {value!r:.80} is not one of {list(args)}")
    if origin in (list, tuple, dict):
        return _container_from_wire(value, origin, args, path)
    if tp is type(None) or tp is None:
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (bool, str, bytes):
        if isinstance(value, tp):
            return value
    elif isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ProtocolError(f"{path}: {value!r:.80} is not one of {[m.value for m in tp]}") from None
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_from_wire(tp, value, path)
    else:
        raise ProtocolError(f"{path}: annotation {tp!r} is not supported on the wire")
    raise ProtocolError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r:.80}")


def _container_from_wire(value: Any, origin: type, args: tuple, path: str) -> Any:
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"{path}: expected a map, got {type(value).__name__}")
        key_tp, val_tp = args or (Any, Any)
        return {
            _from_wire(k, key_tp, f"{path}[key]"): _from_wire(v, val_tp, f"{path}[{k!r:.40}]") for k, v in value.items()
        }
    if not isinstance(value, list):
        raise ProtocolError(f"{path}: expected a list, got {type(value).__name__}")
    if origin is list:
        item_tp = args[0] if args else Any
        return [_from_wire(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if not args or (len(args) == 2 and args[1] is Ellipsis):
        item_tp = args[0] if args else Any
        return tuple(_from_wire(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ProtocolError(f"{path}: expected {len(args)} items, got {len(value)}")
    return tuple(_from_wire(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))

