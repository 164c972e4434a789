"""One decoder-only transformer covering Llama, Mistral, Qwen2, Qwen3, Mixtral and Qwen3-MoE.

The architectures differ only in switches read from ``ModelConfig``: q/k/v bias (Qwen2), per-head q/k
RMSNorm (Qwen3), Llama-3 RoPE scaling, tied embeddings, and a sparse MoE MLP (Mixtral, Qwen3-MoE). Module
names follow the Hugging Face checkpoints so the loader maps tensors by name.

Inputs are flat: all tokens of all sequences of a step, packed (no padding, no batch dimension).

A ``ParallelLayout`` shrinks the model to one rank's share: fewer heads and columns per layer under
tensor parallelism (all-reduce after o_proj and after the MLP), only the stage's layers under pipeline
parallelism (other layers are parameterless placeholders, so names keep their global layer index, and the
embedding / final norm / lm_head exist only on the first / last stage). Embedding and lm_head are
replicated across TP ranks.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from duet.engine.attention import AttentionBackend, AttentionMetadata
from duet.engine.model_config import ModelConfig
from duet.engine.models.layers import GatedMLP, RMSNorm, RotaryEmbedding, TPGroup, fuse_linears, mark_shard
from duet.engine.models.moe import SparseMoE
from duet.engine.parallel.layout import ParallelLayout
from duet.kernels import cpu_linear

LayerHook = Callable[[int], None]
"""Called with the layer index after that layer's K/V are in the cache (used to stream KV out)."""


class Attention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, rotary: RotaryEmbedding,
        layout: ParallelLayout = ParallelLayout(), tp_group: TPGroup | None = None,
    ):
        super().__init__()
        d = cfg.head_dim
        head_start, self.num_heads = layout.head_range(cfg.num_heads)
        kv_start, self.num_kv_heads = layout.kv_head_range(cfg.num_kv_heads)
        self.head_dim = d
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * d, cfg.hidden_size, bias=False)
        if layout.tp_size > 1:
            # q/k/v are column-parallel by head (biases with them), o_proj row-parallel over the same heads.
            for p in self.q_proj.parameters():
                mark_shard(p, 0, head_start * d, cfg.num_heads * d)
            for p in (*self.k_proj.parameters(), *self.v_proj.parameters()):
                mark_shard(p, 0, kv_start * d, cfg.num_kv_heads * d)
            mark_shard(self.o_proj.weight, 1, head_start * d, cfg.num_heads * d)
        self.tp_group = tp_group if layout.tp_size > 1 else None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = rotary
        self.scale = cfg.head_dim ** -0.5
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # fused (weight, bias): see fuse()
        self.qkv_packed = self.o_packed = None  # CPU: oneDNN-packed weights (kernels.cpu_linear)

    def fuse(self) -> None:
        """After loading, before the first forward (``build_model`` does it): one GEMM for q, k and v, and on
        the CPU the weights packed for oneDNN."""
        self.qkv = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        self.qkv_packed = cpu_linear.pack(self.qkv[0])
        self.o_packed = cpu_linear.pack(self.o_proj.weight)

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        positions: torch.Tensor,  # [num_tokens] int64
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        n = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = cpu_linear.linear(x, *self.qkv, self.qkv_packed).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        out = out.reshape(n, self.num_heads * self.head_dim)
        out = cpu_linear.linear(out, self.o_proj.weight, None, self.o_packed)
        if self.tp_group is not None:
            self.tp_group.all_reduce(out)
        return out


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding,
        layout: ParallelLayout = ParallelLayout(), tp_group: TPGroup | None = None,
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary, layout, tp_group)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe and cfg.moe_layers[layer_idx]:
            moe = SparseMoE(
                cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                cfg.norm_topk_prob, layout, tp_group,
            )
        else:
            moe = None
        # HF names the MoE block `block_sparse_moe` in Mixtral and `mlp` in Qwen3-MoE; keep both spellings.
        if moe is not None and cfg.architecture == "MixtralForCausalLM":
            self.block_sparse_moe = moe
            self.mlp = None
        else:
            self.mlp = moe if moe is not None else GatedMLP(cfg.hidden_size, cfg.intermediate_size, layout, tp_group)

    def forward(self, x, positions, kv_cache, meta, backend):
        attn = self.self_attn(self.input_layernorm(x), positions, kv_cache, meta, backend)
        normed, h = self.post_attention_layernorm.add_forward(x, attn)  # h = x + attn, one op on CPU
        mlp = self.mlp if self.mlp is not None else self.block_sparse_moe
        return h + mlp(normed)


