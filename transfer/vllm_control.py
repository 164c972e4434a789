"""Messages between a ``--executor vllm`` server and the Duet KV connector inside its vLLM worker.

vLLM runs its scheduler and its worker in processes of their own, so the server (which speaks Duet's
protocol to routers and peers) and the connector's worker side (which owns the KV transport, the staging
slabs and vLLM's KV cache, through ``transfer.handoff.Handoff``) talk over one local ZeroMQ pair: the server
binds a ROUTER, the worker connects a DEALER and introduces itself with ``WorkerReady``. Typed msgpack like
every Duet message::

    worker -> server   WorkerReady    transport name + metadata, staging region, KV layout
    server -> worker   ConnectPeer    a peer's transport (after a handshake, either direction)
    server -> worker   PeerReady      decode side: the prefill peer of a transfer is reachable under this name
    server -> worker   FirstToken     prefill side: the token vLLM sampled (or why there is none); rides the
                                      last layer
    server -> worker   AbortSend      prefill side: stop a send
    server -> worker   FailRecv       decode side: the KV of a transfer will not come (router said so)
    worker -> server   SendEnded      prefill side: a send finished (ok or not)
    worker -> server   RecvFailed     decode side: a receive failed (vLLM's load-failure policy takes over;
                                      the server applies its own policy too)
    worker -> server   WorkerStats    hand-off counters

``KVDest`` and ``KVLayers`` do not pass through the server: they travel on the KV transport, between the
worker's ``Handoff`` and the peer's.
"""
from __future__ import annotations

from dataclasses import dataclass

from duet.transfer.compat import KVLayout
from duet.transfer.handoff import HandoffStats
from duet.transfer.transport import RemoteRegion
from duet.transfer.wire import Message


@dataclass
class WorkerReady(Message):
    TYPE = "vllm.worker_ready"
    transport_kind: str
    transport_name: str
    transport_metadata: bytes
    staging_region: RemoteRegion
    layout: KVLayout
    num_blocks: int
    """Blocks of vLLM's KV cache (per layer)."""


@dataclass
class ConnectPeer(Message):
    TYPE = "vllm.connect_peer"
    transport_name: str
    transport_metadata: bytes


@dataclass
class PeerReady(Message):
    TYPE = "vllm.peer_ready"
    transfer_id: str
    transport_name: str


@dataclass
class FirstToken(Message):
    """Prefill side: vLLM sampled ``token`` for ``transfer_id`` (or failed, with ``error``)."""

    TYPE = "vllm.first_token"
    transfer_id: str
    token: int | None = None
    logprobs: dict[int, float] | None = None
    error: str | None = None


@dataclass
class AbortSend(Message):
    TYPE = "vllm.abort_send"
    transfer_id: str
    reason: str = "aborted"


@dataclass
class FailRecv(Message):
    TYPE = "vllm.fail_recv"
    transfer_id: str
    reason: str


@dataclass
class SendEnded(Message):
    TYPE = "vllm.send_ended"
    transfer_id: str
    ok: bool
    error: str | None = None
    num_cached_tokens: int = 0
    num_bytes: int = 0


@dataclass
class RecvFailed(Message):
    TYPE = "vllm.recv_failed"
    request_id: str
    transfer_id: str
    reason: str


@dataclass
class WorkerStats(Message):
    TYPE = "vllm.worker_stats"
    stats: HandoffStats
    open_transfers: int = 0
