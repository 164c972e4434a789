"""Where a request goes: the router's scoring, with no I/O, shared by the HTTP router and the simulator.

A request's path through ``Scorer.choose``:

1. Eligibility. Servers outside the request's zone are dropped ("no_server_in_zone" when none is
   left). So are unhealthy ones, and the rest split by role: decode candidates are ``decode`` and
   ``both``, prefill candidates are ``prefill`` ("no_healthy_server" when no decode candidate is left).
2. Fit. Each decode candidate must hold the whole request in KV: ``prompt + max_tokens`` tokens, less
   the prefix it already caches, within its free blocks. "request_too_large" when the request exceeds
   every server's *total* blocks (retrying won't help). "no_capacity" when it only exceeds every
   server's *free* blocks.
3. Prefill server. Among the prefill servers that can take the request (free blocks for its uncached
   prompt, and a predicted TTFT through them within the request's budget), pick one by the policy.
   ``prefix_aware`` predicts time to first token = queued prefill work + this request's tokens not cached
   there + the KV transfer, using each server's ``PrefillCostModel``, fitted online from the prefill times
   servers report. (``pd_placement="headroom"``, the rule before issue 17, instead required a predicted
   queue under ``max_prefill_queue_s``.)
4. P/D placement, per decode candidate. A request whose uncached part on that server is more than
   ``disagg_threshold_tokens`` is disaggregated: it goes to the prefill server of step 3. The decode
   server prefills it itself only by one of these rules, each its own ``Decision.reason``:
   ``below_threshold`` (the whole prompt is at most the threshold), ``prefix_hit`` (the server's cached
   prefix leaves at most the threshold to compute), ``prefill_saturated`` (no prefill server can take it
   within its budget, or none has the blocks) and ``no_prefill_server`` (no healthy prefill server in
   its zone). Either way we predict the TTFT.
5. Admission. Decode candidates whose predicted TTFT exceeds the request's budget are dropped.
   "over_ttft_budget" when none is left: the caller queues the request (bounded) or answers 429,
   using ``retry_after_s`` as a hint.
   With KV tiers (``tier_hits`` given: ``PrefixIndex.match_tiers``), a candidate's reuse is priced by
   ``engine.router.tier_cost.plan_tiers``: device hits free, a run on its own host tier at a load cost, a run
   cached on another server pulled when that beats prefilling it (``TierPolicy.pulls``); the TTFT adds those
   seconds and the prefix-aware score counts the tokens by what they save.
6. Decode server, by policy: ``round_robin`` (cursor over ids), ``least_loaded`` (smallest share of
   KV capacity in running + queued tokens) or ``prefix_aware`` (weighted cached prefix vs load vs KV
   pressure).

Ties break by server id, so the same inputs always give the same ``Decision``. ``round_robin`` keeps
its own cursors (the last decode and prefill ids it used), so a ``Scorer`` has state. Like
``PrefixIndex``, it is meant to be called from one thread.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from duet.engine.block_hash import block_hashes as compute_block_hashes
from duet.engine.router.tier_cost import PullCostModel, TierHit, TierPlan, TierPolicy, plan_tiers, pull_sources

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "both")
POLICIES = ("round_robin", "least_loaded", "prefix_aware")

PD_PLACEMENTS = ("deadline", "headroom")

# Decision.reason values (the router counts decisions by reason). Accepted decisions:
DISAGGREGATED = "disaggregated"
LOCAL_BELOW_THRESHOLD = "local_prefill:below_threshold"
LOCAL_PREFIX_HIT = "local_prefill:prefix_hit"
LOCAL_PREFILL_SATURATED = "local_prefill:prefill_saturated"
LOCAL_NO_PREFILL_SERVER = "local_prefill:no_prefill_server"
# Rejections. The retryable ones (queue or 429) are listed in RETRYABLE; the others are 400 / 503.
NO_SERVER_IN_ZONE = "no_server_in_zone"
NO_HEALTHY_SERVER = "no_healthy_server"
REQUEST_TOO_LARGE = "request_too_large"
NO_CAPACITY = "no_capacity"
OVER_TTFT_BUDGET = "over_ttft_budget"
RETRYABLE = frozenset({NO_HEALTHY_SERVER, NO_CAPACITY, OVER_TTFT_BUDGET})


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(slots=True)
class ServerState:
    """What the router knows of one server: its HELLO (role, zone, block size) plus its latest LOAD.

    Mutable on purpose: the router (or simulator) keeps one per server and updates fields in place on
    each load report. Call ``validate()`` after an update that came off the wire.
    """

    server_id: str
    """Stable id of the server (its engine id)."""
    role: str = "decode"
    """``prefill``, ``decode`` or ``both`` (colocated: prefills and decodes its own requests)."""
    zone: str | None = None
    """Data zone label; ``None`` serves only requests without a zone."""
    healthy: bool = True
    """False while health checks fail; such a server gets no request."""
    block_size: int = 16
    """Tokens per KV block."""
    total_blocks: int = 0
    """KV blocks in the server's pool."""
    free_blocks: int = 0
    """Blocks not referenced by a request (cached-but-idle blocks count as free)."""
    queued_requests: int = 0
    """Requests waiting for their prefill to start or finish."""
    queued_prefill_tokens: int = 0
    """Prompt tokens still to prefill, over all queued requests (a running chunked prefill's rest too)."""
    running_requests: int = 0
    """Requests in the decode batch."""
    running_tokens: int = 0
    """Context tokens (prompt + generated) of the requests in the decode batch."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"ServerState.role must be one of {ROLES}, got {self.role!r}")
        if self.block_size <= 0:
            raise ValueError(f"ServerState.block_size must be > 0, got {self.block_size}")
        if self.total_blocks < 0:
            raise ValueError(f"ServerState.total_blocks must be >= 0, got {self.total_blocks}")
        if not 0 <= self.free_blocks <= self.total_blocks:
            raise ValueError(
                f"ServerState.free_blocks must be in [0, total_blocks={self.total_blocks}], got {self.free_blocks}"
            )
        for name in ("queued_requests", "queued_prefill_tokens", "running_requests", "running_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"ServerState.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def capacity_tokens(self) -> int:
        return self.total_blocks * self.block_size


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """The facts about one request that scoring needs (the router tokenized it already)."""

    num_prompt_tokens: int
    """Prompt length in tokens (chat template applied)."""
    max_tokens: int
    """Most tokens it may generate; the decode server must have KV room for all of them."""
    block_hashes: Sequence[int] = ()
    """Chained hashes of the prompt's full blocks at ``block_size`` (``engine.block_hash``)."""
    block_size: int = 16
    """Block size the hashes were computed at; servers with another block size count as uncached."""
    zone: str | None = None
    """Only servers of this zone may serve it; ``None``: any server."""
    ttft_budget_s: float | None = None
    """Longest acceptable predicted time to first token; ``None``: the policy's default."""
    request_id: str = ""
    """For logs only."""

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 1:
            raise ValueError(f"RequestInfo.num_prompt_tokens must be >= 1, got {self.num_prompt_tokens}")
        if self.max_tokens < 0:
            raise ValueError(f"RequestInfo.max_tokens must be >= 0, got {self.max_tokens}")
        if self.block_size <= 0:
            raise ValueError(f"RequestInfo.block_size must be > 0, got {self.block_size}")
        if len(self.block_hashes) > self.num_prompt_tokens // self.block_size:
            raise ValueError(
                f"RequestInfo.block_hashes has {len(self.block_hashes)} hashes, more than the "
                f"{self.num_prompt_tokens // self.block_size} full blocks of the prompt"
            )
        if self.ttft_budget_s is not None and not self.ttft_budget_s > 0:
            raise ValueError(f"RequestInfo.ttft_budget_s must be > 0 or None, got {self.ttft_budget_s}")

    @classmethod
    def from_tokens(cls, prompt_token_ids: Sequence[int], max_tokens: int, block_size: int = 16,
                    **kwargs: object) -> "RequestInfo":
        """Build it from the prompt's token ids, hashing full blocks exactly as the engines do."""
        return cls(num_prompt_tokens=len(prompt_token_ids), max_tokens=max_tokens,
                   block_hashes=compute_block_hashes(prompt_token_ids, block_size), block_size=block_size,
                   **kwargs)  # type: ignore[arg-type]


