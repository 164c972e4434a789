"""The engine on the Triton attention backend (interpreted on CPU) gives the torch backend's tokens."""
from __future__ import annotations

from duet.engine import LLM, SamplingParams


def test_engine_triton_backend_matches_torch_backend(llama_dir):
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    # Two prompts of different lengths, the second spanning two blocks; 4 decode steps exercise the decode kernel.
    prompts = [[5, 6, 7, 8, 9], list(range(10, 30))]
    ref = LLM(llama_dir, show_progress=False, num_kv_blocks=16, attention_backend="torch").generate(prompts, params)
    llm = LLM(llama_dir, show_progress=False, num_kv_blocks=16, attention_backend="triton")
    assert llm.engine.runner.backend.name == "triton"
    out = llm.generate(prompts, params)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]
