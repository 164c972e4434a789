"""What a server needs from whatever runs its model: the ``Executor`` interface, and the events it reports.

``engine.server.server.Server`` owns everything that is a server's business (sockets, handshakes, peers,
heartbeats, drain, stats, the KV failure policy, which router asked for which request, the ``xfer:`` id
namespace); an executor runs requests and moves their KV. Two implementations:

- ``engine.server.native_executor.NativeExecutor``: Duet's own ``LLMEngine`` and ``transfer.handoff.Handoff``
  in this process, stepped by the server's loop;
- ``engine.server.vllm_executor.VllmExecutor``: a vLLM engine on a thread, whose worker runs the same
  ``Handoff`` inside Duet's vLLM KV connector.

Contract. Every method is called from the server's loop thread only, and none blocks for long (``close``
excepted). Requests are named by *engine request ids*, chosen by the server: the router's request id for
requests that generate here, ``xfer:<transfer id>`` for prompts prefilled here for another server. Bad input
raises ``ValueError`` naming the field before anything is allocated. Outcomes come back from ``run_once`` as
events, in order: ``Tokens`` (request id = engine request id), ``PrefillDone`` (a hand-off this server sent
ended; request id = engine request id, the server fills in the rest), ``PullDone`` (a pull this server served
ended; same ids) and ``KVLost``. After an ``abort`` the
executor still reports the request's end once (a final ``Tokens`` or ``PrefillDone``).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import zmq

from duet.engine.kv_events import KVEvent
from duet.engine.protocol import Load, PrefillDone, PullDone, ServerStats, Tokens
from duet.engine.sampling_params import SamplingParams
from duet.transfer.compat import KVLayout
from duet.transfer.handoff import HandoffStats
from duet.transfer.transport import RemoteRegion


@dataclass
class KVLost:
    """Decode side: the KV of remote request ``request_id`` will not come (the server applies its policy)."""

    request_id: str
    transfer_id: str
    reason: str


ExecutorEvent = Tokens | PrefillDone | PullDone | KVLost


@dataclass
class ExecutorInfo:
    """What the handshake advertises about this executor (``engine.protocol.ServerInfo``'s engine half)."""

    layout: KVLayout
    """The KV layout on the wire (the whole model's, whatever the engine's parallel layout)."""
    transport_kind: str
    transport_name: str
    transport_metadata: bytes
    staging_region: RemoteRegion
    max_model_len: int
    vocab_size: int
    num_total_blocks: int
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1


def handoff_stats_into(stats: ServerStats, h: HandoffStats) -> None:
    """Copy hand-off counters into the server's stats (one naming for both executors)."""
    stats.kv_bytes_sent = h.bytes_sent
    stats.kv_descriptors_sent = h.descriptors_sent
    stats.kv_layer_sends = h.layer_sends
    stats.kv_transfers_sent = h.transfers_sent
    stats.kv_transfers_failed_send = h.transfers_failed_send
    stats.kv_bytes_received = h.bytes_received
    stats.kv_layers_received = h.layers_received
    stats.kv_transfers_received = h.transfers_received
    stats.kv_transfers_failed = h.transfers_failed
    stats.kv_transfers_cancelled = h.transfers_cancelled
    stats.kv_duplicate_notifications = h.duplicate_notifications + h.late_notifications
    stats.kv_transfer_seconds_sum = h.transfer_seconds_sum
    stats.kv_transfer_seconds_max = h.transfer_seconds_max


class Executor(abc.ABC):
    info: ExecutorInfo

    def sockets(self) -> list[zmq.Socket]:
        """Sockets the server's poller should wake on (the executor drains them itself in ``run_once``)."""
        return []

    @abc.abstractmethod
    def wait_s(self) -> float:
        """How long the server may wait for a message before calling ``run_once`` again (0: work is ready)."""

    @abc.abstractmethod
    def connect_peer(self, transport_name: str, metadata: bytes) -> None:
        """Make a peer server's transport reachable (before the first transfer with it, either direction).
        Raises ``TransferError`` / ``ValueError`` / ``RuntimeError`` when it cannot be (the server refuses it)."""

    def peer_connected(self, transport_name: str) -> bool:
        """False when the connection to a peer made with ``connect_peer`` is known to be lost (a partition); the
        server then calls ``connect_peer`` again before the next transfer with it."""
        return True

    @abc.abstractmethod
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Prefill and decode here."""

    @abc.abstractmethod
    def add_remote(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, transfer_id: str,
                   peer_transport_name: str, timeout_s: float) -> bool:
        """Decode here; the prompt's KV comes under ``transfer_id`` from the prefill server whose transport
        (already connected with ``connect_peer``) is ``peer_transport_name``. False when there is no KV room now:
        nothing was allocated, the prefill side was told to drop the transfer, the server prefills it here."""

    @abc.abstractmethod
    def recompute(self, request_id: str, transfer_id: str) -> None:
        """The KV of remote request ``request_id`` will not come: prefill it here (policy ``recompute``)."""

    @abc.abstractmethod
    def add_prefill(self, request_id: str, transfer_id: str, router_request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, timeout_s: float) -> None:
        """Prefill here and stream the KV (and the first token) to the decode server of ``transfer_id``;
        ``params`` already ask for one token. Its end is reported as ``PrefillDone``."""

    def add_pulled(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, transfer_id: str,
                   owner_transport_name: str, num_blocks: int, timeout_s: float) -> bool:
        """Generate here, with the prompt's first ``num_blocks`` blocks pulled under ``transfer_id`` from the server
        whose transport (connected) is ``owner_transport_name``; the rest is prefilled here, and so is whatever
        the pull fails to bring (always: a pull only saves work). False when nothing is pulled (this server
        caches it, has no room, or cannot pull): the owner was told to drop it, the request runs as usual.
        Executors without pulls run it as ``add_request``."""
        self.add_request(request_id, prompt_token_ids, params)
        return False

    def add_pull_send(self, request_id: str, transfer_id: str, router_request_id: str, prefix_token_ids: list[int],
                      timeout_s: float) -> None:
        """Send the KV of ``prefix_token_ids`` (whole blocks cached here, device or host tier) under
        ``transfer_id`` to the server that asked; its end is reported as ``PullDone``. ``ValueError`` when this
        executor serves no pulls."""
        raise ValueError(f"a {type(self).__name__} serves no KV pulls")

    def fail_pull(self, request_id: str, transfer_id: str, reason: str) -> None:
        """The owner of the pull ``transfer_id`` is gone: stop waiting, compute those blocks here."""

    @abc.abstractmethod
    def abort(self, request_id: str, transfer_id: str | None) -> None:
        """Stop a request in any state and free what it holds (its transfer too, if any)."""

    @abc.abstractmethod
    def run_once(self) -> list[ExecutorEvent]:
        """One turn: move transfers, run at most one engine step; what happened, in order."""

    @abc.abstractmethod
    def load(self) -> Load: ...

    @abc.abstractmethod
    def fill_stats(self, stats: ServerStats) -> None:
        """Write the executor's counters and gauges into ``stats``."""

    @abc.abstractmethod
    def kv_events(self) -> list[KVEvent]:
        """Prefix-cache events since the last call, for the router's prefix index."""

    @abc.abstractmethod
    def idle(self) -> bool:
        """Nothing in flight: no request, no transfer (draining may end)."""

    def healthy(self) -> bool:
        """False once the engine cannot serve any more (the server then exits)."""
        return True

    def traces(self) -> dict[str, dict[str, float]]:
        """Per request id: stage -> unix time, from the executor's side (hand-off stages)."""
        return {}

    @abc.abstractmethod
    def close(self) -> None:
        """Release the engine, the transport and their processes. The executor is unusable afterwards."""
