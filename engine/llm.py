"""``LLM``: offline batched generation for embedding Duet in other programs.

    from duet.engine import LLM, SamplingParams
    llm = LLM(model="/path/to/hf-dir")
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=32, temperature=0))

With ``tensor_parallel_size`` / ``pipeline_parallel_size`` > 1 it starts worker processes: call ``close()``
(or use ``with LLM(...) as llm``) to stop them; interpreter exit stops them too.
"""
from __future__ import annotations

import itertools
from typing import Sequence

from duet.engine.config import EngineConfig
from duet.engine.llm_engine import LLMEngine
from duet.engine.outputs import RequestOutput
from duet.engine.sampling_params import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    def __init__(self, model: str, **config_kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, **config_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); results in prompt order.

        All prompts are validated before any is queued, so a bad one raises ``ValueError`` and runs nothing.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: got {len(params)} for {len(prompts)} prompts")
        engine = self.engine
        requests = []
        try:
            for prompt, p in zip(prompts, params):
                requests.append(engine.make_request(f"llm-{next(self._ids)}", prompt, p))
        except ValueError:
            for req in requests:
                engine.abort_request(req.request_id)
            engine.step()  # drain the abort outputs
            raise
        for req in requests:
            engine.scheduler.add(req)
        done: dict[str, RequestOutput] = {}
        while len(done) < len(requests):
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r.request_id] for r in requests]
