"""Worker side of Duet's vLLM connector: one thread that moves KV between vLLM's paged cache and Duet peers.

vLLM calls the connector's worker hooks from its model runner; the transport, the staging slabs and the
control socket to the ``--executor vllm`` server belong to the mover's own thread (a ``KVTransport`` is not
thread-safe, and transfers must progress while the engine idles). The model runner thread only packs:

- Prefill side: in ``save_kv_layer`` the runner gathers layer l's blocks of each request whose prompt
  completes in this step into that transfer's staging slab (Duet's gather op, the same slab layout a native
  server sends), then tells the thread "layer l packed". The thread posts one WRITE per layer as soon as the
  decode side's ``KVDest`` is known; the last layer waits for the first token, which the server forwards once
  vLLM sampled it, and rides in that layer's notification. The request's blocks are not held: the slab has
  the bytes (push model), so vLLM frees them when the request finishes.
- Decode side: when vLLM has allocated a request's blocks (``start_load_kv``), the thread reserves a slab,
  sends its ``KVDest`` (through the server, which holds the handshake with the prefill peer), scatters each
  arrived layer into vLLM's blocks and finally reports the request in ``finished_recving``; a failed or
  late transfer is reported in ``failed_recving`` too, and vLLM's load-failure policy (recompute or fail)
  takes over. Every receive is reported exactly once, an aborted one included: vLLM holds the blocks of an
  aborted request that waits for KV until then.

Pools: vLLM keeps one tensor per layer. ``pool_views`` shows its keys and its values each as a
``[1, 1, num_blocks, block_size, num_kv_heads, head_dim]`` view (strided where vLLM's blocks are head-major or
its keys transposed), so Duet's gather and scatter ops produce and consume exactly the wire slabs of
``transfer.kv_sender`` / ``transfer.kv_receiver``: a native server is a valid peer.
"""
from __future__ import annotations

import logging
import queue
import re
import threading
import time
from dataclasses import dataclass, field

import torch
import zmq

from kernels.kv_blocks import gather_kv_blocks, scatter_kv_blocks
from transfer.compat import KVLayout
from transfer.messages import Abort, KVDest, KVFailed, KVLayers, PrefillDone, Stats
from transfer.staging import StagingPool
from transfer.transport import DONE, ERROR, TransferError, TransferHandle
from transfer.vllm_control import STAT_NAMES, ConnectPeer, FirstToken, WorkerReady
from transfer.wire import ProtocolError, decode, encode

logger = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_order(names: list[str]) -> list[str]:
    """Layer names sorted by the layer index in them (``model.layers.12.self_attn.attn`` -> 12)."""
    def key(item: tuple[int, str]) -> tuple[int, int]:
        pos, name = item
        m = _LAYER_INDEX.search(name)
        return (int(m.group(1)) if m else pos, pos)

    return [name for _, name in sorted(enumerate(names), key=key)]


