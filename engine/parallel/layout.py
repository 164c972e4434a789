"""Which slice of the model one rank holds: pure arithmetic, no ``torch.distributed``.

Ranks are numbered ``rank = pp_rank * tp_size + tp_rank``: the TP ranks of one pipeline stage are
neighbours, and global rank 0 (the scheduler's process) is TP rank 0 of stage 0.

Tensor parallelism splits attention by heads and MLPs by intermediate columns. KV heads split like query
heads when there are at least ``tp_size`` of them; with fewer, each KV head is replicated on the
``tp_size / num_kv_heads`` ranks whose query heads read it, so every rank holds exactly the KV heads its
own query heads need and the KV cache keeps one layout with fewer heads.
"""
from __future__ import annotations

from dataclasses import dataclass

from duet.engine.model_config import ModelConfig


@dataclass(frozen=True)
class ParallelLayout:
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    expert_parallel: bool = False
    """MoE experts are divided among the TP ranks (each keeps whole experts) instead of each expert's
    intermediate columns."""

    @classmethod
    def for_rank(cls, rank: int, tp_size: int, pp_size: int, expert_parallel: bool = False) -> "ParallelLayout":
        return cls(tp_size, rank % tp_size, pp_size, rank // tp_size, expert_parallel)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def rank(self) -> int:
        return self.pp_rank * self.tp_size + self.tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, pp_rank: int) -> int:
        """Global rank of this rank's TP peer in stage ``pp_rank`` (activations travel between peers)."""
        return pp_rank * self.tp_size + self.tp_rank

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """[start, end) of the decoder layers this stage runs; earlier stages get no fewer than later ones."""
        return _even_split(num_layers, self.pp_size, self.pp_rank)

    def tp_split(self, size: int) -> tuple[int, int]:
        """(start, count) of this rank's share of a dimension that divides evenly by ``tp_size``."""
        count = size // self.tp_size
        return self.tp_rank * count, count

    def head_range(self, num_heads: int) -> tuple[int, int]:
        """(first head, count) of this rank's query heads."""
        return self.tp_split(num_heads)

    def kv_head_range(self, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, count): split when there are enough heads, else the one head this rank reads."""
        if num_kv_heads >= self.tp_size:
            return self.tp_split(num_kv_heads)
        return self.tp_rank * num_kv_heads // self.tp_size, 1

    def kv_head_owners(self, num_kv_heads: int) -> list[tuple[int, int, int]]:
        """(tp_rank, first KV head, count) of the TP ranks that together hold every KV head exactly once.

        With at least ``tp_size`` heads that is every rank; with fewer, the first of each head's replicas.
        """
        owners, covered = [], 0
        for tp_rank in range(self.tp_size):
            start, count = ParallelLayout(self.tp_size, tp_rank).kv_head_range(num_kv_heads)
            if start >= covered:
                owners.append((tp_rank, start, count))
                covered = start + count
        return owners

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """(first expert, count) this rank holds whole; all experts when experts are not parallel."""
        if not self.expert_parallel:
            return 0, num_experts
        return self.tp_split(num_experts)

    def moe_intermediate_range(self, size: int) -> tuple[int, int]:
        """(start, count) of each held expert's intermediate columns: all of them under expert parallelism."""
        if self.expert_parallel:
            return 0, size
        return self.tp_split(size)


def _even_split(n: int, parts: int, idx: int) -> tuple[int, int]:
    base, extra = divmod(n, parts)
    start = idx * base + min(idx, extra)
    return start, start + base + (1 if idx < extra else 0)


def validate_parallel(tp_size: int, pp_size: int, expert_parallel: bool, mc: ModelConfig) -> None:
    """Refuse sizes the checkpoint cannot be split into; the ValueError names the engine field."""
    tp = tp_size
    if mc.num_heads % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} must divide the model's num_attention_heads={mc.num_heads}"
        )
    if mc.num_kv_heads % tp and tp % mc.num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size={tp} and the model's num_key_value_heads={mc.num_kv_heads}: "
            "one must divide the other"
        )
    has_dense = not mc.is_moe or not all(mc.moe_layers)
    if has_dense and mc.intermediate_size % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} must divide the model's intermediate_size={mc.intermediate_size}"
        )
    if expert_parallel and not mc.is_moe:
        raise ValueError(f"expert_parallel: {mc.architecture} has no experts to distribute")
    if mc.is_moe:
        if expert_parallel and mc.num_experts % tp:
            raise ValueError(
                f"expert_parallel: tensor_parallel_size={tp} must divide the model's num_experts={mc.num_experts}"
            )
        if not expert_parallel and mc.moe_intermediate_size % tp:
            raise ValueError(
                f"tensor_parallel_size={tp} must divide the model's moe_intermediate_size="
                f"{mc.moe_intermediate_size} (or set expert_parallel)"
            )
    if pp_size > mc.num_layers:
        raise ValueError(
            f"pipeline_parallel_size={pp_size} exceeds the model's {mc.num_layers} layers"
        )
