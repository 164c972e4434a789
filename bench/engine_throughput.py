"""Offline batched generation throughput: prefill and decode tokens/s, with transformers as the baseline.

    python -m bench.engine_throughput [--model DIR] [--batch 1,4,16] [--prompt-len 128] [--output-len 32]

Without ``--model`` a tiny random Llama is generated. For each batch size: prefill tokens/s (all prompts,
one output token) and decode tokens/s (steady-state decode steps of the whole batch), for Duet's engine and,
in the same run, Hugging Face ``generate`` on the same prompts (greedy, KV cache on).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from duet.bench.report import add_record_arg, write_results
from duet.engine import LLM, SamplingParams


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def duet_throughput(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[float, float]:
    engine = llm.engine
    n_prompt = sum(len(p) for p in prompts)
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    prefill_s = time.perf_counter() - t0
    engine.block_manager.reset_prefix_cache()
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"d{i}", p, params)
    engine.step()  # prefill (all prompts fit one step's budget in this benchmark)
    steps, t0 = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    decode_s = time.perf_counter() - t0
    engine.block_manager.reset_prefix_cache()
    return n_prompt / prefill_s, len(prompts) * steps / decode_s


@torch.inference_mode()
def hf_throughput(hf, prompts: list[list[int]], output_len: int, pad_id: int) -> tuple[float, float]:
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    t0 = time.perf_counter()
    hf(ids, attention_mask=mask)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf.generate(ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                do_sample=False, pad_token_id=pad_id)
    total_s = time.perf_counter() - t0
    decode_s = max(total_s - prefill_s, 1e-9)
    return ids.numel() / prefill_s, len(prompts) * (output_len - 1) / decode_s


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--batch", default="1,4,16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--quick", action="store_true", help="batch 1,4; prompt 32; output 8")
    add_record_arg(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.prompt_len, args.output_len = "1,4", 32, 8
    model = args.model
    if model is None:
        from duet.engine.tools.make_tiny_model import make_tiny_model

        model = str(make_tiny_model("llama", Path(tempfile.mkdtemp()) / "llama", hidden_size=256,
                                    num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=512))
    batches = [int(b) for b in args.batch.split(",")]
    llm = LLM(model, show_progress=False, max_num_batched_tokens=max(batches) * args.prompt_len,
              max_num_seqs=max(batches))
    hf = None
    if not args.no_baseline:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=llm.engine.runner.dtype).eval()
        hf.to(llm.engine.runner.device)
    vocab = llm.engine.model_config.vocab_size
    duet_throughput(llm, _prompts(1, 8, vocab, 0), 2)  # warm-up
    rows = []
    for b in batches:
        prompts = _prompts(b, args.prompt_len, vocab, b)
        pf, dc = duet_throughput(llm, prompts, args.output_len)
        row = {"batch": b, "prompt_len": args.prompt_len, "output_len": args.output_len,
               "duet_prefill_tok_s": pf, "duet_decode_tok_s": dc}
        if hf is not None:
            hpf, hdc = hf_throughput(hf, prompts, args.output_len, llm.tokenizer.pad_token_id or 0)
            row.update(hf_prefill_tok_s=hpf, hf_decode_tok_s=hdc, decode_speedup_vs_hf=dc / hdc)
        rows.append(row)
    cols = list(rows[0].keys())

    def plot(ax):
        xs = [r["batch"] for r in rows]
        ax.plot(xs, [r["duet_decode_tok_s"] for r in rows], "o-", label="Duet decode")
        if hf is not None:
            ax.plot(xs, [r["hf_decode_tok_s"] for r in rows], "s--", label="transformers decode")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("tokens/s")
        ax.legend()

    mc = llm.engine.model_config
    write_results("engine_throughput", rows, cols, device=llm.engine.runner.device,
                  extra={"model": f"{mc.architecture} hidden={mc.hidden_size} layers={mc.num_layers}",
                         "dtype": str(llm.engine.runner.dtype), "torch_threads": torch.get_num_threads()},
                  plot=plot, record=args.record)


if __name__ == "__main__":
    main()
