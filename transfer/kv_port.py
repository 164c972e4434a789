"""The paged KV cache as the hand-off sees it: slabs of the whole model's KV in, slabs out.

A slab is what crosses the wire for one transfer::

    slab  # [num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]

every layer and every KV head of the model, whatever the engine's own parallel layout, blocks in the order of
the request's block table. Each side implements ``KVPort`` over its cache: Duet's model runner
(``engine.model_runner.ModelRunner``, which merges or splits tensor / pipeline parallel shards at rank 0) and
vLLM's per-layer caches (``transfer.vllm_kv_port.VllmKVPort``). ``transfer.handoff.Handoff`` only ever talks
to this interface, so native and vLLM servers exchange the same bytes.

Who calls it, and when:
- prefill side: ``plan_gather`` once before the step that completes the prompts, then ``gather_layer`` after
  each layer of that step (from the model's layer hook, on the thread running the forward pass);
- decode side: ``scatter_layers`` between steps, for layers whose bytes have landed in a staging slab.
The port never blocks on the network and owns no staging memory; the slabs passed in belong to the caller.
"""
from __future__ import annotations

import abc
import math

import torch


class KVPort(abc.ABC):
    @abc.abstractmethod
    def slab_shape(self, num_blocks: int) -> tuple[int, ...]:
        """[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] of the whole model."""

    @property
    @abc.abstractmethod
    def kv_dtype(self) -> torch.dtype:
        """Element type of the cache, and so of every slab."""

    @property
    @abc.abstractmethod
    def kv_device(self) -> torch.device:
        """Where the cache lives; staging slabs must live there too."""

    @abc.abstractmethod
    def plan_gather(self, block_ids: list[torch.Tensor]) -> None:
        """Before a step whose layers will be gathered: the block lists ``gather_layer`` reads, by index.

        block_ids  # each [n_i] int64 on ``kv_device``
        """

    @abc.abstractmethod
    def gather_layer(self, layer: int, index: int, out: torch.Tensor) -> None:
        """Layer ``layer``'s KV of the ``index``-th planned block list, once the forward pass computed it.

        out  # [1, 2, n_index, block_size, num_kv_heads, head_dim], contiguous
        """

    @abc.abstractmethod
    def scatter_layers(self, slab: torch.Tensor, block_ids: torch.Tensor, layer_start: int, layer_end: int) -> None:
        """Store arrived KV of model layers [layer_start, layer_end) into ``block_ids`` (between steps).

        slab  # [layer_end - layer_start, 2, n, block_size, num_kv_heads, head_dim], contiguous
        block_ids  # [n] int64 on ``kv_device``, distinct
        """

    # ---- derived ------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.slab_shape(0)[0]

    def block_bytes(self) -> int:
        """Bytes of one block of one layer's K (or V) in a slab."""
        return math.prod(self.slab_shape(1)[3:]) * self.kv_dtype.itemsize

    def slab_bytes(self, num_blocks: int) -> int:
        return self.num_layers * 2 * num_blocks * self.block_bytes()

    def sync(self) -> None:
        """Make gathered bytes visible to the transport (a WRITE reads them outside the compute stream)."""
        if self.kv_device.type == "cuda":
            torch.cuda.current_stream(self.kv_device).synchronize()
