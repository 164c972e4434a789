"""Decode CUDA graphs (engine/cuda_graphs.py) and dummy weights (load_format="dummy").

The graph tests run only with a GPU: replayed decode steps must give the eager engine's tokens, for batch
sizes that fall between captured sizes (padding) and across block boundaries.
"""
from __future__ import annotations

import pytest
import torch

from duet.engine import LLM, SamplingParams
from duet.engine.cuda_graphs import capture_sizes
from duet.engine.tools.make_tiny_model import make_tiny_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_capture_sizes_cover_every_batch_up_to_the_maximum():
    for max_batch in (1, 3, 8, 17, 256):
        sizes = capture_sizes(max_batch)
        assert sizes == sorted(set(sizes)) and sizes[-1] == max_batch
        assert all(any(s >= n for s in sizes) for n in range(1, max_batch + 1))
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    with pytest.raises(ValueError, match="max_batch"):
        capture_sizes(0)


def test_graphs_are_off_on_cpu(llama_dir):
    llm = LLM(llama_dir, show_progress=False, num_kv_blocks=16, device="cpu")
    assert llm.engine.runner.graphs is None


def test_dummy_weights_need_no_checkpoint(tmp_path):
    model = make_tiny_model("qwen3", tmp_path / "m", hidden_size=64, num_layers=2, weights=False)
    assert not list(model.glob("*.safetensors"))
    llm = LLM(str(model), load_format="dummy", show_progress=False, num_kv_blocks=16, device="cpu")
    params = dict(llm.engine.runner.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    assert all((p == 1).all() for n, p in params.items() if n.endswith("norm.weight"))
    assert params["model.layers.0.mlp.up_proj.weight"].std() > 0.005
    [out] = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 3
    with pytest.raises(FileNotFoundError, match="no weights"):  # the default format still needs them
        LLM(str(model), show_progress=False, num_kv_blocks=16, device="cpu")


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_decode_matches_eager(llama_dir, dtype):
    # 5 and 11 prompts: padded to captured sizes 8 and 16; prompt lengths cross 16-token blocks while decoding.
    prompts = [[5 + (i * 7 + j) % 200 for j in range(3 + 5 * i)] for i in range(11)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    eager = LLM(llama_dir, show_progress=False, num_kv_blocks=128, dtype=dtype, cuda_graphs=False, max_num_seqs=16)
    assert eager.engine.runner.graphs is None
    graphs = LLM(llama_dir, show_progress=False, num_kv_blocks=128, dtype=dtype, max_num_seqs=16)
    assert graphs.engine.runner.graphs is not None
    replays = 0
    inner = graphs.engine.runner.graphs.run

    def counting_run(*args):
        nonlocal replays
        replays += 1
        return inner(*args)

    graphs.engine.runner.graphs.run = counting_run
    for batch in (prompts[:5], prompts):
        ref = eager.generate(batch, params)
        out = graphs.generate(batch, params)
        assert [o.token_ids for o in out] == [r.token_ids for r in ref]
    assert replays >= 2 * 20  # the decode steps of both batches went through the graphs
    assert graphs.engine.num_free_blocks == graphs.engine.num_total_blocks
