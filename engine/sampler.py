"""Turn the logits of one step into next tokens, per request's SamplingParams.

Order: penalties (repetition, presence, frequency) and min_tokens masking on the raw logits; greedy rows take
the argmax; sampled rows are divided by temperature, filtered by top-k, top-p and min-p, and drawn from the
request's own generator when it has a seed (so a seeded request gives the same tokens whatever it is
batched with). Log-probabilities are those of the model's raw distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.request import Request


@dataclass
class SampleResult:
    token_id: int
    logprobs: dict[int, float] | None
    """Sampled token and top-N alternatives -> log-probability (when the request asked for logprobs)."""
    generator_state: bytes | None = None
    """Only on a first token handed from a prefill server to a decode server: the seeded request's generator
    state after this sample, so the decode side continues the same random stream (``Generator.get_state``)."""


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[SampleResult]:
        """``logits``: [num_requests, vocab] float32, row i belongs to ``requests[i]``."""
        logits = logits.float()
        if all(r.argmax_only for r in requests):  # the common batch: one argmax, nothing per request
            return [SampleResult(t, None) for t in torch.argmax(logits, dim=-1).tolist()]
        raw = logits
        if any(_needs_processing(r) for r in requests):
            logits = logits.clone()
            for i, req in enumerate(requests):
                _apply_penalties(logits[i], req)
        want_logprobs = any(r.params.logprobs is not None for r in requests)
        logprobs = torch.log_softmax(raw, dim=-1) if want_logprobs else None

        greedy_ids = torch.argmax(logits, dim=-1).tolist()
        results = []
        for i, req in enumerate(requests):
            p = req.params
            token = greedy_ids[i] if p.greedy else self._sample_row(logits[i], req)
            lp = None
            if p.logprobs is not None:
                row = logprobs[i]
                lp = {token: float(row[token])}
                if p.logprobs > 0:
                    top_vals, top_ids = torch.topk(row, p.logprobs)
                    for t, v in zip(top_ids.tolist(), top_vals.tolist()):
                        lp.setdefault(t, v)
            results.append(SampleResult(token, lp))
        return results

    def _sample_row(self, row: torch.Tensor, req: Request) -> int:  # row: [vocab]
        p = req.params
        row = row / p.temperature
        vocab = row.shape[-1]
        if 0 < p.top_k < vocab:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Drop a token when the mass before it already reaches top_p (the top token always stays).
            drop_sorted = (cumulative - sorted_probs) >= p.top_p
            probs = probs.masked_fill(drop_sorted.scatter(0, order, drop_sorted), 0.0)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
            # Extreme parameters (temperature near 0 or huge, tiny penalties) under/overflow float32: the
            # distribution has collapsed onto its mode, so take it rather than fail the step.
            return int(torch.argmax(row))
        generator = req.generator if req.generator is not None else self.generator
        return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _needs_processing(req: Request) -> bool:
    p = req.params
    return (
        p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        or len(req.output_token_ids) < p.min_tokens
    )


def _apply_penalties(row: torch.Tensor, req: Request) -> None:  # row: [vocab], modified in place
    p = req.params
    vocab = row.shape[0]
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(req.all_token_ids)), dtype=torch.long, device=row.device)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and req.output_token_ids:
        counts = torch.bincount(torch.tensor(req.output_token_ids, dtype=torch.long), minlength=vocab)
        counts = counts[:vocab].to(row.device, row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    if len(req.output_token_ids) < p.min_tokens:
        banned = set(p.stop_token_ids)
        if not p.ignore_eos:
            banned.update(req.eos_token_ids)
        banned = [t for t in banned if 0 <= t < vocab]
        if banned:
            row[torch.tensor(banned, dtype=torch.long, device=row.device)] = float("-inf")
