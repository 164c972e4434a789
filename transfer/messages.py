"""The KV hand-off's own messages: they travel on the KV transport (as notifications), not on the control plane.

    D ~> P   KVDest     where the transfer's layers go (a registered staging slab of D) and how many leading
                        prompt blocks D caches already (those are not sent)
    D ~> P   KVCancel   D no longer wants the KV (its request went away, fell back, or its receive failed)
    P ~> D   KVLayers   layers [layer_start, layer_end) have landed (the transport delivers a notification only
                        after the bytes of its write); the last one carries the first sampled token. With
                        ``error`` set and no layers: the sender gave up, so D can stop waiting now.

Both are typed, versioned msgpack (``transfer.wire``); sizes and indices are range-checked at decode time, so
a malformed or hostile peer's message is a ``ProtocolError`` and never reaches an allocation or an index.
"""
from __future__ import annotations

from dataclasses import dataclass

from duet.transfer.transport import RemoteRegion
from duet.transfer.wire import Message

MAX_LAYERS = 1 << 16
MAX_BLOCKS = 1 << 24


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


@dataclass
class KVDest(Message):
    """D -> P: where the request's KV goes. D already holds ``num_skip_blocks`` prompt blocks (prefix cache)."""

    TYPE = "kv_dest"
    transfer_id: str
    decode_transport_name: str
    region: RemoteRegion
    offset: int
    """Byte offset in ``region`` of the staging slab: [layers, 2, num_blocks, block_size, heads, head_dim]."""
    num_skip_blocks: int
    num_blocks: int

    def __post_init__(self) -> None:
        _check_range("offset", self.offset, 0, max(0, self.region.nbytes))
        _check_range("num_skip_blocks", self.num_skip_blocks, 0, MAX_BLOCKS)
        _check_range("num_blocks", self.num_blocks, 0, MAX_BLOCKS)


@dataclass
class KVLayers(Message):
    """P -> D: layers [layer_start, layer_end) of ``transfer_id`` have landed."""

    TYPE = "kv_layers"
    transfer_id: str
    layer_start: int
    layer_end: int
    first_token: int | None = None
    """Sent with the last layers: the token P sampled, so D never recomputes it."""
    first_logprobs: dict[int, float] | None = None
    first_generator_state: bytes | None = None
    """Seeded requests: P's sampling generator after the first token (torch ``Generator.get_state`` bytes), so
    D's sampled continuation equals a colocated server's. Absent from older senders: D reseeds instead."""
    error: str | None = None

    def __post_init__(self) -> None:
        _check_range("layer_start", self.layer_start, 0, MAX_LAYERS)
        _check_range("layer_end", self.layer_end, self.layer_start, MAX_LAYERS)
        if self.first_token is not None:
            _check_range("first_token", self.first_token, 0, 1 << 31)


@dataclass
class KVCancel(Message):
    """D -> P: stop sending ``transfer_id`` (nothing more will be read from D's slab)."""

    TYPE = "kv_cancel"
    transfer_id: str
    reason: str = ""