class AbsentLayer(nn.Module):
    """Placeholder for a decoder layer another pipeline stage runs; holds nothing."""


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, layout: ParallelLayout, tp_group: TPGroup | None):
        super().__init__()
        start, end = layout.layer_range(cfg.num_layers)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if layout.is_first_stage else None
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope)
        self.layers = nn.ModuleList([
            DecoderLayer(cfg, i, rotary, layout, tp_group) if start <= i < end else AbsentLayer()
            for i in range(cfg.num_layers)
        ])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if layout.is_last_stage else None


class DecoderForCausalLM(nn.Module):
    """``forward`` returns final hidden states; ``compute_logits`` projects the ones that get sampled.

    A pipeline stage runs ``embed`` (first stage), ``run_layers`` and ``model.norm`` + ``compute_logits``
    (last stage) itself; ``forward`` is all three for a model that holds every layer.
    """

    def __init__(
        self, cfg: ModelConfig, max_positions: int,
        layout: ParallelLayout = ParallelLayout(), tp_group: TPGroup | None = None,
    ):
        super().__init__()
        self.config = cfg
        self.layout = layout
        self.layer_start, self.layer_end = layout.layer_range(cfg.num_layers)
        self.model = Backbone(cfg, max_positions, layout, tp_group)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if layout.is_last_stage else None
        if cfg.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.lm_head_packed: torch.Tensor | None = None  # see fuse_projections

    def fuse_projections(self) -> None:
        """After the weights are in, before the first forward: fuse q/k/v and gate/up into one GEMM each (same
        parameters, as views) and, on the CPU, pack the projection weights for oneDNN (``kernels.cpu_linear``).
        ``engine.loader.build_model`` calls it; weights changed afterwards must be fused and packed again."""
        for module in self.modules():
            if isinstance(module, (Attention, GatedMLP)):
                module.fuse()
        self.lm_head_packed = cpu_linear.pack(self.lm_head.weight) if self.lm_head is not None else None

    def absent_prefixes(self) -> tuple[str, ...]:
        """Checkpoint name prefixes of weights other pipeline stages hold (the loader skips them)."""
        out = [f"model.layers.{i}." for i in range(self.config.num_layers)
               if not self.layer_start <= i < self.layer_end]
        if self.model.embed_tokens is None:
            out.append("model.embed_tokens.")
        if self.lm_head is None:
            out += ["model.norm.", "lm_head."]
        return tuple(out)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        backend: AttentionBackend,
        layer_hook: Optional[LayerHook] = None,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        x = self.model.embed_tokens(input_ids)
        x = self.run_layers(x, positions, kv_caches, meta, backend, layer_hook)
        return self.model.norm(x)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, hidden]
        return self.model.embed_tokens(input_ids)

    def run_layers(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]: residual stream entering layer ``layer_start``
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: torch.Tensor,  # [num_local_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        backend: AttentionBackend,
        layer_hook: Optional[LayerHook] = None,
    ) -> torch.Tensor:  # [num_tokens, hidden]: residual stream leaving layer ``layer_end - 1``
        """This stage's layers; ``layer_hook`` gets global layer indices."""
        start = self.layer_start
        for i in range(start, self.layer_end):
            x = self.model.layers[i](x, positions, kv_caches[i - start], meta, backend)
            if layer_hook is not None:
                layer_hook(i)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab] float32
        return cpu_linear.linear(hidden, self.lm_head.weight, None, self.lm_head_packed).float()
