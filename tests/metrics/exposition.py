"""Reading expositions with prometheus_client's own parser, and vLLM 0.32's recorded one as the reference.

``data/vllm_exposition.txt`` is what ``vllm.entrypoints.openai.api_server`` served for a tiny Llama
(``record_vllm_exposition.py`` wrote it; re-run that when the pinned vLLM changes).
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from duet.engine.protocol import ServerStats

VLLM_FIXTURE = Path(__file__).resolve().parent / "data" / "vllm_exposition.txt"
_NOT_LABELS = {"le", "quantile"}

# What each Duet endpoint exposes under vLLM's names (engine-level ones come from server stats).
VLLM_ENGINE_FAMILIES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                        "vllm:prefix_cache_hits", "vllm:num_preemptions", "vllm:prompt_tokens",
                        "vllm:prompt_tokens_by_source", "vllm:prompt_tokens_cached", "vllm:generation_tokens")
VLLM_REQUEST_FAMILIES = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                         "vllm:request_time_per_output_token_seconds", "vllm:e2e_request_latency_seconds",
                         "vllm:request_queue_time_seconds", "vllm:request_inference_time_seconds",
                         "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
                         "vllm:request_prompt_tokens", "vllm:request_generation_tokens",
                         "vllm:request_max_num_generation_tokens", "vllm:request_params_n",
                         "vllm:request_params_max_tokens", "vllm:request_success")

# Every key a server reports (ServerStats), with values; plus the colocated server's two extra keys.
SERVER_STATS = {
    **dataclasses.asdict(ServerStats(
        free_blocks=48, total_blocks=64, waiting=2, running=3, waiting_for_kv=1, open_requests=6, open_transfers=1,
        prompt_tokens_computed=100, prompt_tokens_external=30, generated_tokens=40, prefix_hit_tokens=16,
        preemptions=1, kv_bytes_sent=4096, kv_descriptors_sent=8, kv_layer_sends=4, kv_transfers_sent=2,
        kv_bytes_received=2048, kv_layers_received=4, kv_transfers_received=2, kv_transfers_failed=1,
        kv_transfer_seconds_sum=0.5, kv_transfer_seconds_max=0.3, kv_fallbacks=1, kv_events_published=7)),
    "prefix_query_tokens": 146, "cached_blocks": 5,
}


def parse(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """Family name -> (type, label names of its samples). Raises if a family's samples disagree on their
    label names or a family name repeats (both invalid in one exposition)."""
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name in out:
            raise AssertionError(f"family {fam.name} appears twice")
        label_sets = {frozenset(s.labels) - _NOT_LABELS for s in fam.samples}
        if len(label_sets) > 1:
            raise AssertionError(f"{fam.name}: samples with different label names {label_sets}")
        out[fam.name] = (fam.type, next(iter(label_sets), frozenset()))
    return out


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample named ``name`` (full sample name: ``x_total``, ``x_count``, ...)."""
    return [(dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name]


@functools.cache
def vllm_reference() -> dict[str, tuple[str, frozenset[str]]]:
    """vLLM's own families (``vllm:*``, without the ``_created`` companions)."""
    fams = parse(VLLM_FIXTURE.read_text())
    return {n: v for n, v in fams.items() if n.startswith("vllm:") and not n.endswith("_created")}


def check_vllm_families(text: str, required: tuple[str, ...]) -> dict[str, tuple[str, frozenset[str]]]:
    """Every ``vllm:*`` family in ``text`` has vLLM's type and label names; every ``required`` one exists."""
    fams = parse(text)
    ref = vllm_reference()
    ours = {n: v for n, v in fams.items() if n.startswith("vllm:") and not n.endswith("_created")}
    assert set(required) <= set(ours), f"missing vLLM families: {sorted(set(required) - set(ours))}"
    for name, (kind, labels) in ours.items():
        assert name in ref, f"{name}: not a name vLLM 0.32 exposes"
        assert (kind, labels) == ref[name], f"{name}: Duet {kind} {sorted(labels)}, vLLM {ref[name][0]} " \
                                            f"{sorted(ref[name][1])}"
    return fams
