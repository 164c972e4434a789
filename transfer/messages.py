"""Control-plane messages between router, prefill (P) and decode (D) servers. Typed, versioned msgpack.

A disaggregated request (ids: one request id, one transfer id per attempt)::

    router -> D   Generate(remote=RemotePrefill(P, transfer_id))   D allocates blocks + staging now
    router -> P   Prefill(transfer_id)                             concurrently
    D -> P        KVDest(transfer_id, where to write)              P admits the prompt once it has both
    P -> D        KVLayers (transport notification, after each layer's bytes; the last carries token 1)
    D -> router   Tokens ... Tokens(finished)
    P -> router   PrefillDone(transfer_id, compute time, ok / error)

Servers answer ``Hello`` with ``Welcome`` (their ``ServerInfo``) or ``Refused``; a peer's KV layout must
hash equal (``transfer.compat``) before any KV moves. That layout is the wire's (every layer and KV head),
not a rank's: prefill and decode servers of different tensor / pipeline parallel sizes are compatible.
Events on each server's PUB socket: ``LoadReport`` and ``KVEvents``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transfer.compat import KVLayout
from transfer.transport import RemoteRegion
from transfer.wire import Message


@dataclass
class ServerInfo:
    engine_id: str
    epoch: str
    """Changes every time the process starts: a peer with a new epoch is a new peer."""
    role: str
    """``prefill``, ``decode`` or ``both`` (or ``router`` in a router's Hello)."""
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


@dataclass
class RemotePrefill:
    prefill_engine_id: str
    prefill_address: str
    transfer_id: str
    kv_timeout_s: float = 30.0


@dataclass
class Generate(Message):
    """Router -> D (or a colocated server): generate tokens, prefilling locally unless ``remote`` is set."""

    TYPE = "generate"
    request_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    remote: RemotePrefill | None = None


@dataclass
class Prefill(Message):
    """Router -> P: compute the prompt's KV and stream it to the decode server of ``transfer_id``."""

    TYPE = "prefill"
    request_id: str
    transfer_id: str
    prompt_token_ids: list[int]
    sampling: dict[str, Any]
    decode_engine_id: str
    timeout_s: float = 30.0


@dataclass
class KVDest(Message):
    """D -> P: where the request's KV goes. D already holds ``num_skip_blocks`` prompt blocks (prefix cache)."""

    TYPE = "kv_dest"
    request_id: str
    transfer_id: str
    decode_engine_id: str
    decode_transport_name: str
    region: RemoteRegion
    offset: int
    """Byte offset in ``region`` of the staging slab: [layers, 2, num_blocks, block_size, heads, head_dim]."""
    num_skip_blocks: int
    num_blocks: int


@dataclass
class KVLayers(Message):
    """P -> D transport notification: layers [layer_start, layer_end) of ``transfer_id`` have landed."""

    TYPE = "kv_layers"
    transfer_id: str
    layer_start: int
    layer_end: int
    first_token: int | None = None
    """Sent with the last layers: the token P sampled, so D never recomputes it."""
    first_logprobs: dict[int, float] | None = None
    first_generator_state: bytes | None = None
    """Seeded requests: P's sampling generator after the first token (torch ``Generator.get_state`` bytes), so
    D's sampled continuation equals a colocated server's. Absent from older senders: D reseeds instead."""
    error: str | None = None


@dataclass
class PrefillDone(Message):
    TYPE = "prefill_done"
    request_id: str
    transfer_id: str
    ok: bool
    error: str | None = None
    compute_s: float = 0.0
    """From admission to the last layer computed."""
    num_cached_tokens: int = 0
    num_bytes: int = 0
    num_tokens: int = 0
    """Prompt tokens the prefill server computed (its own prefix hits excluded)."""


@dataclass
class Tokens(Message):
    """D -> router: new tokens of a request (the last message of a request has ``finished``)."""

    TYPE = "tokens"
    request_id: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    status: int = 500
    retryable: bool = False
    """The error says nothing about the request (e.g. the server is draining): another server may take it."""


@dataclass
class Abort(Message):
    TYPE = "abort"
    request_id: str
    transfer_id: str | None = None


@dataclass
class KVFailed(Message):
    """Router -> D: the prefill side of ``transfer_id`` is gone; apply the KV failure policy now."""

    TYPE = "kv_failed"
    request_id: str
    transfer_id: str
    reason: str = ""


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
    values: dict[str, float] = field(default_factory=dict)
    traces: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per request id: stage -> unix timestamp (queued, prefill_start, layer_0_sent, kv_layer_0, ...)."""


@dataclass
class Drain(Message):
    TYPE = "drain"


@dataclass
class LoadReport(Message):
    TYPE = "load"
    engine_id: str
    epoch: str
    role: str
    waiting: int
    running: int
    waiting_for_kv: int
    free_blocks: int
    total_blocks: int
    queued_prefill_tokens: int = 0
    running_tokens: int = 0
    draining: bool = False


@dataclass
class KVEvents(Message):
    TYPE = "kv_events"
    engine_id: str
    epoch: str
    events: list[dict[str, Any]] = field(default_factory=list)