class PrefillCostModel:
    """Predicts a server's prefill time: ``seconds = a + b*tokens + c*tokens**2``.

    The fit is recursive least squares with exponential forgetting (``forgetting_factor`` < 1 weights
    recent prefills more, so the model follows a server whose speed drifts). It starts from a prior of
    ``prior_weight`` pseudo-observations. Tokens are scaled by ``TOKEN_SCALE`` inside so the 3x3
    covariance stays well conditioned. Without the scaling, the columns would differ by 10^8.
    Forgetting under poor excitation (every prefill the same length) inflates the covariance
    ("windup"), so its trace is capped at the prior's.
    """

    TOKEN_SCALE = 1024.0

    def __init__(self, overhead_s: float = 0.02, tokens_per_s: float = 10_000.0,
                 quadratic_s_per_token2: float = 0.0, prior_weight: float = 0.1,
                 forgetting_factor: float = 0.995) -> None:
        if not overhead_s >= 0:
            raise ValueError(f"PrefillCostModel.overhead_s must be >= 0, got {overhead_s}")
        if not tokens_per_s > 0:
            raise ValueError(f"PrefillCostModel.tokens_per_s must be > 0, got {tokens_per_s}")
        if not quadratic_s_per_token2 >= 0:
            raise ValueError(f"PrefillCostModel.quadratic_s_per_token2 must be >= 0, got {quadratic_s_per_token2}")
        if not prior_weight > 0:
            raise ValueError(f"PrefillCostModel.prior_weight must be > 0, got {prior_weight}")
        if not 0 < forgetting_factor <= 1:
            raise ValueError(f"PrefillCostModel.forgetting_factor must be in (0, 1], got {forgetting_factor}")
        k = self.TOKEN_SCALE
        self.theta = [overhead_s, k / tokens_per_s, quadratic_s_per_token2 * k * k]  # scaled a, b, c
        self.cov = [[1.0 / prior_weight if i == j else 0.0 for j in range(3)] for i in range(3)]
        self.prior_weight = prior_weight
        self.forgetting_factor = forgetting_factor
        self.num_observations = 0

    def _features(self, num_tokens: float) -> tuple[float, float, float]:
        x = num_tokens / self.TOKEN_SCALE
        return (1.0, x, x * x)

    def observe(self, num_tokens: int, seconds: float) -> None:
        """Fold in one measured prefill of ``num_tokens`` new tokens that took ``seconds``."""
        if num_tokens < 0 or not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"PrefillCostModel.observe needs num_tokens >= 0 and finite seconds >= 0, "
                             f"got {num_tokens}, {seconds}")
        x = self._features(num_tokens)
        lam, cov, theta = self.forgetting_factor, self.cov, self.theta
        px = [sum(cov[i][j] * x[j] for j in range(3)) for i in range(3)]
        denom = lam + sum(x[i] * px[i] for i in range(3))
        gain = [p / denom for p in px]
        error = seconds - sum(x[i] * theta[i] for i in range(3))
        for i in range(3):
            theta[i] += gain[i] * error
        # P <- (P - k x^T P) / lambda; x^T P == px^T because P is symmetric.
        new_cov = [[(cov[i][j] - gain[i] * px[j]) / lam for j in range(3)] for i in range(3)]
        trace, max_trace = sum(new_cov[i][i] for i in range(3)), 3.0 / self.prior_weight
        if trace > max_trace:
            new_cov = [[v * max_trace / trace for v in row] for row in new_cov]
        self.cov = new_cov
        self.num_observations += 1

    def predict(self, num_tokens: int) -> float:
        """Predicted seconds to prefill ``num_tokens`` new tokens in one request (never negative)."""
        if num_tokens <= 0:
            return 0.0
        x = self._features(num_tokens)
        return max(0.0, x[0] * self.theta[0] + x[1] * self.theta[1] + x[2] * self.theta[2])

    def predict_queue(self, num_requests: int, num_tokens: int) -> float:
        """Predicted seconds to drain a queue of ``num_requests`` holding ``num_tokens`` prompt tokens,
        taking the requests as equal in size: ``n*a + b*T + c*T**2/n``."""
        if num_tokens <= 0 and num_requests <= 0:
            return 0.0
        n = max(num_requests, 1)
        return n * self.predict(num_tokens / n) if num_tokens > 0 else n * max(0.0, self.theta[0])

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """``(a seconds, b seconds/token, c seconds/token**2)`` in unscaled units."""
        k = self.TOKEN_SCALE
        return (self.theta[0], self.theta[1] / k, self.theta[2] / (k * k))

    def copy(self, reset_confidence: bool = False) -> "PrefillCostModel":
        """A clone; ``reset_confidence`` keeps the estimate but restores the prior's uncertainty, so a
        new server starts from the fleet's estimate and still learns its own speed quickly."""
        clone = PrefillCostModel.__new__(PrefillCostModel)
        clone.theta = list(self.theta)
        clone.prior_weight, clone.forgetting_factor = self.prior_weight, self.forgetting_factor
        if reset_confidence:
            clone.cov = [[1.0 / self.prior_weight if i == j else 0.0 for j in range(3)] for i in range(3)]
            clone.num_observations = 0
        else:
            clone.cov = [list(row) for row in self.cov]
            clone.num_observations = self.num_observations
        return clone


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one request goes, or why it can't go anywhere now."""

    accepted: bool
    """True: send it to ``decode_id`` (and ``prefill_id`` when set). False: see ``reason``."""
    reason: str
    """One of this module's reason constants (``disaggregated``, ``no_capacity``, ...)."""
    decode_id: str | None = None
    prefill_id: str | None = None
    """``None`` when the decode server prefills locally."""
    predicted_ttft_s: float | None = None
    """Predicted time to first token of the chosen plan; for ``over_ttft_budget``, the best plan's."""
    decode_cached_tokens: int = 0
    """Prompt tokens already cached on the decode server."""
    prefill_cached_tokens: int = 0
    """Prompt tokens already cached on the prefill server (0 when there is none)."""
    host_hit_tokens: int = 0
    """Prompt tokens the decode server loads from its host tier (KV tiers)."""
    pull_from_id: str | None = None
    """KV tiers: the server to pull ``pull_tokens`` prompt tokens (after the decode server's own) from."""
    pull_tokens: int = 0
    retry_after_s: float | None = None
    """For retryable rejections: a hint for Retry-After (``None`` when unknown)."""
    detail: str = ""
    """Human-readable explanation, safe to put in a JSON error body."""

    @property
    def disaggregated(self) -> bool:
        return self.prefill_id is not None

    @property
    def retryable(self) -> bool:
        return not self.accepted and self.reason in RETRYABLE

    @classmethod
    def reject(cls, reason: str, detail: str, **kwargs: object) -> "Decision":
        return cls(accepted=False, reason=reason, detail=detail, **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RouterPolicy:
    """Router scoring configuration."""

    policy: str = "prefix_aware"
    """``round_robin``, ``least_loaded`` or ``prefix_aware``."""
    disagg_threshold_tokens: int = 512
    """Prefill remotely only when more prompt tokens than this are uncached on the decode server."""
    pd_placement: str = "deadline"
    """When a prefill server can take a request that is to be disaggregated. ``deadline``: when its
    predicted TTFT through that server is within the request's budget (a decode server prefills only by
    an explicit rule: threshold, prefix hit, prefill pool saturated). ``headroom`` (the rule before issue
    17, kept for comparison): when its predicted queue is under ``max_prefill_queue_s``."""
    max_prefill_queue_s: float = 2.0
    """``headroom`` placement only: a prefill server whose queued work is predicted to take longer than this
    takes no request."""
    default_ttft_budget_s: float = 30.0
    """TTFT budget for requests that bring none (``math.inf`` disables TTFT admission control)."""
    prefix_weight: float = 1.0
    """prefix_aware: weight of the cached fraction of the prompt on a decode server."""
    load_weight: float = 1.0
    """prefix_aware: weight of (running + queued tokens) / KV capacity."""
    kv_weight: float = 0.5
    """prefix_aware: weight of the fraction of KV blocks in use once this request is placed."""
    kv_transfer_s_per_token: float = 1e-6
    """Time the KV transfer adds to TTFT per transferred token (the part layer-wise streaming can't hide)."""
    prior_overhead_s: float = 0.02
    """Cost-model prior: fixed seconds per prefill."""
    prior_tokens_per_s: float = 10_000.0
    """Cost-model prior: prefill throughput."""
    prior_quadratic_s_per_token2: float = 0.0
    """Cost-model prior: attention's quadratic term."""
    prior_weight: float = 0.1
    """Cost-model prior strength, in pseudo-observations."""
    cost_forgetting_factor: float = 0.995
    """Cost-model forgetting per observation (1.0 = never forget)."""
    tiers: TierPolicy = field(default_factory=TierPolicy)
    """How host-tier hits and pulls from other servers are priced (``engine.router.tier_cost``)."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"RouterPolicy.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.pd_placement not in PD_PLACEMENTS:
            raise ValueError(f"RouterPolicy.pd_placement must be one of {PD_PLACEMENTS}, got {self.pd_placement!r}")
        if self.disagg_threshold_tokens < 0:
            raise ValueError(f"RouterPolicy.disagg_threshold_tokens must be >= 0, got {self.disagg_threshold_tokens}")
        for name in ("max_prefill_queue_s", "default_ttft_budget_s", "prior_tokens_per_s", "prior_weight"):
            value = getattr(self, name)
            if not value > 0:  # also rejects NaN
                raise ValueError(f"RouterPolicy.{name} must be > 0, got {value}")
        for name in ("prefix_weight", "load_weight", "kv_weight", "kv_transfer_s_per_token",
                     "prior_overhead_s", "prior_quadratic_s_per_token2"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"RouterPolicy.{name} must be finite and >= 0, got {value}")
        if not 0 < self.cost_forgetting_factor <= 1:
            raise ValueError(
                f"RouterPolicy.cost_forgetting_factor must be in (0, 1], got {self.cost_forgetting_factor}")

    def new_cost_model(self) -> PrefillCostModel:
        return PrefillCostModel(self.prior_overhead_s, self.prior_tokens_per_s, self.prior_quadratic_s_per_token2,
                                self.prior_weight, self.cost_forgetting_factor)


@dataclass(frozen=True, slots=True)
class _Pick:
    """The best server of one role found so far in ``choose``'s single pass."""

    server: ServerState
    cached_tokens: int
    ttft_s: float
    prefill_remote: bool = False
    tiers: TierPlan | None = None


@dataclass
class Scorer:
    """Scores servers for each request under one ``RouterPolicy``, and owns the prefill cost models.

    ``choose`` makes one pass over each role's servers and keeps the best so far under a per-policy
    sort key, so a decision costs O(servers) with no per-server allocation (hundreds of servers,
    thousands of requests per second).
    """

    policy: RouterPolicy = field(default_factory=RouterPolicy)
    _cost_models: dict[str, PrefillCostModel] = field(default_factory=dict, init=False, repr=False)
    _fleet_model: PrefillCostModel = field(init=False, repr=False)
    _last_decode_id: str | None = field(default=None, init=False)
    _last_prefill_id: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._fleet_model = self.policy.new_cost_model()
        self.pull_model = PullCostModel(self.policy.tiers)
        """Server-to-server KV bandwidth, measured by finished pulls (``observe_pull``)."""

    def observe_pull(self, num_bytes: int, seconds: float) -> None:
        """A pull of ``num_bytes`` took ``seconds`` from its owner's admission to its last WRITE."""
        self.pull_model.observe(num_bytes, seconds)

    # --- cost models -----------------------------------------------------------------------------

    def cost_model(self, server_id: str) -> PrefillCostModel:
        """The model that predicts ``server_id``'s prefills: its own once it has reported a prefill,
        before that the fleet-wide one (fitted on every server's reports, starting at the prior)."""
        model = self._cost_models.get(server_id)
        return self._fleet_model if model is None else model

    def observe_prefill(self, server_id: str, num_tokens: int, seconds: float) -> None:
        """A server reports that prefilling ``num_tokens`` new tokens of one request took ``seconds``."""
        model = self._cost_models.get(server_id)
        if model is None:  # start from the fleet's estimate with the prior's uncertainty: learns fast
            model = self._cost_models[server_id] = self._fleet_model.copy(reset_confidence=True)
        model.observe(num_tokens, seconds)
        self._fleet_model.observe(num_tokens, seconds)

    def forget_server(self, server_id: str) -> None:
        self._cost_models.pop(server_id, None)

    def _queue_s(self, server: ServerState) -> float:
        if server.queued_requests == 0 and server.queued_prefill_tokens == 0:
            return 0.0
        return self.cost_model(server.server_id).predict_queue(server.queued_requests, server.queued_prefill_tokens)

    # --- the decision ----------------------------------------------------------------------------

    def choose(self, request: RequestInfo, servers: Sequence[ServerState],
               prefix_match: Mapping[str, int], tier_hits: Mapping[str, TierHit] | None = None) -> Decision:
        """Pick decode (and maybe prefill) servers for ``request``; ``prefix_match`` is
        ``PrefixIndex.match(request.block_hashes)`` (cached leading blocks per server id); ``tier_hits``
        (``PrefixIndex.match_tiers``), when given, prices host-tier hits and pulls too."""
        pol = self.policy
        budget_s = request.ttft_budget_s if request.ttft_budget_s is not None else pol.default_ttft_budget_s
        num_prompt, zone = request.num_prompt_tokens, request.zone
        num_tokens = num_prompt + request.max_tokens

        eligible = servers if zone is None else [s for s in servers if s.zone == zone]
        if not eligible and zone is not None:
            zones = sorted({str(s.zone) for s in servers})
            return Decision.reject(NO_SERVER_IN_ZONE, f"no server in zone {zone!r} (zones: {zones})")
        decoders = [s for s in eligible if s.healthy and s.role != "prefill"]
        if not decoders:
            where = f" in zone {zone!r}" if zone is not None else ""
            return Decision.reject(NO_HEALTHY_SERVER, f"no healthy decode server{where}")

        prefillers = [s for s in eligible if s.healthy and s.role == "prefill"]
        prefill = self._pick_prefill(request, prefillers, prefix_match, budget_s)
        key = self._decode_key(request)
        best: _Pick | None = None
        best_key: tuple | None = None
        best_over_budget_s = math.inf
        num_fit = num_too_large = 0
        matched, block_size, max_cached = prefix_match.get, request.block_size, num_prompt - 1
        sources = pull_sources(tier_hits, {s.server_id for s in eligible if s.healthy}) if tier_hits else []
        for s in decoders:
            # Inlined _cached_tokens: this loop runs once per server per request.
            cached = min(matched(s.server_id, 0) * block_size, max_cached) if s.block_size == block_size else 0
            total_needed = _cdiv(num_tokens, s.block_size)
            if total_needed > s.total_blocks:
                num_too_large += 1
                continue
            if total_needed - cached // s.block_size > s.free_blocks:
                continue
            num_fit += 1
            # P/D placement: remote prefill for an uncached part over the threshold, when a P can take it.
            uncached = num_prompt - cached
            tiers = None if tier_hits is None or s.block_size != block_size else self._plan_tiers(request, s, tier_hits,
                                                                                                  sources)
            remote = prefill is not None and uncached - (tiers.covered_tokens - cached if tiers else 0) \
                > pol.disagg_threshold_tokens
            if remote:
                ttft_s, tiers = prefill.ttft_s + pol.kv_transfer_s_per_token * uncached, None
            elif tiers is not None:
                ttft_s = (self._queue_s(s) + tiers.fetch_s
                          + self.cost_model(s.server_id).predict(num_prompt - tiers.covered_tokens))
            else:
                ttft_s = self._queue_s(s) + self.cost_model(s.server_id).predict(uncached)
            if ttft_s > budget_s:
                best_over_budget_s = min(best_over_budget_s, ttft_s)
                continue
            k = key(s, cached, tiers.effective_cached_tokens if tiers is not None else cached)
            if best_key is None or k < best_key:
                best, best_key = _Pick(s, cached, ttft_s, remote, tiers), k

        if best is None:
            if num_too_large == len(decoders):
                return Decision.reject(REQUEST_TOO_LARGE, f"{num_prompt} prompt + {request.max_tokens} max tokens "
                                       f"exceed every decode server's KV capacity")
            if num_fit == 0:
                return Decision.reject(NO_CAPACITY, f"no decode server has free KV blocks for {num_tokens} tokens")
            return Decision.reject(
                OVER_TTFT_BUDGET,
                f"best predicted TTFT {best_over_budget_s:.3f}s exceeds the {budget_s:.3f}s budget",
                predicted_ttft_s=best_over_budget_s, retry_after_s=best_over_budget_s - budget_s)

        self._last_decode_id = best.server.server_id
        if best.prefill_remote:
            assert prefill is not None
            self._last_prefill_id = prefill.server.server_id
            return Decision(accepted=True, reason=DISAGGREGATED, decode_id=best.server.server_id,
                            prefill_id=prefill.server.server_id, predicted_ttft_s=best.ttft_s,
                            decode_cached_tokens=best.cached_tokens, prefill_cached_tokens=prefill.cached_tokens)
        t = best.tiers or TierPlan()
        covered = t.covered_tokens if best.tiers else best.cached_tokens
        if num_prompt - covered > pol.disagg_threshold_tokens:
            reason = LOCAL_PREFILL_SATURATED if prefillers else LOCAL_NO_PREFILL_SERVER
        else:
            reason = LOCAL_PREFIX_HIT if num_prompt > pol.disagg_threshold_tokens else LOCAL_BELOW_THRESHOLD
        return Decision(accepted=True, reason=reason, decode_id=best.server.server_id, predicted_ttft_s=best.ttft_s,
                        decode_cached_tokens=best.cached_tokens, host_hit_tokens=t.host_tokens,
                        pull_from_id=t.pull_from, pull_tokens=t.pull_tokens)

    def _plan_tiers(self, request: RequestInfo, s: ServerState, tier_hits: Mapping[str, TierHit],
                    sources: list[tuple[str, int]]) -> TierPlan:
        model = self.cost_model(s.server_id)
        return plan_tiers(s.server_id, request.num_prompt_tokens, request.block_size, tier_hits, sources,
                          model.predict, self.policy.tiers, self.pull_model)

    @staticmethod
    def _cached_tokens(request: RequestInfo, server: ServerState, prefix_match: Mapping[str, int]) -> int:
        if server.block_size != request.block_size:
            return 0  # its hashes are over other block boundaries: nothing comparable
        # The last prompt token is always computed, for its logits, even when every block is cached.
        return min(prefix_match.get(server.server_id, 0) * request.block_size, request.num_prompt_tokens - 1)

    def _decode_key(self, request: RequestInfo) -> Callable[[ServerState, int, float], tuple]:
        """Sort key of a decode candidate under the policy (smallest wins; the id breaks ties)."""
        pol = self.policy
        if pol.policy == "round_robin":
            last = self._last_decode_id
            # The first id after the last one used, wrapping around to the smallest.
            return lambda s, cached, effective: (last is not None and s.server_id <= last, s.server_id)

        def load_fraction(s: ServerState) -> float:
            return (s.running_tokens + s.queued_prefill_tokens) / max(s.capacity_tokens, 1)

        if pol.policy == "least_loaded":
            return lambda s, cached, effective: (load_fraction(s), s.running_requests + s.queued_requests, s.server_id)
        num_prompt = request.num_prompt_tokens
        num_tokens = num_prompt + request.max_tokens

        def prefix_aware(s: ServerState, cached: int, effective: float) -> tuple:
            """``cached``: device hits (they need no new block); ``effective``: all reused tokens, priced by tier."""
            blocks_after = s.free_blocks - (_cdiv(num_tokens, s.block_size) - cached // s.block_size)
            kv_used_after = 1.0 - blocks_after / max(s.total_blocks, 1)
            score = (pol.prefix_weight * effective / num_prompt - pol.load_weight * load_fraction(s)
                     - pol.kv_weight * kv_used_after)
            return (-score, s.server_id)

        return prefix_aware

    def _pick_prefill(self, request: RequestInfo, prefillers: list[ServerState],
                      prefix_match: Mapping[str, int], budget_s: float) -> _Pick | None:
        """The prefill server this request would use if it disaggregates, or None if none can take it: it
        needs free blocks for the uncached prompt, and a predicted TTFT (queue + prefill + the transfer of
        the whole prompt, the most any decode server needs) within ``budget_s``; under ``headroom``
        placement, a predicted queue within ``max_prefill_queue_s`` instead."""
        pol = self.policy
        last = self._last_prefill_id
        best: _Pick | None = None
        best_key: tuple | None = None
        transfer_s = pol.kv_transfer_s_per_token * request.num_prompt_tokens
        for s in prefillers:
            queue_s = self._queue_s(s)
            cached = self._cached_tokens(request, s, prefix_match)
            blocks_needed = _cdiv(request.num_prompt_tokens, s.block_size) - cached // s.block_size
            if blocks_needed > s.free_blocks:
                continue
            ttft_s = queue_s + self.cost_model(s.server_id).predict(request.num_prompt_tokens - cached)
            if pol.pd_placement == "headroom":
                if queue_s > pol.max_prefill_queue_s:
                    continue
            elif ttft_s + transfer_s > budget_s:
                continue
            if pol.policy == "round_robin":
                k: tuple = (last is not None and s.server_id <= last, s.server_id)
            elif pol.policy == "least_loaded":
                k = (s.queued_prefill_tokens, s.queued_requests, s.server_id)
            else:
                k = (ttft_s, s.server_id)
            if best_key is None or k < best_key:
                best, best_key = _Pick(s, cached, ttft_s), k
        return best
