"""``NativeExecutor``: Duet's own engine behind a server, with the KV hand-off in the same process.

One thread (the server's loop) drives everything: ``run_once`` runs at most one engine step, then advances
the hand-off (``transfer.handoff.Handoff``), whose transport the same thread polls.

- Prefill for a peer (``add_prefill``): the prompt joins the engine as a one-token request and its staging
  slab is reserved at once. In the step that computes its last chunk the scheduler's plan starts the packing
  (``_on_schedule``), and the model's layer hook gathers each layer into the slab and posts it as soon as the
  decode side's destination is known (``Handoff.pack_layer`` / ``progress``: transfer state only, no command
  handling). The sampled first token (and a seeded request's generator state) rides the last layer.
- Decode with remote KV (``add_remote``): the engine allocates the prompt's blocks now (prefix hits shrink
  what is sent) and the receive offers its slab to the prefill peer (``KVDest`` on the transport); arrived
  layers are scattered between steps; with every layer and the first token in, the request
  joins the running batch without recomputing anything.

- Pulls (``engine.server.native_pulls``): prompt prefixes cached here are sent to servers that asked, and
  requests admitted with a pull receive theirs, over the same hand-off.

Under model parallelism the engine's runner is rank 0's, which merges / splits the ranks' KV shards, so the
slabs on the wire hold the whole model's layout either way.
"""
from __future__ import annotations

import logging
import time

import torch

from duet.engine.config import EngineConfig
from duet.engine.kv_events import KVEvent
from duet.engine.llm_engine import LLMEngine
from duet.engine.loader import model_identity
from duet.engine.outputs import RequestOutput
from duet.engine.protocol import FinishReason, PrefillDone, ServerStats, TokenDelta, Tokens
from duet.engine.sampler import SampleResult
from duet.engine.sampling_params import SamplingParams
from duet.engine.server.executor import Executor, ExecutorEvent, ExecutorInfo, KVLost, Load, handoff_stats_into
from duet.engine.server.native_pulls import NativePulls, tier_stats_into
from duet.engine.server.server_config import ServerConfig
from duet.transfer.compat import KVLayout
from duet.transfer.factory import make_transport
from duet.transfer.handoff import Handoff
from duet.transfer.recv_transfer import RecvState
from duet.transfer.send_transfer import SendState
from duet.transfer.staging import StagingPool

logger = logging.getLogger(__name__)

# The wait between loop turns while only transfers are open: they progress only when polled.
TRANSFER_POLL_S = 100e-6
IDLE_WAIT_S = 0.02


def tokens_of(out: RequestOutput) -> Tokens:
    """The engine's output as the wire's ``Tokens`` (new tokens only)."""
    n = len(out.new_token_ids)
    logprobs = out.logprobs[-n:] if (out.logprobs and n) else None
    return Tokens(out.request_id, TokenDelta(
        out.new_token_ids, logprobs, out.finished, FinishReason.of(out.finish_reason),
        out.stop_reason if isinstance(out.stop_reason, int) else None, out.num_cached_tokens, error=out.error,
        prompt_logprobs=out.prompt_logprobs, prompt_token_ranks=out.prompt_token_ranks))


