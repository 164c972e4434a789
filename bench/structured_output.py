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

Two ratios to the baseline: of the median step times (``vs_unconstrained``) and of the best run's (``best_...``,
the one least disturbed by other processes on a shared host).

Without ``--record`` results go to ``bench/results/local/`` (git-ignored); ``--record`` writes
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

from bench.report import RESULTS_ROOT, write_results
from engine import EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
from engine.sampling_params import StructuredOutputsParams

SCHEMA = {
    "type": "array", "minItems": 400,
    "items": {"type": "object",
              "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                             "tag": {"enum": ["red", "green", "blue"]}},
              "required": ["id", "tag"], "additionalProperties": False},
}
TEKKEN = "mistral_common/data/tekken_240911.json"


def make_model(vocab: str, root: Path) -> str:
    from engine.tools.make_tiny_model import make_tiny_model

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


def decode_rate(engine: LLMEngine, batch: int, steps: int, structured: bool, overlap: bool) -> float:
    """Median wall time (s) of a steady-state decode step of ``batch`` greedy requests (prefill and the first
    step excluded). The median of many steps shrugs off bursts of load from other processes on the host."""
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
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        outputs = engine.step()
        times.append(time.perf_counter() - t0)
        assert sum(len(o.new_token_ids) for o in outputs) == batch
    for i in range(batch):
        engine.abort_request(f"r{i}")
    while engine.has_unfinished_requests():
        engine.step()
    engine.block_manager.reset_prefix_cache()
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--vocab", default="tiny,tekken")
    ap.add_argument("--repeats", type=int, default=7, help="runs per mode, interleaved")
    ap.add_argument("--record", action="store_true", help="write bench/results/<device>/ (tracked)")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="duet-bench-so-"))
    rows = []
    for vocab in args.vocab.split(","):
        model = make_model(vocab, root)
        engine = LLMEngine(EngineConfig(model=model, show_progress=False, max_num_seqs=args.batch,
                                        max_num_batched_tokens=args.batch * 32, num_kv_blocks=512,
                                        max_model_len=1024))
        decode_rate(engine, args.batch, 4, True, True)  # warm-up: tokenizer table, grammar cache, kernels
        modes = {"unconstrained": (False, True), "json_schema": (True, True), "json_schema_inline": (True, False)}
        step_s: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits every mode alike
            for mode, (structured, overlap) in modes.items():
                step_s[mode].append(decode_rate(engine, args.batch, args.steps, structured, overlap))
        base, base_best = statistics.median(step_s["unconstrained"]), min(step_s["unconstrained"])
        for mode in modes:
            median, best = statistics.median(step_s[mode]), min(step_s[mode])
            rows.append({"vocab": vocab, "vocab_size": engine.model_config.vocab_size, "batch": args.batch,
                         "mode": mode, "step_ms": 1e3 * median, "best_step_ms": 1e3 * best,
                         "decode_tok_s": args.batch / median, "vs_unconstrained": base / median,
                         "best_vs_unconstrained": base_best / best})
        engine.close()
    cols = list(rows[0].keys())
    extra = {"model": "llama hidden=128 layers=4 (random weights)", "torch_threads": torch.get_num_threads(),
             "schema": json.dumps(SCHEMA), "steps": args.steps, "repeats": args.repeats}
    out_dir = None if args.record else RESULTS_ROOT / "local"
    write_results("structured_output", rows, cols, extra=extra, out_dir=out_dir)


if __name__ == "__main__":
    main()
