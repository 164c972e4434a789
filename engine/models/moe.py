"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): a linear router picks top-k experts per token."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SparseMoE(nn.Module):
    """Experts are stored stacked so loading and (later) expert parallelism slice one tensor.

    ``w_gate``/``w_up``: [num_experts, intermediate, hidden]; ``w_down``: [num_experts, hidden, intermediate].
    Routing: softmax over all experts in float32, top-k, optional renormalisation of the k weights — the
    order both Mixtral and Qwen3-MoE define (Mixtral always renormalises; Qwen3-MoE if ``norm_topk_prob``).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalize: bool):
        super().__init__()
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.w_up = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize

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
        # Loop over the experts that received tokens; each runs one dense SwiGLU on its tokens.
        for e in torch.unique(expert_ids).tolist():
            token_idx, slot = torch.nonzero(expert_ids == e, as_tuple=True)
            xe = x[token_idx]  # [n_e, hidden]
            h = F.silu(xe @ self.w_gate[e].t()) * (xe @ self.w_up[e].t())
            ye = h @ self.w_down[e].t()  # [n_e, hidden]
            out.index_add_(0, token_idx, ye.float() * weights[token_idx, slot].unsqueeze(1))
        return out.to(x.dtype)
