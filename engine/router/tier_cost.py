"""What KV outside a decode server's device pool is worth: a local host-tier hit, a pull from another server.

Pure functions of plain data, shared by the live router (``Scorer.choose`` takes ``TierHit``s from
``PrefixIndex.match_tiers``) and the simulator (``bench.router_sim``). For one request and one decode candidate S,
walking the prompt's blocks from the first::

    device  S's leading blocks in its device pool                         free (a prefix hit, as before tiers)
    host    the blocks right after those in S's host tier                  loaded first: ``host_load_s_per_token``
    pull    the blocks after device + host that another server R holds,    pulled first: a fixed overhead plus
            in any tier (the R holding the longest prefix)                 bytes / R->S bandwidth (measured)
    rest    prefilled on S                                                 S's prefill cost model

A pull is planned only when it beats computing those tokens on S: its seconds against the difference of S's
predicted prefill with and without them. The plan's ``effective_cached_tokens`` (device hits count whole, host
and pulled tokens by the share of their compute time they save) is what the prefix-aware score sees in place
of the cached token count, so a device hit still wins over a host hit over a pull of the same length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

DEFAULT_KV_BYTES_PER_TOKEN = 128 << 10
"""Llama-3-8B in bf16: 32 layers x K and V x 8 KV heads x 128 x 2 bytes (the router learns the real value from
the servers' KV layout)."""


@dataclass(frozen=True, slots=True)
class TierHit:
    """How much of one prompt one server holds: its leading device blocks, then the host blocks after them."""

    device_blocks: int = 0
    host_blocks: int = 0

    @property
    def num_blocks(self) -> int:
        return self.device_blocks + self.host_blocks


@dataclass(frozen=True)
class TierPolicy:
    """How the router prices KV tiers. Invalid values raise ``ValueError`` naming the field."""

    pulls: bool = False
    """Plan pulls of a prefix cached on another server (``--kv-pulls``); host hits are priced either way."""
    host_load_s_per_token: float = 2e-6
    """Host tier -> device: seconds per token (bytes per token / host link bandwidth, plus the copier's share)."""
    pull_overhead_s: float = 0.01
    """A pull's fixed cost: its control messages, the destination round trip, the owner's packing."""
    pull_bytes_per_s: float = 1e9
    """Prior of the server-to-server bandwidth; ``PullCostModel`` replaces it with what pulls measure."""
    kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN
    """KV bytes of one token on the wire (all layers); the router sets it from the servers' layout."""
    min_pull_blocks: int = 1
    """Pulls shorter than this are not worth their round trip."""

    def __post_init__(self) -> None:
        for name in ("host_load_s_per_token", "pull_overhead_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"TierPolicy.{name} must be finite and >= 0, got {value}")
        if not self.pull_bytes_per_s > 0:
            raise ValueError(f"TierPolicy.pull_bytes_per_s must be > 0, got {self.pull_bytes_per_s}")
        if self.kv_bytes_per_token < 1:
            raise ValueError(f"TierPolicy.kv_bytes_per_token must be >= 1, got {self.kv_bytes_per_token}")
        if self.min_pull_blocks < 1:
            raise ValueError(f"TierPolicy.min_pull_blocks must be >= 1, got {self.min_pull_blocks}")


class PullCostModel:
    """Seconds of a pull: ``overhead + bytes / bandwidth``, the bandwidth an exponentially weighted mean of what
    finished pulls measured (bytes over their seconds less the overhead), starting from the policy's prior."""

    def __init__(self, policy: TierPolicy, weight: float = 0.2):
        self.overhead_s = policy.pull_overhead_s
        self.bytes_per_s = policy.pull_bytes_per_s
        self.weight = weight
        self.num_observations = 0

    def observe(self, num_bytes: int, seconds: float) -> None:
        if num_bytes <= 0 or not seconds > 0:
            return
        measured = num_bytes / max(seconds - self.overhead_s, seconds / 2)
        self.bytes_per_s += self.weight * (measured - self.bytes_per_s)
        self.num_observations += 1

    def seconds(self, num_bytes: int) -> float:
        return self.overhead_s + num_bytes / self.bytes_per_s


@dataclass(frozen=True, slots=True)
class TierPlan:
    """What one decode candidate reuses of a prompt, and the seconds it spends fetching it before its prefill."""

    device_tokens: int = 0
    host_tokens: int = 0
    pull_tokens: int = 0
    pull_from: str | None = None
    fetch_s: float = 0.0
    """Host load + pull, before the prefill of the rest starts (they overlap on a server; the sum is the bound)."""
    effective_cached_tokens: float = 0.0

    @property
    def covered_tokens(self) -> int:
        return self.device_tokens + self.host_tokens + self.pull_tokens


def pull_sources(hits: Mapping[str, TierHit], server_ids: set[str]) -> list[tuple[str, int]]:
    """The two servers of ``server_ids`` holding the longest prefix in any tier, as (id, blocks), longest first
    (a candidate pulls from the first that is not itself). Ties break by id."""
    ranked = sorted(((sid, hit.num_blocks) for sid, hit in hits.items() if sid in server_ids and hit.num_blocks),
                    key=lambda x: (-x[1], x[0]))
    return ranked[:2]


def plan_tiers(server_id: str, num_prompt_tokens: int, block_size: int, hits: Mapping[str, TierHit],
               sources: list[tuple[str, int]], predict_s: Callable[[int], float], policy: TierPolicy,
               pull_model: PullCostModel | None = None) -> TierPlan:
    """The cheapest reuse of a prompt's cached blocks on decode candidate ``server_id`` (see the module docstring).

    ``predict_s(tokens)``: seconds to prefill that many uncached tokens on the candidate (its cost model).
    At least one prompt token is always left to compute (its logits give the first token).
    """
    max_blocks = (num_prompt_tokens - 1) // block_size
    own = hits.get(server_id, TierHit())
    device = min(own.device_blocks, max_blocks)
    host = min(own.host_blocks, max_blocks - device)
    device_tokens, host_tokens = device * block_size, host * block_size
    uncached = num_prompt_tokens - device_tokens
    host_s = host_tokens * policy.host_load_s_per_token
    effective = device_tokens + _saved_share(host_tokens, host_s, uncached, predict_s)
    uncached -= host_tokens
    plan = TierPlan(device_tokens, host_tokens, 0, None, host_s, effective)
    if not policy.pulls:
        return plan
    source = next(((sid, n) for sid, n in sources if sid != server_id), None)
    num_pull = 0 if source is None else min(source[1], max_blocks) - device - host
    if num_pull < policy.min_pull_blocks:
        return plan
    pull_tokens = num_pull * block_size
    model = pull_model or PullCostModel(policy)
    pull_s = model.seconds(pull_tokens * policy.kv_bytes_per_token)
    saved_s = predict_s(uncached) - predict_s(uncached - pull_tokens)
    if pull_s >= saved_s:
        return plan
    effective += _saved_share(pull_tokens, pull_s, uncached, predict_s)
    return TierPlan(plan.device_tokens, host_tokens, pull_tokens, source[0], host_s + pull_s, effective)


def _saved_share(tokens: int, fetch_s: float, uncached: int, predict_s: Callable[[int], float]) -> float:
    """``tokens`` weighted by the share of their prefill time that fetching them instead saves (0 to tokens)."""
    if tokens <= 0:
        return 0.0
    compute_s = predict_s(uncached) - predict_s(uncached - tokens)
    if compute_s <= 0:
        return 0.0
    return tokens * min(1.0, max(0.0, 1.0 - fetch_s / compute_s))
