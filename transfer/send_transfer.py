"""Prefill side of one KV hand-off: pack the prompt's KV layer by layer and WRITE it to the decode server.

Inputs arrive in any order: the prompt's admission (``reserve``: a staging slab for its blocks), the decode
side's ``KVDest`` (where to write; it may come first), the step that computes the prompt's last chunk
(``begin_packing``, then ``packed`` after each layer is gathered into the slab), the sampled first token
(which rides in the last layer's notification), or a failure (``fail``, or the decode side's ``KVCancel``).
``advance(now)`` applies them::

    state     leaves when                                                   to
    PENDING   reserve() found slab room                                     ADMITTED
              reserve() found none / fail() / deadline                      FAILED
    ADMITTED  begin_packing(): the step that completes the prompt starts    PACKING
              begin_pull(): the copy of cached blocks into the slab starts  PACKING
              fail() / deadline                                             FAILED
    PACKING   every layer and the first token posted (dest known)           POSTED
              pull: every layer posted once pull_packed() (dest known)      POSTED
              a WRITE could not be posted / fail() / deadline after the step FAILED
              pull: pull_packed(error), the copy failed                     FAILED
    POSTED    every WRITE reported DONE                                     DONE
              a WRITE reported ERROR / fail() / deadline                    FAILED

Layers are posted as soon as they are packed and the destination is known, so the WRITE of layer l overlaps
the compute of layer l+1; the last layer waits for the first token. While a step is writing into the slab
(``step_open``) nothing is released: a failure then takes effect when the step ends. On reaching DONE or
FAILED every handle is released and the slab freed, once (``released``); a failure also tells the decode
side at once (an error ``KVLayers``), so it falls back now rather than at its own deadline. A send cancelled
before its prompt was admitted here waits (until its deadline) for the prompt, so the failure reaches it.

A *pull* is a send from blocks this side caches already (its device pool or its host tier), for a server that
computes the rest of the prompt itself: no step computes it and there is no first token. ``begin_pull`` starts
the owner's copy of every layer of those blocks into the slab at once (off the step loop; the copy counts as
an open step, so nothing is released under it), ``pull_packed`` ends it, and every layer is then posted, the
last one with a notification that carries no token. Same states, same table, same failure paths.
"""
from __future__ import annotations

import enum
import random
from typing import TYPE_CHECKING

import torch

from duet.transfer.messages import KVDest, KVLayers
from duet.transfer.transfer_machine import TransferMachine, chain_table
from duet.transfer.transport import DONE, ERROR, TransferError, TransferHandle
from duet.transfer.wire import encode

if TYPE_CHECKING:
    from duet.transfer.handoff import Handoff


class SendState(enum.Enum):
    PENDING = "pending"
    ADMITTED = "admitted"
    PACKING = "packing"
    POSTED = "posted"
    DONE = "done"
    FAILED = "failed"


SEND_TRANSITIONS = chain_table([SendState.PENDING, SendState.ADMITTED, SendState.PACKING, SendState.POSTED,
                                SendState.DONE], SendState.FAILED)


# The stage each state is traced as (``Stats.traces``; stable names, tools read them).
SEND_TRACE = {SendState.ADMITTED: "send_admitted", SendState.PACKING: "send_packing", SendState.POSTED: "last_layer_sent",
              SendState.DONE: "transfer_done", SendState.FAILED: "transfer_failed"}


