"""One decoder-only transformer covering Llama, Mistral, Qwen2, Qwen3, Mixtral and Qwen3-MoE.

The architectures differ only in switches read from ``ModelConfig``: q/k/v bias (Qwen2), per-head q/k
RMSNorm (Qwen3), Llama-3 RoPE scaling, tied embeddings, and a sparse MoE MLP (Mixtral, Qwen3-MoE). Module
names follow the Hugging Face checkpoints so the loader maps tensors by name.

Inputs are flat: all tokens of all sequences of a step, packed (no padding, no batch dimension).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from engine.attention import AttentionBackend, AttentionMetadata
from engine.model_config import ModelConfig
from engine.models.layers import GatedMLP, RMSNorm, RotaryEmbedding
from engine.models.moe import SparseMoE

LayerHook = Callable[[int], None]
"""Called with the layer index after that layer's K/V are in the cache (used to stream KV out)."""


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = rotary
        self.scale = cfg.head_dim ** -0.5

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        positions: torch.Tensor,  # [num_tokens] int64
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe and cfg.moe_layers[layer_idx]:
            moe = SparseMoE(
                cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                cfg.norm_topk_prob,
            )
        else:
            moe = None
        # HF names the MoE block `block_sparse_moe` in Mixtral and `mlp` in Qwen3-MoE; keep both spellings.
        if moe is not None and cfg.architecture == "MixtralForCausalLM":
            self.block_sparse_moe = moe
            self.mlp = None
        else:
            self.mlp = moe if moe is not None else GatedMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, positions, kv_cache, meta, backend):
        h = x + self.self_attn(self.input_layernorm(x), positions, kv_cache, meta, backend)
        mlp = self.mlp if self.mlp is not None else self.block_sparse_moe
        return h + mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i, rotary) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderForCausalLM(nn.Module):
    """``forward`` returns final hidden states; ``compute_logits`` projects the ones that get sampled."""

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, max_positions)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

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
        for i, layer in enumerate(self.model.layers):
            x = layer(x, positions, kv_caches[i], meta, backend)
            if layer_hook is not None:
                layer_hook(i)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, hidden] -> [n, vocab] float32
        return self.lm_head(hidden).float()