def pool_views(kv: torch.Tensor, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One vLLM layer cache as its keys and its values, each ``[1, 1, num_blocks, block_size, heads, head_dim]``
    (views, no copy), so that a slab layer ``[1, 2, n, block_size, heads, head_dim]`` is one gather of each.

    Known shapes: ``[2, num_blocks, block_size, heads, head_dim]`` (FlashAttention-style, contiguous), and vLLM's
    CPU attention ``[num_blocks, heads, block_size, 2 * head_dim]`` as its ``vec`` ISA fills it: per block and
    head, the keys as ``[head_dim, block_size]`` (transposed), then the values as ``[block_size, head_dim]``.
    """
    if kv.dim() == 5 and kv.shape[0] == 2 and kv.shape[3] == num_kv_heads and kv.shape[4] == head_dim:
        return kv[0:1].unsqueeze(0), kv[1:2].unsqueeze(0)
    if kv.dim() == 4 and kv.shape[1] == num_kv_heads and kv.shape[3] == 2 * head_dim and kv.is_contiguous():
        num_blocks, heads, block_size, _ = kv.shape
        size = (1, 1, num_blocks, block_size, heads, head_dim)
        block, head = heads * 2 * block_size * head_dim, 2 * block_size * head_dim
        keys = kv.as_strided(size, (0, 0, block, 1, head, block_size))
        values = kv.as_strided(size, (0, 0, block, head_dim, head, 1), kv.storage_offset() + block_size * head_dim)
        return keys, values
    raise ValueError(f"Duet's connector does not know vLLM KV caches of shape {tuple(kv.shape)} "
                     f"(num_kv_heads={num_kv_heads}, head_dim={head_dim})")


@dataclass
class SendSpec:
    """Prefill side: a request whose prompt completes in this step; send its KV under ``transfer_id``."""

    req_id: str
    transfer_id: str
    block_ids: list[int]
    """The prompt's blocks, in order (ceil(num_prompt_tokens / block_size) of them)."""
    num_cached_tokens: int = 0


@dataclass
class RecvSpec:
    """Decode side: KV of ``transfer_id`` goes into ``block_ids`` (the prompt's blocks after the cached ones)."""

    req_id: str
    transfer_id: str
    block_ids: list[int]
    num_skip_blocks: int


@dataclass
class _Send:
    spec: SendSpec
    offset: int
    nbytes: int
    slab: torch.Tensor  # [num_layers, 2, n, block_size, heads, head_dim] view of the staging buffer
    block_ids: torch.Tensor  # [n] int64, the prompt's blocks in vLLM's cache
    deadline: float = 0.0
    started_at: float = 0.0
    dest: KVDest | None = None
    first: FirstToken | None = None
    layers_packed: int = 0
    layers_posted: int = 0
    handles: list[TransferHandle] = field(default_factory=list)
    error: str | None = None


@dataclass
class _Recv:
    spec: RecvSpec
    offset: int
    nbytes: int
    slab: torch.Tensor  # [num_layers, 2, n, block_size, heads, head_dim]
    block_ids: torch.Tensor  # [n] int64, destination blocks
    deadline: float
    started_at: float
    layers_done: int = 0
    error: str | None = None


class KVMover:
    """Owns the transport; see the module docstring for who calls what from which thread."""

    def __init__(self, views: list[tuple[torch.Tensor, torch.Tensor]], layout: KVLayout, control_address: str, *,
                 transport_kind: str = "auto", host: str = "127.0.0.1", staging_bytes: int = 64 << 20,
                 timeout_s: float = 30.0, keys_dir: str | None = None, debug_layer_delay_s: float = 0.0,
                 start_timeout_s: float = 120.0):
        self.views = views  # per layer: (keys, values), each [1, 1, num_blocks, block_size, heads, head_dim]
        self.layout = layout
        self.num_layers = len(views)
        self.device = views[0][0].device
        self.dtype = views[0][0].dtype
        self.control_address = control_address
        self.transport_kind = transport_kind
        self.host = host
        self.staging_bytes = staging_bytes
        self.timeout_s = timeout_s
        self.keys_dir = keys_dir
        self.debug_layer_delay_s = debug_layer_delay_s  # test hook: layer l is posted l+1 delays after packing
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # the staging pool and the results below
        self._finished_recv: set[str] = set()
        self._failed_recv: set[str] = set()
        self._packing: list[_Send] = []  # model runner thread only: this step's sends
        self._sends: dict[str, _Send] = {}  # mover thread only, from here down
        self._recvs: dict[str, _Recv] = {}
        self._early: dict[str, list] = {}  # transfer id -> KVDest / FirstToken / Abort that came first
        self._early_at: dict[str, float] = {}
        self.stats: dict[str, float] = dict.fromkeys(STAT_NAMES, 0.0)
        self._stats_dirty = False
        self._stats_sent_at = 0.0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.staging: StagingPool | None = None
        self._thread = threading.Thread(target=self._run, name="duet-kv-mover", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout_s):
            raise TimeoutError(f"Duet KV mover did not start within {start_timeout_s}s")
        if self._error is not None:
            raise RuntimeError(f"Duet KV mover failed to start: {self._error}") from self._error

    # ---- model runner thread ------------------------------------------------------------------------
    def begin_sends(self, specs: list[SendSpec]) -> None:
        """This step completes these prompts: reserve their slabs (filled layer by layer in ``pack_layer``)."""
        self._packing = []
        for spec in specs:
            n = len(spec.block_ids)
            shape = (self.num_layers, 2, n, *self.views[0][0].shape[3:])
            nbytes = self.num_layers * 2 * n * self.layout.block_bytes
            with self._lock:
                offset = self.staging.alloc(nbytes)
            if offset is None:
                self._cmds.put(("send_failed", spec, f"prefill staging full ({nbytes} bytes needed)"))
                continue
            slab = self.staging.view(offset, nbytes, self.dtype, shape)
            s = _Send(spec, offset, nbytes, slab, torch.tensor(spec.block_ids, dtype=torch.int64, device=self.device))
            self._packing.append(s)
            self._cmds.put(("send", s))

    def pack_layer(self, layer: int) -> None:
        """Layer ``layer``'s KV is in vLLM's cache: gather it into each sending slab (Duet's gather op)."""
        if not self._packing:
            return
        for s in self._packing:
            for kv, view in enumerate(self.views[layer]):
                gather_kv_blocks(view, s.block_ids, 0, 1, out=s.slab[layer:layer + 1, kv:kv + 1])
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # the WRITE must see the finished gather
        for s in self._packing:
            self._cmds.put(("packed", s.spec.transfer_id, layer + 1))

    def end_step(self) -> None:
        self._packing = []

    def add_recvs(self, specs: list[RecvSpec], cancel_req_ids: list[str]) -> None:
        for spec in specs:
            self._cmds.put(("recv", spec))
        for req_id in cancel_req_ids:
            self._cmds.put(("cancel", req_id))

    def take_results(self) -> tuple[set[str], set[str]]:
        """(finished_recving, failed_recving) since the last call; failed ids are in both."""
        with self._lock:
            done, failed = self._finished_recv, self._failed_recv
            self._finished_recv, self._failed_recv = set(), set()
        return done, failed

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # ---- mover thread -------------------------------------------------------------------------------
    def _setup(self) -> None:
        from engine.security import load_keys, secure_client
        from transfer.factory import make_transport

        keys = load_keys(self.keys_dir) if self.keys_dir else None
        self.transport = make_transport(self.transport_kind, "vllm", host=self.host, keys=keys)
        self.staging = StagingPool(self.staging_bytes, self.device)
        self.staging_handle = self.transport.register(self.staging.buffer)
        self.region = self.transport.describe(self.staging_handle)
        self.ctx = zmq.Context.instance()
        self.control = self.ctx.socket(zmq.DEALER)
        self.control.setsockopt(zmq.LINGER, 0)
        secure_client(self.control, keys)
        self.control.connect(self.control_address)
        self._send_control(WorkerReady(self.transport.backend, self.transport.name, self.transport.metadata(),
                                       self.region, self.layout, int(self.views[0][0].shape[2])))

    def _run(self) -> None:
        try:
            self._setup()
        except Exception as e:  # noqa: BLE001 - reported to the constructor, which raises
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                self._drain_commands()
                self._drain_control()
                self._progress_sends()
                self._progress_recvs()
                self._report_stats()
                busy = bool(self._sends or self._recvs)
                # Transfers progress only when polled: stay close while any is open, nap otherwise.
                self.control.poll(0 if busy else 5)
                if busy:
                    time.sleep(200e-6)
        except Exception:
            logger.exception("Duet KV mover thread died")
        finally:
            self.transport.close()
            self.control.close(0)

    def _send_control(self, msg) -> None:
        try:
            self.control.send(encode(msg), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            logger.warning("control message %s dropped: %s", type(msg).__name__, e)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd, *args = self._cmds.get_nowait()
            except queue.Empty:
                return
            getattr(self, f"_cmd_{cmd}")(*args)

    def _drain_control(self) -> None:
        while True:
            try:
                raw = self.control.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(raw)
            except ProtocolError as e:
                logger.warning("bad control message: %s", e)
                continue
            if isinstance(msg, ConnectPeer):
                try:
                    self.transport.connect(msg.transport_name, msg.transport_metadata)
                except (TransferError, RuntimeError, ValueError) as e:
                    logger.error("cannot connect to KV peer %s: %s", msg.transport_name, e)
            elif isinstance(msg, KVFailed):
                r = next((r for r in self._recvs.values() if r.spec.transfer_id == msg.transfer_id), None)
                if r is not None:
                    r.error = msg.reason or "prefill server failed"
            elif isinstance(msg, (KVDest, FirstToken, Abort)):
                s = self._sends.get(msg.transfer_id)
                if s is None:
                    self._hold_early(msg)
                else:
                    self._apply(s, msg)

    # ---- sends ----
    def _hold_early(self, msg) -> None:
        """A message for a send the runner has not started: keep it, unless it ends the transfer."""
        early = self._early.setdefault(msg.transfer_id, [])
        self._early_at.setdefault(msg.transfer_id, time.monotonic())
        ends = isinstance(msg, Abort) or (isinstance(msg, FirstToken) and msg.error)
        dest = next((m for m in early if isinstance(m, KVDest)), msg if isinstance(msg, KVDest) else None)
        early.append(msg)
        if ends and dest is not None:  # the decode side waits: tell it now rather than at its deadline
            try:
                self.transport.send_notif(dest.decode_transport_name, encode(
                    KVLayers(msg.transfer_id, 0, 0, error=getattr(msg, "error", None) or "aborted")))
            except TransferError:
                pass

    def _cmd_send(self, s: _Send) -> None:
        s.started_at = time.monotonic()
        s.deadline = s.started_at + self.timeout_s
        self._sends[s.spec.transfer_id] = s
        self._early_at.pop(s.spec.transfer_id, None)
        for msg in self._early.pop(s.spec.transfer_id, []):
            self._apply(s, msg)

    def _cmd_send_failed(self, spec: SendSpec, reason: str) -> None:
        self.stats["kv_transfers_failed_send"] += 1
        self._send_control(PrefillDone("", spec.transfer_id, False, reason))

    def _cmd_packed(self, transfer_id: str, num_layers: int) -> None:
        s = self._sends.get(transfer_id)
        if s is not None:
            s.layers_packed = max(s.layers_packed, num_layers)
            self._flush(s)

    def _apply(self, s: _Send, msg) -> None:
        if isinstance(msg, KVDest):
            s.dest = msg
            if msg.num_skip_blocks + msg.num_blocks != s.slab.shape[2]:
                s.error = (f"decode asked for {msg.num_skip_blocks}+{msg.num_blocks} blocks of a "
                           f"{s.slab.shape[2]}-block prompt")
        elif isinstance(msg, FirstToken):
            s.first = msg
            if msg.error:
                s.error = msg.error
        elif isinstance(msg, Abort):
            s.error = s.error or "aborted"
        self._flush(s)

    def _ranges(self, s: _Send, layer: int) -> list[tuple[int, int, int]]:
        """(local offset, remote offset, bytes) of one layer: K and V past the blocks decode holds already."""
        n_local, bb = s.slab.shape[2], self.layout.block_bytes
        skip, n = s.dest.num_skip_blocks, s.dest.num_blocks
        out: list[tuple[int, int, int]] = []
        for kv in range(2):
            local = s.offset + ((layer * 2 + kv) * n_local + skip) * bb
            remote = s.dest.offset + (layer * 2 + kv) * n * bb
            if out and out[-1][0] + out[-1][2] == local and out[-1][1] + out[-1][2] == remote:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n * bb)
            else:
                out.append((local, remote, n * bb))
        return out

    def _flush(self, s: _Send) -> None:
        """Post every packed layer not posted yet; the last one only with the first token."""
        if s.dest is None or s.error is not None:
            return
        limit = s.layers_packed if (s.first is not None and s.first.token is not None) else \
            min(s.layers_packed, self.num_layers - 1)
        if self.debug_layer_delay_s:
            limit = min(limit, int((time.monotonic() - s.started_at) / self.debug_layer_delay_s))
        while s.layers_posted < limit:
            layer = s.layers_posted
            last = layer == self.num_layers - 1
            notif = KVLayers(s.spec.transfer_id, layer, layer + 1, s.first.token if last else None,
                             s.first.logprobs if last else None)
            ranges = self._ranges(s, layer) if s.dest.num_blocks else []
            try:
                if ranges:
                    h = self.transport.write_many(self.staging_handle, s.dest.region, ranges, encode(notif))
                    s.handles.append(h)
                else:  # decode caches the whole prompt already: only the notification moves
                    self.transport.send_notif(s.dest.decode_transport_name, encode(notif))
            except (TransferError, ValueError) as e:
                s.error = f"KV write to {s.dest.decode_engine_id} failed: {e}"
                return
            s.layers_posted += 1
            self.stats["kv_layer_sends"] += 1
            self.stats["kv_descriptors_sent"] += len(ranges)
            self.stats["kv_bytes_sent"] += sum(r[2] for r in ranges)
            self._stats_dirty = True

    def _progress_sends(self) -> None:
        now = time.monotonic()
        for tid, s in list(self._sends.items()):
            self._flush(s)
            states = [self.transport.poll(h) for h in s.handles]
            if ERROR in states and s.error is None:
                s.error = next(h.error for h in s.handles if h.state == ERROR) or "KV write failed"
            if s.error is None and s.layers_posted == self.num_layers and all(st == DONE for st in states):
                self._finish_send(s, ok=True)
            elif s.error is not None:
                self._finish_send(s, ok=False)
            elif now > s.deadline:
                s.error = f"transfer {tid} timed out ({s.layers_posted}/{self.num_layers} layers posted)"
                self._finish_send(s, ok=False)
        for tid, at in list(self._early_at.items()):  # messages for a send that never came
            if now - at > self.timeout_s:
                self._early.pop(tid, None)
                del self._early_at[tid]

    def _finish_send(self, s: _Send, ok: bool) -> None:
        del self._sends[s.spec.transfer_id]
        for h in s.handles:
            self.transport.release(h)
        with self._lock:
            self.staging.free(s.offset, s.nbytes)
        nbytes = sum(h.nbytes for h in s.handles)
        if ok:
            self.stats["kv_transfers_sent"] += 1
        else:
            self.stats["kv_transfers_failed_send"] += 1
            logger.warning("transfer %s failed: %s", s.spec.transfer_id, s.error)
            if s.dest is not None:
                try:  # let decode fall back now rather than at its deadline
                    self.transport.send_notif(s.dest.decode_transport_name, encode(
                        KVLayers(s.spec.transfer_id, 0, 0, error=s.error or "failed")))
                except TransferError:
                    pass
        self._stats_dirty = True
        self._report_stats(force=True)
        self._send_control(PrefillDone("", s.spec.transfer_id, ok, None if ok else s.error, 0.0,
                                       s.spec.num_cached_tokens, nbytes))

    # ---- receives ----
    def _cmd_recv(self, spec: RecvSpec) -> None:
        n = len(spec.block_ids)
        shape = (self.num_layers, 2, n, *self.views[0][0].shape[3:])
        nbytes = self.num_layers * 2 * n * self.layout.block_bytes
        with self._lock:
            offset = self.staging.alloc(nbytes) if n else None
        if offset is None:
            why = "decode staging full" if n else "nothing to receive"
            logger.warning("request %s: %s", spec.req_id, why)
            self._report_recv(spec.req_id, failed=bool(n))
            return
        now = time.monotonic()
        self._recvs[spec.transfer_id] = _Recv(
            spec, offset, nbytes, self.staging.view(offset, nbytes, self.dtype, shape),
            torch.tensor(spec.block_ids, dtype=torch.int64, device=self.device), now + self.timeout_s, now)
        self._send_control(KVDest("", spec.transfer_id, "", self.transport.name, self.region, offset,
                                  spec.num_skip_blocks, n))

    def _cmd_cancel(self, req_id: str) -> None:
        r = next((r for r in self._recvs.values() if r.spec.req_id == req_id), None)
        if r is not None:  # else already reported (completed or failed): report nothing twice
            self._drop_recv(r, quarantine=True)
            self.stats["kv_transfers_cancelled"] += 1
            self._report_recv(req_id, failed=False)

    def _progress_recvs(self) -> None:
        for peer, raw in self.transport.notifications():
            try:
                msg = decode(raw)
            except ProtocolError as e:
                logger.warning("bad notification from %s: %s", peer, e)
                continue
            r = self._recvs.get(msg.transfer_id) if isinstance(msg, KVLayers) else None
            if r is None:
                continue  # late notification of a cancelled or failed transfer
            if msg.error:
                r.error = msg.error
                continue
            for layer in range(msg.layer_start, msg.layer_end):
                for kv, view in enumerate(self.views[layer]):
                    scatter_kv_blocks(r.slab[layer:layer + 1, kv:kv + 1], r.block_ids, 0, 1, view)
            r.layers_done += msg.layer_end - msg.layer_start
            self.stats["kv_layers_received"] += msg.layer_end - msg.layer_start
            self.stats["kv_bytes_received"] += r.nbytes * (msg.layer_end - msg.layer_start) // self.num_layers
            self._stats_dirty = True
        now = time.monotonic()
        for tid, r in list(self._recvs.items()):
            if r.error is None and r.layers_done >= self.num_layers:
                if self.device.type == "cuda":
                    torch.cuda.current_stream().synchronize()
                self._drop_recv(r, quarantine=False)
                took = now - r.started_at
                self.stats["kv_transfers_received"] += 1
                self.stats["kv_transfer_seconds_sum"] += took
                self.stats["kv_transfer_seconds_max"] = max(self.stats["kv_transfer_seconds_max"], took)
                self._report_recv(r.spec.req_id, failed=False)
            elif r.error is not None or now > r.deadline:
                logger.warning("transfer %s failed: %s", tid, r.error or "KV did not arrive within the deadline")
                self._drop_recv(r, quarantine=True)
                self.stats["kv_transfers_failed"] += 1
                self._report_recv(r.spec.req_id, failed=True)

    def _drop_recv(self, r: _Recv, quarantine: bool) -> None:
        del self._recvs[r.spec.transfer_id]
        with self._lock:
            self.staging.free(r.offset, r.nbytes, quarantine=quarantine)

    def _report_recv(self, req_id: str, failed: bool) -> None:
        with self._lock:
            self._finished_recv.add(req_id)
            if failed:
                self._failed_recv.add(req_id)
        self._stats_dirty = True
        self._report_stats(force=True)

    def _report_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._stats_dirty and (force or now - self._stats_sent_at > 0.05):
            self._stats_dirty = False
            self._stats_sent_at = now
            self._send_control(Stats(0, self.transport.name, dict(self.stats)))
