"""Can two engines exchange KV blocks? The KV layout each side advertises, and the check made before any moves.

Both sides of a transfer describe their paged KV pool with a :class:`KVLayout` and send it (with its
``compat_hash()``) in the handshake. Bytes are copied verbatim, so every field that changes what a byte
means must match: model, dtype, layer count, KV heads, head dim, block size, layout, TP size. The TP rank is
left out of the hash: a per-rank layout (``tp_size`` > 1: one rank's KV heads) would have prefill rank r
talk to decode rank r, and both ranks share one hash.

Duet's servers advertise the wire layout, which holds every layer and every KV head (``tp_size`` 1) whatever
the engine's own tensor / pipeline parallel layout: rank 0 merges the ranks' head slices before sending and
splits them after receiving (``engine.parallel.runner``). So a prefill server with TP=2 and a decode server
with TP=1 hash equal, while a different model, dtype, layer count, KV head count, head dim or block size is
still refused: no mapping between those exists.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

# Element sizes of the KV dtypes Duet stores; names are torch's (``str(torch.bfloat16)`` minus ``torch.``).
DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
# "LTNBHD": [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim], see kernels/__init__.py.
LAYOUTS = ("LTNBHD",)
_HASH_SCHEMA = "duet-kv-layout/1"


class IncompatiblePeer(Exception):
    """The peer's KV layout differs from ours; ``fields`` maps each differing field to (local, remote)."""

    def __init__(self, fields: dict[str, tuple[Any, Any]]):
        self.fields = fields
        detail = ", ".join(f"{name}: local={lv!r} remote={rv!r}" for name, (lv, rv) in fields.items())
        super().__init__(f"incompatible KV peer ({detail})")


@dataclass(frozen=True)
class KVLayout:
    """What the bytes of one engine's (one TP rank's) KV pool mean."""

    model: str
    """Model identity: checkpoint name plus revision or weights hash; equal strings mean equal weights."""
    dtype: str
    """KV cache element type, a key of ``DTYPE_BYTES`` (e.g. ``"bfloat16"``)."""
    num_layers: int
    """Attention layers holding KV (the pool's leading dimension)."""
    num_kv_heads: int
    """KV heads of the whole model (before tensor parallelism splits them)."""
    head_dim: int
    """Elements per head."""
    block_size: int
    """Tokens per KV block."""
    layout: str = "LTNBHD"
    """Pool dimension order: ``LTNBHD`` = [layers, 2, blocks, block_size, kv_heads, head_dim]."""
    tp_rank: int = 0
    """This rank's index in its tensor-parallel group (not part of the hash)."""
    tp_size: int = 1
    """Tensor-parallel group size."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty string")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} is not one of {list(LAYOUTS)}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "tp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in [0, {self.tp_size}), got {self.tp_rank!r}")
        # KV heads are split across ranks, or replicated when there are fewer heads than ranks.
        if self.num_kv_heads % self.tp_size and self.tp_size % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} and tp_size={self.tp_size}: neither divides the other")

    @classmethod
    def from_cache(cls, model: str, kv_cache: Any, tp_rank: int = 0, tp_size: int = 1,
                   num_kv_heads: int | None = None) -> "KVLayout":
        """The layout of an LTNBHD pool tensor.

        kv_cache  # [num_layers, 2, num_blocks, block_size, num_kv_heads_per_rank, head_dim]

        ``num_kv_heads`` (the model's) defaults to heads-per-rank x ``tp_size``; pass it when heads are replicated.
        """
        num_layers, two, _, block_size, heads_per_rank, head_dim = kv_cache.shape
        if two != 2:
            raise ValueError(f"expected [layers, 2, blocks, block_size, heads, head_dim], got {tuple(kv_cache.shape)}")
        if num_kv_heads is None:
            num_kv_heads = heads_per_rank * tp_size
        return cls(model=model, dtype=str(kv_cache.dtype).removeprefix("torch."), num_layers=num_layers,
                   num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size, tp_rank=tp_rank,
                   tp_size=tp_size)

    @property
    def num_kv_heads_per_rank(self) -> int:
        return max(1, self.num_kv_heads // self.tp_size)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's keys (or values) on this rank: one contiguous run in the pool."""
        return self.block_size * self.num_kv_heads_per_rank * self.head_dim * DTYPE_BYTES[self.dtype]

    def canonical(self) -> dict[str, Any]:
        """The fields the hash covers (everything but ``tp_rank``)."""
        fields = dataclasses.asdict(self)
        del fields["tp_rank"]
        return fields

    def compat_hash(self) -> str:
        """Stable hex digest of :meth:`canonical`: equal across processes, hosts and Python versions."""
        text = json.dumps({"schema": _HASH_SCHEMA, **self.canonical()}, sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def check_compatible(local: KVLayout, remote: KVLayout) -> None:
    """Raise :class:`IncompatiblePeer` naming every canonical field where ``remote`` differs from ``local``."""
    local_fields, remote_fields = local.canonical(), remote.canonical()
    diff = {k: (v, remote_fields.get(k)) for k, v in local_fields.items() if remote_fields.get(k) != v}
    if diff:
        raise IncompatiblePeer(diff)
    if local.compat_hash() != remote.compat_hash():  # unreachable unless canonical() and the hash drift apart
        raise IncompatiblePeer({"compat_hash": (local.compat_hash(), remote.compat_hash())})