class SendTransfer(TransferMachine):
    TRANSITIONS = SEND_TRANSITIONS
    TRACE = SEND_TRACE

    def __init__(self, owner: Handoff, transfer_id: str, now: float, timeout_s: float):
        super().__init__(owner, transfer_id, SendState.PENDING, now, timeout_s)
        self.local_id = ""
        """The owner's id for the prompt this transfer packs (its engine request id)."""
        self.dest: KVDest | None = None
        self.block_ids: torch.Tensor | None = None  # [num_blocks] int64: the prompt's blocks in the local cache
        self.num_cached_tokens = 0
        self.layers_packed = 0
        self.layers_posted = 0
        self.last_notif: KVLayers | None = None
        """The last layer's notification, with the first token, once it was sampled."""
        self.handles: list[TransferHandle] = []
        self.step_open = False
        self.peer_cancelled = False
        """The decode side said it wants nothing (``KVCancel``): it is not told about the failure."""
        self.admitted_at = 0.0
        self.first_token_at = 0.0
        self.pull = False
        """A pull: cached blocks copied in by the owner, every layer at once, no first token."""

    # ---- inputs -----------------------------------------------------------------------------------------
    def reserve(self, num_blocks: int, now: float) -> None:
        """The prompt (``num_blocks`` blocks) was admitted here: take a staging slab for it."""
        self.admitted_at = now
        if self.error is not None:  # cancelled before its prompt arrived: admit nothing
            return
        if self.state is not SendState.PENDING:
            self.fail(f"transfer {self.transfer_id} admitted twice (state {self.state.value})")
            return
        if self._reserve_slab(num_blocks, "prefill"):
            self._to(SendState.ADMITTED)
        if self.dest is not None:
            self._check_dest()

    def set_dest(self, dest: KVDest) -> None:
        if self.dest is not None:
            self.owner.stats.duplicate_notifications += 1
            return
        self.dest = dest
        if self.slab is not None:
            self._check_dest()

    def begin_packing(self, block_ids: torch.Tensor, num_cached_tokens: int) -> None:
        """The step that completes the prompt starts. block_ids  # [num_blocks] int64 on the port's device"""
        if self.state is not SendState.ADMITTED or block_ids.numel() != self.slab.shape[2]:
            self.fail(f"transfer {self.transfer_id}: cannot pack {block_ids.numel()} blocks in state {self.state.value}")
            return
        self.block_ids, self.num_cached_tokens = block_ids, num_cached_tokens
        self.step_open = True
        self._to(SendState.PACKING)

    def begin_pull(self) -> None:
        """The owner starts copying the cached blocks into ``slab`` (every layer); ``pull_packed`` ends it."""
        if self.error is not None:
            return  # failing already: nothing may be copied in (the owner is told by begin_pull's None)
        if self.state is not SendState.ADMITTED:
            self.fail(f"transfer {self.transfer_id}: cannot start a pull in state {self.state.value}")
            return
        self.pull = True
        self.step_open = True
        self._to(SendState.PACKING)

    def pull_packed(self, error: str | None = None) -> None:
        """The copy into the slab ended: every layer is in it, or it failed with ``error``."""
        self.step_open = False
        if error is not None:
            self.fail(error)
            return
        num_layers = self.owner.port.num_layers
        self.packed(num_layers)
        self.last_notif = KVLayers(self.transfer_id, num_layers - 1, num_layers)

    def packed(self, num_layers: int) -> None:
        """Layers [0, num_layers) are in the slab."""
        self.layers_packed = max(self.layers_packed, num_layers)

    def end_step(self) -> None:
        self.step_open = False

    def set_first_token(self, token: int, logprobs: dict[int, float] | None, generator_state: bytes | None,
                        now: float) -> None:
        last = self.owner.port.num_layers - 1
        self.last_notif = KVLayers(self.transfer_id, last, last + 1, token, logprobs, generator_state)
        self.first_token_at = now

    # ---- the machine --------------------------------------------------------------------------------------
    def advance(self, now: float) -> bool:
        """Apply what arrived; True once the transfer reached DONE or FAILED and released its resources."""
        if self.released:
            return True
        if self.state is SendState.PACKING and self.error is None:
            self._post_ready()
        if self.state is SendState.POSTED and self.error is None:
            states = [self.owner.transport.poll(h) for h in self.handles]
            if ERROR in states:
                self.fail(next(h.error for h in self.handles if h.state == ERROR) or "KV write failed")
            elif all(s == DONE for s in states):
                self._to(SendState.DONE)
        if self.error is None and now > self.deadline and not self.step_open and self.state is not SendState.DONE:
            self.fail(f"transfer {self.transfer_id} timed out in state {self.state.value}")
        if self.error is not None and not self.admitted_at and now <= self.deadline:
            return False  # cancelled before its prompt arrived: wait, so the failure reaches the prompt's owner
        if self.error is not None and self.state is not SendState.FAILED:
            self._to(SendState.FAILED)
        if self.state in (SendState.DONE, SendState.FAILED) and not self.step_open:
            self._release()
            return True
        return False

    def advance_posting(self) -> None:
        """Mid-step: post the layers that are ready (no other transition, nothing released)."""
        if self.state is SendState.PACKING and self.error is None:
            self._post_ready()

    def poll_handles(self) -> None:
        """Drive posted WRITEs (mid-step: no transition, no release)."""
        for h in self.handles:
            self.owner.transport.poll(h)

    def ranges(self, layer: int) -> list[tuple[int, int, int]]:
        """(local offset, remote offset, bytes) of one layer: its K run and its V run past the blocks the
        decode side holds already (merged into one descriptor when they are adjacent on both sides)."""
        block_bytes = self.owner.port.block_bytes()
        num_local = self.slab.shape[2]
        skip, n = self.dest.num_skip_blocks, self.dest.num_blocks
        out: list[tuple[int, int, int]] = []
        for kv in range(2):
            local = self.offset + ((layer * 2 + kv) * num_local + skip) * block_bytes
            remote = self.dest.offset + (layer * 2 + kv) * n * block_bytes
            if out and out[-1][0] + out[-1][2] == local and out[-1][1] + out[-1][2] == remote:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + n * block_bytes)
            else:
                out.append((local, remote, n * block_bytes))
        return out

    # ---- internals ----------------------------------------------------------------------------------------
    def _check_dest(self) -> None:
        n = self.slab.shape[2]
        if self.dest.num_skip_blocks + self.dest.num_blocks != n:
            self.fail(f"decode asked for {self.dest.num_skip_blocks}+{self.dest.num_blocks} blocks of a {n}-block "
                      "prompt")

    def _post_ready(self) -> None:
        """Post every packed layer not posted yet; the last one only with the first token."""
        if self.dest is None:
            return
        num_layers = self.owner.port.num_layers
        limit = self.layers_packed if self.last_notif is not None else min(self.layers_packed, num_layers - 1)
        while self.layers_posted < limit and self.error is None:
            layer = self.layers_posted
            last = layer == num_layers - 1
            self._post(layer, self.last_notif if last else KVLayers(self.transfer_id, layer, layer + 1))
            self.layers_posted += 1
        if self.layers_posted == num_layers and self.error is None:
            self._to(SendState.POSTED)

    def _post(self, layer: int, notif: KVLayers) -> None:
        owner, dest = self.owner, self.dest
        ranges = self.ranges(layer) if dest.num_blocks else []
        try:
            if owner.faults.fail_write_p and random.random() < owner.faults.fail_write_p:
                raise TransferError("injected write failure (fail_write_p)")
            if ranges:
                self.handles.append(owner.transport.write_many(owner.staging_handle, dest.region, ranges, encode(notif)))
            else:  # the decode side caches the whole prompt: only the notification moves
                owner.transport.send_notif(dest.decode_transport_name, encode(notif))
        except (TransferError, ValueError) as e:
            self.fail(f"KV write to {dest.decode_transport_name} failed: {e}")
            return
        owner.stats.layer_sends += 1
        owner.stats.descriptors_sent += len(ranges)
        owner.stats.bytes_sent += sum(r[2] for r in ranges)
        owner.trace(self.request_id or self.transfer_id, f"layer_{layer}_sent")

    def _release(self) -> None:
        owner = self.owner
        for h in self.handles:
            owner.transport.release(h)
        self._free_slab(quarantine=False)
        self.released = True
        if self.state is SendState.DONE:
            owner.stats.transfers_sent += 1
            return
        owner.stats.transfers_failed_send += 1
        if self.dest is not None and not self.peer_cancelled:  # let the decode side fall back now, not at its deadline
            try:
                owner.transport.send_notif(self.dest.decode_transport_name,
                                           encode(KVLayers(self.transfer_id, 0, 0, error=self.error or "failed")))
            except TransferError:
                pass

    @property
    def num_bytes(self) -> int:
        return sum(h.nbytes for h in self.handles)

    def __repr__(self) -> str:
        return (f"SendTransfer({self.transfer_id!r}, {self.state.value}, packed={self.layers_packed}, "
                f"posted={self.layers_posted}, error={self.error!r})")

