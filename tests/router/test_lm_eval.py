"""lm-evaluation-harness against Duet, colocated and disaggregated (prefill + decode + router): ``local-completions``
(echo + logprobs over HTTP) gives the same per-item log-likelihoods as lm-eval's own ``hf`` backend on the same
tiny checkpoint. Disaggregated, the prompt is scored by the prefill server and the decode server computes none.

Two local tasks (YAML + JSONL written here; nothing comes from the Hugging Face hub): a ``loglikelihood`` task
(context -> continuation) and a ``multiple_choice`` task (question -> one of four answers). Both backends
prepend BOS (``add_bos_token=True``), so they score the same token sequences. Skipped when lm_eval is not
installed (``pip install -e .[test]`` installs it).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import pytest

lm_eval = pytest.importorskip("lm_eval")

from duet.engine.launcher import ServerProcess, query_server
from duet.engine.protocol import StatsRequest

pytestmark = pytest.mark.timeout(900)

SERVED = "tiny"
LOGLIK_DOCS = [
    {"context": "The quick brown fox", "continuation": " jumps over the lazy dog"},
    {"context": "Once upon a time", "continuation": " there was a king"},
    {"context": "1 2 3 4", "continuation": " 5 6 7"},
    {"context": "Paris is the capital of", "continuation": " France"},
    {"context": "Hello", "continuation": ", world!"},
]
MC_DOCS = [
    {"question": "The sky is", "choices": [" blue", " green", " loud", " heavy"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " five", " a fish", " seven"], "answer": 0},
    {"question": "Cats like to", "choices": [" sleep", " fly", " compile code", " melt"], "answer": 0},
]


def write_tasks(root) -> None:
    (root / "loglik.jsonl").write_text("".join(json.dumps(d) + "\n" for d in LOGLIK_DOCS))
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (root / "duet_loglik.yaml").write_text(f"""task: duet_loglik
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'loglik.jsonl'}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: acc
""")
    (root / "duet_mc.yaml").write_text(f"""task: duet_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")


def per_item(results: dict, task: str) -> list[list[float]]:
    """Each doc's log-likelihoods (one per request: one for loglikelihood, one per choice for multiple_choice)."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in s["resps"]]
            for s in samples]


TASKS = ["duet_loglik", "duet_mc"]


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """lm-eval offline, with this module's task folder; the environment restored afterwards."""
    root = tmp_path_factory.mktemp("lm_eval")
    write_tasks(root)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "datasets"),
           "OPENAI_API_KEY": "unused"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield root
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def hf_results(offline, llama_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model="hf", tasks=TASKS, task_manager=TaskManager(include_path=str(offline)),
                           log_samples=True, batch_size=1,
                           model_args=f"pretrained={llama_dir},dtype=float32,device=cpu,add_bos_token=True")


@pytest.fixture(scope="module", params=["colocated", "disaggregated"])
def duet(request, llama_dir):
    """(base URL, the decode server or None)."""
    limits = ("--max-model-len", "512")
    if request.param == "colocated":
        procs = [ServerProcess("serve", llama_dir, "--role", "both", "--served-model-name", SERVED, *limits)]
        decode = None
    else:
        p = ServerProcess("prefill", llama_dir, "--kv-transport", "zmq", *limits)
        decode = ServerProcess("decode", llama_dir, "--kv-transport", "zmq", *limits)
        procs = [ServerProcess("router", llama_dir, "--prefill", p.address, "--decode", decode.address,
                               "--served-model-name", SERVED, "--disagg-threshold-tokens", "0"), p, decode]
    try:
        procs[0].wait_ready(180)
        yield procs[0].url, decode
    finally:
        for proc in procs:
            proc.stop(60)  # lm-eval keeps connections alive: a graceful shutdown waits for them


def test_local_completions_matches_hf_backend(duet, hf_results, offline, llama_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    url, decode = duet
    before = stats(decode) if decode is not None else None
    results = simple_evaluate(
        model="local-completions", tasks=TASKS, task_manager=TaskManager(include_path=str(offline)), log_samples=True,
        model_args=f"model={SERVED},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                   f"tokenizer={llama_dir},add_bos_token=True,num_concurrent=2,max_retries=1,tokenized_requests=True")
    for task, docs in (("duet_loglik", LOGLIK_DOCS), ("duet_mc", MC_DOCS)):
        got, want = per_item(results, task), per_item(hf_results, task)
        assert len(got) == len(want) == len(docs)
        for g, w in zip(got, want):
            assert len(g) == len(w)
            assert all(abs(a - b) < 1e-3 for a, b in zip(g, w)), (task, g, w)
        assert any(v < -1.0 for item in got for v in item)  # real scores, not zeros
        assert results["results"][task]["acc,none"] == hf_results["results"][task]["acc,none"]
    if decode is not None:  # the prompts were scored on the prefill server
        after = stats(decode)
        assert after["prompt_tokens_computed"] == before["prompt_tokens_computed"]


def stats(proc: ServerProcess) -> dict:
    [reply] = query_server(proc.address, [StatsRequest(1)], 1, timeout_s=30)
    return asdict(reply.values)
