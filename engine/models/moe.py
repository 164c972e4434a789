"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): a linear router picks top-k experts per token."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from duet.engine.models.layers import TPGroup, mark_shard
from duet.engine.parallel.layout import ParallelLayout


class SparseMoE(nn.Module):
    """Experts are stored stacked so loading and expert parallelism slice one tensor.

    ``w_gate``/``w_up``: [num_experts, intermediate, hidden]; ``w_down``: [num_experts, hidden, intermediate].
    Routing: softmax over all experts in float32, top-k, optional renormalisation of the k weights — the
    order both Mixtral and Qwen3-MoE define (Mixtral always renormalises; Qwen3-MoE if ``norm_topk_prob``).

    Under tensor parallelism every rank routes every token with the full (replicated) router, then
    computes only what it holds: all experts' slices of the intermediate columns, or with expert
    parallelism whole experts ``[expert_start, expert_start + num_local_experts)``. Either way a rank's
    output is a partial sum over its share, and one all-reduce of the float32 accumulator combines them,
    so each token reaches exactly its top-k experts whichever rank holds them.
    """

    def __init__(
        self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool,
        layout: ParallelLayout = ParallelLayout(), tp_group: TPGroup | None = None,
    ):
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.expert_start, num_local = layout.expert_range(num_experts)
        col_start, width = layout.moe_intermediate_range(intermediate_size)
        self.w_gate = nn.Parameter(torch.empty(num_local, width, hidden_size))
        self.w_up = nn.Parameter(torch.empty(num_local, width, hidden_size))
        self.w_down = nn.Parameter(torch.empty(num_local, hidden_size, width))
        for p in (self.w_gate, self.w_up, self.w_down):
            p.expert_start = self.expert_start
        if width != intermediate_size:
            mark_shard(self.w_gate, 0, col_start, intermediate_size)
            mark_shard(self.w_up, 0, col_start, intermediate_size)
            mark_shard(self.w_down, 1, col_start, intermediate_size)
        self.num_experts = num_experts
        self.num_local_experts = num_local
        self.top_k = top_k
        self.renormalize = renormalize
        self.tp_group = tp_group if layout.tp_size > 1 else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids [num_tokens, k] and their weights [num_tokens, k] (float32)."""
        probs = F.softmax(self.gate(x).float(), dim=-1)  # [num_tokens, num_experts]
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return expert_ids, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        expert_ids, weights = self.route(x)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        first, end = self.expert_start, self.expert_start + self.num_local_experts
        # Loop over the held experts that received tokens; each runs one dense SwiGLU on its tokens.
        for e in torch.unique(expert_ids).tolist():
            if not first <= e < end:
                continue
            token_idx, slot = torch.nonzero(expert_ids == e, as_tuple=True)
            xe = x[token_idx]  # [n_e, hidden]
            le = e - first
            h = F.silu(xe @ self.w_gate[le].t()) * (xe @ self.w_up[le].t())
            ye = h @ self.w_down[le].t()  # [n_e, hidden]
            out.index_add_(0, token_idx, ye.float() * weights[token_idx, slot].unsqueeze(1))
        if self.tp_group is not None:
            self.tp_group.all_reduce(out)
        return out.to(x.dtype)