class NativeExecutor(Executor):
    def __init__(self, engine_config: EngineConfig, server: ServerConfig, engine_id: str):
        self.engine = LLMEngine(engine_config, load_tokenizer_=False)
        self.debug_layer_delay_s = server.debug_layer_delay_s
        self.debug_step_delay_s = server.debug_step_delay_s
        runner = self.engine.runner
        where = server.advertised
        transport = make_transport(server.kv_transport, engine_id, host=where.bind_host,
                                   advertise_host=where.advertise_host, keys=server.zmq_keys)
        staging = StagingPool(server.staging_bytes, runner.device)
        self.handoff = Handoff(transport, staging, runner, timeout_s=server.kv_timeout_s, faults=server.faults)
        self.pulls = NativePulls(self.engine, self.handoff)
        self._prefills: dict[str, str] = {}  # engine request id of a prefill for a peer -> its transfer id
        self.num_external_prompt_tokens = 0
        """Prompt tokens whose KV came from a prefill server (not computed, not a local prefix hit)."""
        self._generators: dict[str, torch.Generator] = {}  # transfer id -> seeded generator, this step only
        self._prompt_logprobs: dict[str, RequestOutput] = {}  # transfer id -> the prefill's output that scored them
        mc = self.engine.model_config
        wire = torch.empty(runner.slab_shape(0), dtype=runner.kv_dtype, device="meta")
        self.info = ExecutorInfo(
            layout=KVLayout.from_cache(model_identity(engine_config.model, mc.architecture), wire),
            transport_kind=transport.backend, transport_name=transport.name, transport_metadata=transport.metadata(),
            staging_region=self.handoff.region, max_model_len=self.engine.max_model_len, vocab_size=mc.vocab_size,
            num_total_blocks=self.engine.num_total_blocks, tensor_parallel_size=engine_config.tensor_parallel_size,
            pipeline_parallel_size=engine_config.pipeline_parallel_size)

    # ---- requests ---------------------------------------------------------------------------------------
    def connect_peer(self, transport_name: str, metadata: bytes) -> None:
        self.handoff.transport.connect(transport_name, metadata)

    def peer_connected(self, transport_name: str) -> bool:
        return self.handoff.transport.connected(transport_name)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.engine.add_request(request_id, prompt_token_ids, params)

    def add_remote(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, transfer_id: str,
                   peer_transport_name: str, timeout_s: float) -> bool:
        req = self.engine.add_remote_request(request_id, prompt_token_ids, params)
        if req is None:
            self.handoff.decline(transfer_id, peer_transport_name, "no KV room on the decode server")
            return False
        bs = self.engine.runner.block_size
        skip = req.num_computed_tokens // bs
        n = -(-req.num_prompt_tokens // bs) - skip
        ids = torch.tensor(req.block_ids[skip:skip + n], dtype=torch.int64, device=self.engine.runner.device)
        self.handoff.expect_recv(transfer_id, timeout_s)
        self.handoff.recv_blocks(transfer_id, request_id, ids, skip)
        self.handoff.peer_ready(transfer_id, peer_transport_name)
        return True

    def recompute(self, request_id: str, transfer_id: str) -> None:
        self.handoff.cancel_recv(transfer_id)
        self.engine.fail_remote_request(request_id)

    def add_prefill(self, request_id: str, transfer_id: str, router_request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, timeout_s: float) -> None:
        self.engine.add_request(request_id, prompt_token_ids, params)
        self._prefills[request_id] = transfer_id
        self.handoff.expect_send(transfer_id, router_request_id, timeout_s, local_id=request_id)
        self.handoff.reserve_send(transfer_id, -(-len(prompt_token_ids) // self.engine.runner.block_size))

    def add_pulled(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, transfer_id: str,
                   owner_transport_name: str, num_blocks: int, timeout_s: float) -> bool:
        return self.pulls.start(request_id, prompt_token_ids, params, transfer_id, owner_transport_name, num_blocks,
                                timeout_s)

    def add_pull_send(self, request_id: str, transfer_id: str, router_request_id: str, prefix_token_ids: list[int],
                      timeout_s: float) -> None:
        self.pulls.serve(request_id, transfer_id, router_request_id, prefix_token_ids, timeout_s)

    def fail_pull(self, request_id: str, transfer_id: str, reason: str) -> None:
        self.pulls.fail(transfer_id, reason)

    def abort(self, request_id: str, transfer_id: str | None) -> None:
        self.engine.abort_request(request_id)
        if transfer_id is not None:
            self.handoff.abort_send(transfer_id)
            self.handoff.cancel_recv(transfer_id)

    # ---- the loop ---------------------------------------------------------------------------------------
    def wait_s(self) -> float:
        if self.engine.has_runnable_work():
            return 0.0
        return TRANSFER_POLL_S if self.handoff.busy or self.engine.tier_busy else IDLE_WAIT_S

    def run_once(self) -> list[ExecutorEvent]:
        events: list[ExecutorEvent] = []
        self.engine.advance_tier()
        self.pulls.take_packed()
        if self.engine.has_runnable_work():
            outputs = self.engine.step(on_schedule=self._on_schedule)
            self.handoff.end_packing()
            for out in outputs:
                transfer_id = self._prefills.get(out.request_id)
                if transfer_id is None:
                    events.append(tokens_of(out))
                else:
                    self._prefill_output(transfer_id, out)
            self._generators.clear()
            if self.debug_step_delay_s:
                time.sleep(self.debug_step_delay_s)  # test hook: a slow model
        self.pulls.take_packed()
        ended = self.handoff.advance()
        for r in ended.recvs:
            if self.pulls.recv_ended(r):
                continue
            if r.state is RecvState.COMPLETE:
                req = self.engine.get_request(r.request_id)
                if req is not None:
                    self.num_external_prompt_tokens += req.num_prompt_tokens - req.num_cached_tokens
                first = r.first
                out = self.engine.complete_remote_request(
                    r.request_id, SampleResult(first.first_token, first.first_logprobs, first.first_generator_state))
                if out is not None:
                    events.append(tokens_of(out))
            elif not r.cancelled:
                events.append(KVLost(r.request_id, r.transfer_id, r.error or "KV transfer failed"))
        for s in ended.sends:
            pull_done = self.pulls.send_ended(s)
            if pull_done is not None:
                events.append(pull_done)
                continue
            if self._prefills.pop(s.local_id, None) is not None:
                self.engine.abort_request(s.local_id)  # a failed send's prompt may still be queued; no-op when done
            ok = s.state is SendState.DONE
            compute_s = max(0.0, s.first_token_at - s.admitted_at) if s.first_token_at else 0.0
            scored = self._prompt_logprobs.pop(s.transfer_id, None)
            events.append(PrefillDone(s.local_id, s.transfer_id, ok, s.error, compute_s, s.num_cached_tokens,
                                      s.num_bytes, prompt_logprobs=scored and scored.prompt_logprobs,
                                      prompt_token_ranks=scored and scored.prompt_token_ranks))
        return events

    def _on_schedule(self, sched):
        """The step's plan: start packing the prefills for peers whose prompt completes in it."""
        items = []
        for chunk in sched.chunks:
            transfer_id = self._prefills.get(chunk.request.request_id)
            if transfer_id is not None and chunk.samples:
                req = chunk.request
                ids = torch.tensor(req.block_ids, dtype=torch.int64, device=self.engine.runner.device)
                items.append((transfer_id, ids, req.num_cached_tokens))
                if req.generator is not None:
                    self._generators[transfer_id] = req.generator
        return self._layer_hook if self.handoff.begin_packing(items) else None

    def _layer_hook(self, layer: int) -> None:
        self.handoff.pack_layer(layer)
        self.handoff.progress()
        if self.debug_layer_delay_s > 0:
            # Test hook: a slow layer; keep driving transfers meanwhile, as a GPU-bound step would.
            until = time.monotonic() + self.debug_layer_delay_s
            while time.monotonic() < until:
                self.handoff.progress()
                time.sleep(0.002)

    def _prefill_output(self, transfer_id: str, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self._prompt_logprobs[transfer_id] = out
        if out.token_ids:
            generator = self._generators.get(transfer_id)
            state = None if generator is None else generator.get_state().numpy().tobytes()
            logprobs = out.logprobs[0] if out.logprobs else None
            self.handoff.first_token(transfer_id, out.token_ids[0], logprobs, state)
        elif out.finished:  # aborted before its first token: nothing will be sent
            self.handoff.abort_send(transfer_id, f"prefill ended ({out.finish_reason}) before its first token")

    # ---- observability ----------------------------------------------------------------------------------
    def load(self) -> Load:
        s, e = self.engine.scheduler, self.engine
        return Load(len(s.waiting), len(s.running), len(s.waiting_for_kv), e.num_free_blocks, e.num_total_blocks,
                    sum(r.num_tokens - r.num_computed_tokens for r in s.waiting),
                    sum(r.num_tokens for r in s.running))

    def fill_stats(self, stats: ServerStats) -> None:
        e, s, bm = self.engine, self.engine.scheduler, self.engine.block_manager
        stats.free_blocks, stats.total_blocks = e.num_free_blocks, e.num_total_blocks
        stats.waiting, stats.running, stats.waiting_for_kv = len(s.waiting), len(s.running), len(s.waiting_for_kv)
        stats.prompt_tokens_computed, stats.generated_tokens = e.num_prompt_tokens_computed, e.num_generated_tokens
        stats.prefix_hit_tokens, stats.preemptions = bm.stats.hit_tokens, s.num_preemptions
        stats.prefix_query_tokens, stats.cached_blocks = bm.stats.query_tokens, bm.num_cached_blocks
        stats.prompt_tokens_external = self.num_external_prompt_tokens
        stats.open_transfers = len(self.handoff.sends) + len(self.handoff.recvs)
        handoff_stats_into(stats, self.handoff.stats)
        tier_stats_into(stats, self.engine, self.pulls.stats)

    def kv_events(self) -> list[KVEvent]:
        events = self.engine.block_manager.drain_events()
        if self.engine.tier is not None:
            events += self.engine.tier.drain_events()
        return events

    def idle(self) -> bool:
        return not self.engine.has_unfinished_requests() and not self.handoff.busy and not self.engine.tier_busy

    def traces(self) -> dict[str, dict[str, float]]:
        return self.handoff.traces

    def close(self) -> None:
        if self.engine.tier is not None:
            self.engine.tier.close()  # copies in flight write into staging slabs and pools: let them end first
        self.handoff.close()
        self.engine.close()  # model-parallel worker processes exit with the server
