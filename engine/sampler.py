"""Turn the logits of one step into next tokens, per request's SamplingParams; score prompt tokens.

Order: penalties (repetition, presence, frequency), min_tokens masking, ``logit_bias``,
``allowed_token_ids``, ``bad_words`` and the grammar's token mask (structured outputs) on the raw logits;
greedy rows take the argmax; sampled rows are divided by temperature, filtered by top-k, top-p and min-p, and
drawn from the request's own generator when it has a seed (so a seeded request gives the same tokens whatever
it is batched with). Log-probabilities are those of the model's raw distribution (vLLM's default too).

``prompt_logprobs`` scores prompt tokens from the logits of the positions before them (fp32 log-softmax),
with the top-k alternatives and each prompt token's rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from duet.engine.request import Request
from duet.engine.structured_output.masks import TokenMask

PROMPT_LOGPROB_ROWS_PER_PASS = 256
"""Prompt positions scored per log-softmax: bounds the fp32 temporaries to this many vocab-wide rows."""


@dataclass
class SampleResult:
    token_id: int
    logprobs: dict[int, float] | None
    """Sampled token and top-N alternatives -> log-probability (when the request asked for logprobs)."""
    generator_state: bytes | None = None
    """Only on a first token handed from a prefill server to a decode server: the seeded request's generator
    state after this sample, so the decode side continues the same random stream (``Generator.get_state``)."""


@dataclass
class PromptLogprobs:
    """Prompt logprobs of positions [start, start + len(logprobs)) of one request, from one step."""

    start: int
    """Prompt position of the first entry (>= 1: position 0 has no context)."""
    logprobs: list[dict[int, float]]
    """Per position: the prompt token, then its top-k alternatives in rank order -> logprob."""
    ranks: list[int]
    """Rank of the prompt token at each position (1 = most likely)."""


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request], token_mask: TokenMask | None = None,
                 inplace: bool = False) -> list[SampleResult]:
        """``logits``: [num_requests, vocab] float32, row i belongs to ``requests[i]``. ``token_mask``: the
        grammar's allowed tokens of the constrained rows. ``inplace``: the caller no longer needs ``logits``,
        so biases and masks are applied to it directly (saves a vocab-wide copy per row)."""
        logits = logits.float()
        if token_mask is None and all(r.argmax_only for r in requests):  # the common batch: one argmax
            return [SampleResult(t, None) for t in torch.argmax(logits, dim=-1).tolist()]
        decided: dict[int, int] | None = None
        want_logprobs = any(r.params.logprobs is not None for r in requests)
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None  # of the raw distribution
        if token_mask is not None or any(_needs_processing(r) for r in requests):
            if not inplace:
                logits = logits.clone()
            for i, req in enumerate(requests):
                if _needs_processing(req):
                    _process_row(logits[i], req)
            if token_mask is not None:
                decided = token_mask.apply(logits, [r.params.greedy for r in requests])

        greedy_ids = torch.argmax(logits, dim=-1).tolist()
        for row, token in (decided or {}).items():
            greedy_ids[row] = token
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


    def prompt_logprobs(self, logits: torch.Tensor, target_ids: list[int], num_top: int,
                        start: int) -> PromptLogprobs:
        """Score ``target_ids`` (the prompt tokens at positions start..) with the logits of the positions before.

        logits  # [len(target_ids), vocab] float32: row i predicts target_ids[i]
        """
        entries: list[dict[int, float]] = []
        ranks: list[int] = []
        for lo in range(0, len(target_ids), PROMPT_LOGPROB_ROWS_PER_PASS):
            rows = torch.log_softmax(logits[lo:lo + PROMPT_LOGPROB_ROWS_PER_PASS].float(), dim=-1)
            targets = torch.tensor(target_ids[lo:lo + rows.shape[0]], dtype=torch.long, device=rows.device)
            chosen = rows.gather(1, targets[:, None])  # [n, 1]
            ranks.extend(((rows > chosen).sum(dim=1) + 1).tolist())
            chosen_list = chosen[:, 0].tolist()
            if num_top > 0:
                top_vals, top_ids = torch.topk(rows, num_top, dim=-1)
                top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
            for i, t in enumerate(targets.tolist()):
                entry = {t: chosen_list[i]}
                if num_top > 0:
                    for a, v in zip(top_ids[i], top_vals[i]):
                        entry.setdefault(a, v)
                entries.append(entry)
        return PromptLogprobs(start, entries, ranks)


def _needs_processing(req: Request) -> bool:
    p = req.params
    return (
        p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
        or len(req.output_token_ids) < p.min_tokens or bool(p.logit_bias or p.allowed_token_ids)
        or bool(p.bad_words_token_ids)
    )


def _process_row(row: torch.Tensor, req: Request) -> None:  # row: [vocab], modified in place
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
    if p.logit_bias:
        ids, values = _bias_tensors(req, row.device)
        row.index_add_(0, ids, values)
    if p.allowed_token_ids:
        row.masked_fill_(_disallowed(req, vocab, row.device), float("-inf"))
    if p.bad_words_token_ids:
        out = req.output_token_ids
        banned = [seq[-1] for seq in p.bad_words_token_ids
                  if 0 <= seq[-1] < vocab and (len(seq) == 1 or out[len(out) - len(seq) + 1:] == seq[:-1])]
        if banned:
            row[torch.tensor(banned, dtype=torch.long, device=row.device)] = float("-inf")


def _bias_tensors(req: Request, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [n] int64, biases [n] float32) of ``logit_bias``, built once per request."""
    cache = req.sampler_cache
    if "bias_ids" not in cache or cache["bias_ids"].device != device:
        bias = req.params.logit_bias
        cache["bias_ids"] = torch.tensor(list(bias), dtype=torch.long, device=device)
        cache["bias_values"] = torch.tensor(list(bias.values()), dtype=torch.float32, device=device)
    return cache["bias_ids"], cache["bias_values"]


def _disallowed(req: Request, vocab: int, device: torch.device) -> torch.Tensor:  # [vocab] bool
    """Tokens outside ``allowed_token_ids``, built once per request."""
    cached = req.sampler_cache.get("disallowed")
    if cached is None or cached.device != device or cached.shape[0] != vocab:
        cached = torch.ones(vocab, dtype=torch.bool, device=device)
        allowed = [t for t in req.params.allowed_token_ids if 0 <= t < vocab]
        cached[torch.tensor(allowed, dtype=torch.long, device=device)] = False
        req.sampler_cache["disallowed"] = cached
    return cached
