"""The router <-> server control protocol: typed, versioned msgpack messages on ZeroMQ.

Both ends import this module: the servers (``engine.server``) and the router (``engine.router``). The KV
hand-off between servers has messages of its own (``transfer.messages``: ``KVDest``, ``KVLayers``), which
travel on the KV transport, not here.

A disaggregated request (one request id; one transfer id per attempt)::

    router -> D   Generate(remote=RemotePrefill(P, transfer_id))   D allocates blocks now, greets P if needed
    router -> P   Prefill(transfer_id)                             concurrently
    D ~> P        KVDest (on the KV transport)                     where P writes each layer
    P ~> D        KVLayers (on the KV transport, after each layer; the last carries token 1)
    D -> router   Tokens ... Tokens(finished)
    P -> router   PrefillDone(transfer_id, compute time, ok / error)

A prefix pull (issue 19: the router found a prompt's prefix cached on server A, device or host tier, and places
the request on server B, which computes only the rest)::

    router -> B   Generate(pull=RemotePull(A, transfer_id, num_blocks))   B allocates, greets A's transport
    router -> A   PullKV(transfer_id, prefix tokens, puller=B)             concurrently; A pins the blocks
    B ~> A        KVDest                                                  as in a hand-off
    A ~> B        KVLayers (every layer, no first token)                  B then prefills the rest itself
    A -> router   PullDone(ok / error)
    B -> router   Tokens ... Tokens(finished)                             a failed pull is recomputed on B

Servers answer the router's ``Hello`` with ``Welcome`` (their ``ServerInfo``). Servers never greet each other:
the router hands each side of a transfer the other's ``PeerRef`` (transport name and metadata, KV layout), and
each side checks the layout against its own before any KV moves (``transfer.compat``). Events on each server's PUB socket: ``LoadReport`` (also the
heartbeat) and ``KVEvents``. Every field is checked against its annotation when a message is decoded
(``transfer.wire``), so a handler only ever sees well-typed values; range checks that types cannot express
live in each class's ``__post_init__`` and fail the decode the same way.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from duet.engine.kv_events import KVEvent
from duet.engine.sampling_params import SamplingParams
from duet.transfer.compat import KVLayout
from duet.transfer.transport import RemoteRegion
from duet.transfer.wire import Message


MAX_ID_CHARS = 256
MAX_PROMPT_TOKENS = 1 << 22
MAX_ATTEMPTS = 1 << 16


def check_id(name: str, value: str) -> None:
    """ValueError unless ``value`` is a usable id: 1..256 printable characters (ids end up in logs, traces and
    engine tables, so a peer cannot make them huge or unprintable)."""
    if not 0 < len(value) <= MAX_ID_CHARS or not value.isprintable():
        raise ValueError(f"{name} must be 1-{MAX_ID_CHARS} printable characters, got {value!r:.80}")


def check_attempt(value: int) -> None:
    if not 0 <= value < MAX_ATTEMPTS:
        raise ValueError(f"attempt must be in [0, {MAX_ATTEMPTS}), got {value}")


def check_transfer_order(msg: Prefill | PullKV, tokens_field: str) -> None:
    """What a router's order to send KV (``Prefill``, ``PullKV``) must hold: ids, an attempt, 1 to
    ``MAX_PROMPT_TOKENS`` tokens in ``tokens_field`` and a deadline of at most an hour."""
    check_id("request_id", msg.request_id)
    check_id("transfer_id", msg.transfer_id)
    check_attempt(msg.attempt)
    if not 0 < len(getattr(msg, tokens_field)) <= MAX_PROMPT_TOKENS:
        raise ValueError(f"{tokens_field} must hold 1-{MAX_PROMPT_TOKENS} tokens")
    if not 0 < msg.timeout_s <= 3600:
        raise ValueError(f"timeout_s must be in (0, 3600], got {msg.timeout_s}")


class WireEnum(str, enum.Enum):
    """A string enum whose ``str()`` and ``format()`` are its value (``f"{Role.DECODE}"`` is ``decode``)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Role(WireEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"
    """Colocated: prefills and decodes its own requests."""
    ROUTER = "router"
    """Only in a router's ``Hello``."""


SERVER_ROLES = (Role.PREFILL, Role.DECODE, Role.BOTH)


class FinishReason(WireEnum):
    STOP = "stop"
    """EOS, a stop token or a stop string."""
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"

    @classmethod
    def of(cls, value: str | None) -> "FinishReason | None":
        """An engine's finish reason as Duet's (a reason Duet does not know, e.g. vLLM's ``repetition``, is a stop)."""
        if value is None:
            return None
        try:
            return cls(str(value))
        except ValueError:
            return cls.STOP


# ---- handshake --------------------------------------------------------------------------------------------


@dataclass
class ServerInfo:
    engine_id: str
    epoch: str
    """Changes every time the process starts: a peer with a new epoch is a new peer."""
    role: Role
    model_name: str
    address: str = ""
    """The server's command socket (``tcp://host:port``)."""
    event_address: str = ""
    zone: str | None = None
    layout: KVLayout | None = None
    compat_hash: str = ""
    transport_kind: str = ""
    transport_name: str = ""
    transport_metadata: bytes = b""
    staging_region: RemoteRegion | None = None
    max_model_len: int = 0
    vocab_size: int = 0
    num_total_blocks: int = 0
    tensor_parallel_size: int = 1
    """The server's engine layout, for information: KV always crosses the wire in the whole model's layout
    (``layout``), so peers with different parallel sizes are compatible."""
    pipeline_parallel_size: int = 1


@dataclass
class Hello(Message):
    TYPE = "hello"
    info: ServerInfo


@dataclass
class Welcome(Message):
    TYPE = "welcome"
    info: ServerInfo


@dataclass
class Refused(Message):
    TYPE = "refused"
    reason: str


# ---- requests ---------------------------------------------------------------------------------------------


@dataclass
class PeerRef:
    """Another server as the router knows it (from its ``Welcome``): enough to move KV to or from it with no
    handshake of the two servers' own. Each side checks ``layout`` against its own first."""

    engine_id: str
    layout: KVLayout
    transport_kind: str
    transport_name: str
    transport_metadata: bytes
    """What the peer's ``KVTransport.metadata()`` returned; passed to ``connect`` (validated there)."""

    def __post_init__(self) -> None:
        check_id("engine_id", self.engine_id)
        check_id("transport_name", self.transport_name)
        if len(self.transport_metadata) > 1 << 20:
            raise ValueError(f"transport_metadata of {len(self.transport_metadata)} bytes is over 1 MiB")

    @classmethod
    def of(cls, info: ServerInfo) -> "PeerRef":
        if info.layout is None:
            raise ValueError(f"server {info.engine_id} advertised no KV layout")
        return cls(info.engine_id, info.layout, info.transport_kind, info.transport_name, info.transport_metadata)


@dataclass
class RemotePrefill:
    prefill: PeerRef
    transfer_id: str
    kv_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        check_id("transfer_id", self.transfer_id)
        if not 0 < self.kv_timeout_s <= 3600:
            raise ValueError(f"kv_timeout_s must be in (0, 3600], got {self.kv_timeout_s}")


@dataclass
class RemotePull:
    """The first ``num_blocks`` prompt blocks are cached on ``owner``: pull them instead of computing them."""

    owner: PeerRef
    transfer_id: str
    num_blocks: int
    kv_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        check_id("transfer_id", self.transfer_id)
        if not 0 < self.num_blocks <= 1 << 24:
            raise ValueError(f"num_blocks must be in (0, {1 << 24}], got {self.num_blocks}")
        if not 0 < self.kv_timeout_s <= 3600:
            raise ValueError(f"kv_timeout_s must be in (0, 3600], got {self.kv_timeout_s}")


@dataclass
class Generate(Message):
    """Router -> D (or a colocated server): generate tokens, prefilling locally unless ``remote`` is set."""

    TYPE = "generate"
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    remote: RemotePrefill | None = None
    attempt: int = 0
    """Which try of the request this is (the router moves a request to another server under a new attempt);
    every ``Tokens`` of it carries the number back, so a superseded attempt's late output is recognised."""
    pull: RemotePull | None = None
    """Pull a cached prefix from another server (ignored with ``remote``); the rest is prefilled here."""

    def __post_init__(self) -> None:
        check_id("request_id", self.request_id)
        check_attempt(self.attempt)
        if not 0 < len(self.prompt_token_ids) <= MAX_PROMPT_TOKENS:
            raise ValueError(f"prompt_token_ids must hold 1-{MAX_PROMPT_TOKENS} tokens")


@dataclass
class Prefill(Message):
    """Router -> P: compute the prompt's KV and stream it to the decode server ``decode``."""

    TYPE = "prefill"
    request_id: str
    transfer_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    decode: PeerRef
    timeout_s: float = 30.0
    attempt: int = 0

    def __post_init__(self) -> None:
        check_transfer_order(self, "prompt_token_ids")


@dataclass
class PrefillDone(Message):
    TYPE = "prefill_done"
    request_id: str
    transfer_id: str
    ok: bool
    error: str | None = None
    compute_s: float = 0.0
    """From admission to the first token sampled."""
    num_cached_tokens: int = 0
    num_bytes: int = 0
    num_tokens: int = 0
    """Prompt tokens the prefill server computed (its own prefix hits excluded)."""
    attempt: int = 0
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """When the request asked for them (``SamplingParams.prompt_logprobs``): scored by the prefill server, so the
    decode server never recomputes the prompt; the router puts them in the request's first delta."""
    prompt_token_ranks: list[int | None] | None = None


@dataclass
class PullKV(Message):
    """Router -> A: send the KV of ``prefix_token_ids`` (whole blocks, cached here) to the server ``puller``."""

    TYPE = "pull_kv"
    request_id: str
    transfer_id: str
    prefix_token_ids: list[int]
    puller: PeerRef
    timeout_s: float = 30.0
    attempt: int = 0

    def __post_init__(self) -> None:
        check_transfer_order(self, "prefix_token_ids")


@dataclass
class PullDone(Message):
    """A -> router: the pull ``transfer_id`` ended (its blocks are no longer pinned here)."""

    TYPE = "pull_done"
    request_id: str
    transfer_id: str
    ok: bool
    error: str | None = None
    num_blocks: int = 0
    num_bytes: int = 0
    seconds: float = 0.0
    """Admission to the last WRITE acknowledged (or the failure)."""
    attempt: int = 0


@dataclass
class TokenDelta:
    """New tokens of one request since the previous delta: what a ``Dispatcher`` yields to the front end, and
    the body of a ``Tokens`` message."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    """One entry per new token (sampled token + top-N alternatives -> logprob), when requested."""
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None
    """The stop token id, when a stop token (not a string) ended the request."""
    num_cached_tokens: int = 0
    """Prompt tokens that were served from a prefix cache (usage.prompt_tokens_details.cached_tokens)."""
    error: str | None = None
    """Set with finish_reason ``error``: what went wrong, safe to show to the client."""
    status: int = 500
    """HTTP status for an error that happens before the first token (e.g. 400, 429, 503)."""
    retryable: bool = False
    """The error says nothing about the request (e.g. the server is draining): another server may take it."""
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """Once (first delta after the prompt was scored) when ``sampling.prompt_logprobs`` is set: per prompt
    position the prompt token then its top alternatives -> logprob; position 0 (no context) is None."""
    prompt_token_ranks: list[int | None] | None = None
    """With ``prompt_logprobs``: rank of each prompt token in its position's distribution (1 = most likely)."""

    @classmethod
    def failure(cls, error: str, status: int, retryable: bool = False) -> "TokenDelta":
        """The last delta of a request that failed with ``error``."""
        return cls(finished=True, finish_reason=FinishReason.ERROR, error=error, status=status, retryable=retryable)


@dataclass
class Tokens(Message):
    """D -> router: new tokens of a request (the last message of a request has ``delta.finished``)."""

    TYPE = "tokens"
    request_id: str
    delta: TokenDelta
    attempt: int = 0
    """The attempt (``Generate.attempt``) these tokens belong to."""


@dataclass
class Abort(Message):
    TYPE = "abort"
    request_id: str
    transfer_id: str | None = None
    attempt: int | None = None
    """Only this attempt (None: whichever the server runs)."""


@dataclass
class KVFailed(Message):
    """Router -> D: the prefill side of ``transfer_id`` is gone; apply the KV failure policy now."""

    TYPE = "kv_failed"
    request_id: str
    transfer_id: str
    reason: str = ""


@dataclass
class Lease(Message):
    """Router -> every server, every second or so: this router is alive; if nothing (this or any other message)
    comes from it for ``ttl_s``, the server aborts the router's requests and frees what they hold."""

    TYPE = "lease"
    router_id: str
    ttl_s: float

    def __post_init__(self) -> None:
        if not 0.5 <= self.ttl_s <= 3600:
            raise ValueError(f"ttl_s must be in [0.5, 3600], got {self.ttl_s}")


@dataclass
class Drain(Message):
    """Admit nothing new, finish what runs (bounded by the server's drain timeout), then exit."""

    TYPE = "drain"


# ---- observability ----------------------------------------------------------------------------------------


@dataclass
class ServerStats:
    """A server's counters and gauges (``Stats.values``); executors fill what they measure, the rest stays 0."""

    free_blocks: int = 0
    total_blocks: int = 0
    waiting: int = 0
    running: int = 0
    waiting_for_kv: int = 0
    open_requests: int = 0
    """Requests the server tracks (generating, awaiting KV, or prefilling for a peer); 0 when idle."""
    open_transfers: int = 0
    """KV hand-offs in flight on this server (either direction); 0 when idle."""
    prompt_tokens_computed: int = 0
    prompt_tokens_external: int = 0
    """Prompt tokens whose KV came from another server (vLLM executor)."""
    generated_tokens: int = 0
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0
    """Prompt tokens looked up in the prefix cache (``prefix_hit_tokens`` of them were found)."""
    cached_blocks: int = 0
    """Free KV blocks that still hold a cached prefix (evictable)."""
    preemptions: int = 0
    kv_bytes_sent: int = 0
    kv_descriptors_sent: int = 0
    kv_layer_sends: int = 0
    kv_transfers_sent: int = 0
    kv_transfers_failed_send: int = 0
    kv_bytes_received: int = 0
    kv_layers_received: int = 0
    kv_transfers_received: int = 0
    kv_transfers_failed: int = 0
    kv_transfers_cancelled: int = 0
    kv_duplicate_notifications: int = 0
    kv_transfer_seconds_sum: float = 0.0
    """Admission (KVDest sent) to all KV in place, summed over completed receives."""
    kv_transfer_seconds_max: float = 0.0
    kv_fallbacks: int = 0
    kv_failed_requests: int = 0
    peers_refused: int = 0
    """Transfers refused because the peer's KV layout or transport did not fit, or it could not be reached."""
    kv_events_published: int = 0
    engine_healthy: int = 1
    # KV tiers (issue 19): where prompt tokens came from, and what each tier moved.
    tier_lookups: int = 0
    """Admissions that looked past their device hits (host tier on, or a pull)."""
    host_tier_blocks: int = 0
    host_tier_cached_blocks: int = 0
    host_tier_busy_blocks: int = 0
    """Host blocks being read or written by a copy; 0 when idle."""
    host_hits: int = 0
    """Admissions that loaded blocks from the host tier (misses: ``tier_lookups`` - ``host_hits`` - pulls)."""
    host_hit_tokens: int = 0
    host_offload_blocks: int = 0
    host_offload_bytes: int = 0
    host_load_blocks: int = 0
    host_load_bytes: int = 0
    host_load_failures: int = 0
    host_load_seconds_sum: float = 0.0
    host_load_seconds_max: float = 0.0
    host_evictions: int = 0
    host_writes_refused: int = 0
    pulls_started: int = 0
    pull_hits: int = 0
    """Pulls whose blocks were used (``pulls_started`` - ``pull_hits``: failed or declined, recomputed)."""
    pulled_tokens: int = 0
    pull_bytes_received: int = 0
    pull_seconds_sum: float = 0.0
    pulls_served: int = 0
    pulls_served_failed: int = 0
    pull_bytes_served: int = 0


@dataclass
class StatsRequest(Message):
    TYPE = "stats_request"
    token: int = 0
    request_id: str | None = None
    """Only this request's trace (None: every trace the server keeps)."""


@dataclass
class Stats(Message):
    TYPE = "stats"
    token: int
    engine_id: str
    values: ServerStats = field(default_factory=ServerStats)
    traces: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per request id: stage -> unix timestamp (queued, prefill_admitted, layer_0_sent, kv_layer_0_received, ...)."""


@dataclass
class Load:
    """A server's scheduler as the router's scorer sees it (what ``LoadReport`` carries)."""

    waiting: int = 0
    running: int = 0
    waiting_for_kv: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    queued_prefill_tokens: int = 0
    """Prompt tokens still to prefill over the waiting requests."""
    running_tokens: int = 0
    """Context tokens (prompt + generated) of the running requests."""


@dataclass
class LoadReport(Message):
    """Every heartbeat on the PUB socket (and at once when the server starts draining)."""

    TYPE = "load"
    engine_id: str
    epoch: str
    role: Role
    load: Load
    draining: bool = False


@dataclass
class KVEvents(Message):
    TYPE = "kv_events"
    engine_id: str
    epoch: str
    events: list[KVEvent] = field(default_factory=list)
