"""Messages between a ``--executor vllm`` server and the Duet KV connector inside its vLLM worker.

vLLM runs its scheduler and its worker in processes of their own, so the server (which speaks Duet's
protocol to routers and peers) and the connector's worker side (which owns the transport, the staging slabs
and vLLM's KV cache) talk over one local ZeroMQ pair: the server binds a ROUTER, the worker connects a
DEALER and introduces itself with ``WorkerReady``. Typed msgpack like every Duet message::

    worker -> server   WorkerReady            transport name + metadata, staging region, KV layout
    server -> worker   ConnectPeer            a peer's transport (from its Hello): we may write to it
    server -> worker   KVDest                 prefill side: where a transfer's layers go (from the decode peer)
    server -> worker   FirstToken             prefill side: the token vLLM sampled; rides the last layer
    server -> worker   Abort / KVFailed       stop a send / fail a receive (its policy is vLLM's)
    worker -> server   KVDest                 decode side: our staging slot, for the prefill peer
    worker -> server   PrefillDone            prefill side: a send finished (ok or not)
    worker -> server   Stats                  transfer counters (bytes, per-layer sends, failures)
"""
from __future__ import annotations

from dataclasses import dataclass

from transfer.compat import KVLayout
from transfer.transport import RemoteRegion
from transfer.wire import Message

# The worker's transfer counters (``Stats.values``), merged into the server's stats.
STAT_NAMES = ("kv_bytes_sent", "kv_layer_sends", "kv_descriptors_sent", "kv_transfers_sent", "kv_transfers_failed_send",
              "kv_bytes_received", "kv_layers_received", "kv_transfers_received", "kv_transfers_failed",
              "kv_transfers_cancelled", "kv_transfer_seconds_sum", "kv_transfer_seconds_max")


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
class FirstToken(Message):
    """Prefill side: vLLM sampled ``token`` for ``transfer_id`` (or failed, with ``error``)."""

    TYPE = "vllm.first_token"
    transfer_id: str
    token: int | None = None
    logprobs: dict[int, float] | None = None
    error: str | None = None
