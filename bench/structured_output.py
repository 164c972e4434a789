"""Decode throughput with and without structured outputs, same engine, same run.

    python -m bench.structured_output [--batch 16] [--steps 64] [--vocab tiny,tekken] [--record]

For each vocabulary, one engine decodes ``batch`` requests greedily for ``steps`` steady-state steps, three ways
(each run ``repeats`` times, interleaved; reported: the median of the runs' median step times):
``unconstrained`` (the baseline: argmax fast path), ``json_schema`` (every request under a JSON schema, masks
filled on the mask thread while the forward runs: what Duet does) and ``json_schema_inline`` (masks filled
before the forward, on the engine thread: what overlapping saves). The schema is an array of at least 400
``{"id": 0..999, "tag": enum}`` objects, so no request can finish early and every step needs a real mask
(object keys, integers, enums, separators).

Vocabularies: ``tiny`` is the test checkpoint's 512-token BPE; ``tekken`` is Mistral's 131k-token Tekken
tokenizer shipped inside the ``mistral_common`` package (a real production vocabulary, so the mask work is
realistic), on a random model of the same small shape with a 131072-row embedding and LM head.

Reported per mode: the engine thread's CPU time per step (``step_cpu_ms``; with ``--torch-threads 1``, the
default, the forward runs on that thread, so this is the step's critical path: what a step would take on an
idle host with a core to spare for the mask thread, as long as the mask work (``mask_fill_cpu_ms``, on the mask
thread) is shorter than the forward) and its wall time; each as a ratio to the baseline. On a shared host the
wall times carry other processes' load; the CPU times do not.

Without ``--record`` results go to ``bench/runs/`` (git-ignored); ``--record`` writes
``bench/results/<device>/structured_output.*``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from duet.bench.report import write_results
from duet.engine import EngineConfig, SamplingParams
from duet.engine.llm_engine import LLMEngine
from duet.engine.sampling_params import StructuredOutputsParams

SCHEMA = {
    "type": "array", "minItems": 400,
    "items": {"type": "object",
              "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                             "tag": {"enum": ["red", "green", "blue"]}},
              "required": ["id", "tag"], "additionalProperties": False},
}
TEKKEN = "mistral_common/data/tekken_240911.json"


def make_model(vocab: str, root: Path) -> str:
    from duet.engine.tools.make_tiny_model import make_tiny_model

    shape = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256)
    if vocab == "tiny":
        return str(make_tiny_model("llama", root / "tiny", **shape))
    import importlib.util

    from transformers.integrations.mistral import convert_tekken_tokenizer

    spec = importlib.util.find_spec("mistral_common")
    if spec is None:
        raise SystemExit("--vocab tekken needs the mistral_common package (installed with vLLM)")
    tekken = Path(spec.submodule_search_locations[0]).parent / TEKKEN
    path = make_tiny_model("llama", root / "tekken", vocab_size=131072, **shape)
    tokenizer = convert_tekken_tokenizer(str(tekken))
    tokenizer.save_pretrained(str(path))
    config = json.loads((path / "config.json").read_text())
    config.update(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return str(path)


def decode_rate(engine: LLMEngine, batch: int, steps: int, structured: bool,
                overlap: bool) -> tuple[float, float, float]:
    """(median wall s, median engine-thread CPU s, mean mask-filling CPU s) of a steady-state decode step of ``batch`` greedy requests
    (prefill and the first step excluded). Medians over many steps shrug off bursts of load from other
    processes; the engine thread's CPU time (``time.thread_time``) does not count time the thread waited for
    a core, so it measures the step's critical-path work even on a busy host."""
    engine.runner.masks.overlap = overlap
    so = StructuredOutputsParams(json=json.dumps(SCHEMA)) if structured else None
    params = SamplingParams(max_tokens=steps + 64, temperature=0, ignore_eos=True, structured_outputs=so)
    vocab = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    for i in range(batch):
        engine.add_request(f"r{i}", torch.randint(10, min(vocab, 500), (32,), generator=g).tolist(), params)
    while any(len(r.output_token_ids) < 1 for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # grammars compile, prompts prefill
    engine.step()
    wall, cpu = [], []
    fill_s = engine.runner.masks.fill_cpu_s
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        outputs = engine.step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
        assert sum(len(o.new_token_ids) for o in outputs) == batch
    fill_s = (engine.runner.masks.fill_cpu_s - fill_s) / steps
    for i in range(batch):
        engine.abort_request(f"r{i}")
    while engine.has_unfinished_requests():
        engine.step()
    engine.block_manager.reset_prefix_cache()
    return statistics.median(wall), statistics.median(cpu), fill_s


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--vocab", default="tiny,tekken")
    ap.add_argument("--repeats", type=int, default=7, help="runs per mode, interleaved")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--record", action="store_true", help="write bench/results/<device>/ (tracked)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    root = Path(tempfile.mkdtemp(prefix="duet-bench-so-"))
    rows = []
    for vocab in args.vocab.split(","):
        model = make_model(vocab, root)
        engine = LLMEngine(EngineConfig(model=model, show_progress=False, max_num_seqs=args.batch,
                                        max_num_batched_tokens=args.batch * 32, num_kv_blocks=512,
                                        max_model_len=1024))
        decode_rate(engine, args.batch, 4, True, True)  # warm-up: tokenizer table, grammar cache, kernels
        modes = {"unconstrained": (False, True), "json_schema": (True, True), "json_schema_inline": (True, False)}
        runs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits every mode alike
            for mode, (structured, overlap) in modes.items():
                runs[mode].append(decode_rate(engine, args.batch, args.steps, structured, overlap))
        base_wall = statistics.median(r[0] for r in runs["unconstrained"])
        base_cpu = statistics.median(r[1] for r in runs["unconstrained"])
        for mode in modes:
            wall = statistics.median(r[0] for r in runs[mode])
            cpu = statistics.median(r[1] for r in runs[mode])
            fill = statistics.median(r[2] for r in runs[mode])
            rows.append({"vocab": vocab, "vocab_size": engine.model_config.vocab_size, "batch": args.batch,
                         "mode": mode, "step_cpu_ms": 1e3 * cpu, "cpu_tok_s": args.batch / cpu,
                         "cpu_vs_unconstrained": base_cpu / cpu, "mask_fill_cpu_ms": 1e3 * fill,
                         "step_wall_ms": 1e3 * wall, "wall_vs_unconstrained": base_wall / wall})
        engine.close()
    cols = list(rows[0].keys())
    extra = {"model": "llama hidden=128 layers=4 (random weights)", "torch_threads": torch.get_num_threads(),
             "schema": json.dumps(SCHEMA), "steps": args.steps, "repeats": args.repeats}
    write_results("structured_output", rows, cols, extra=extra, record=args.record)


if __name__ == "__main__":
    main()
