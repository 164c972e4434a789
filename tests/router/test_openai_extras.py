"""Echo + prompt logprobs, structured outputs, tools, logit_bias and best_of through a real colocated server
(``python -m engine.serve --role both``) driven by the real ``openai`` client; Hugging Face transformers and
``jsonschema`` are the references.

The checkpoint is the tiny random llama with a Hermes-style chat template (tools in a system block,
``<tool_call>`` JSON for assistant calls, ``<tool_response>`` for tool results), the format Qwen models use.
"""
from __future__ import annotations

import json
import shutil

import openai
import pytest
import torch
import transformers

from duet.engine.launcher import ServerProcess
from tests.router.structured_checks import (
    WEATHER_TOOLS,
    check_json_schema_requests,
    check_required_tool_call,
    check_required_tool_call_streamed,
)

pytestmark = pytest.mark.timeout(600)

MODEL = "tiny"
HERMES_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "</tools>\nCall a function as <tool_call>\n{\"name\": <name>, \"arguments\": <args>}\n</tool_call><|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{% elif m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}<tool_call>\n"
    "{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hermes") / "tiny-hermes"
    shutil.copytree(tiny_model("llama"), path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = HERMES_TEMPLATE
    config_path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def server(model_dir):
    proc = ServerProcess("serve", model_dir, "--role", "both", "--served-model-name", MODEL, "--num-kv-blocks",
                         "512", "--max-model-len", "1024")
    try:
        proc.wait_ready(180)
        yield proc
    finally:
        proc.stop(60)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def hf(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)

    def logprobs(ids: list[int]) -> torch.Tensor:  # [len(ids), vocab]
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return tokenizer, logprobs


PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.mark.parametrize("max_tokens", [0, 1, 3])
def test_echo_logprobs_score_the_prompt_like_transformers(client, hf, max_tokens):
    tokenizer, logprobs = hf
    ids = tokenizer.encode(PROMPT)
    ref = logprobs(ids)
    r = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=max_tokens,
                                  temperature=0)
    c = r.choices[0]
    lp = c.logprobs
    n = len(ids) + max_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens[:len(ids)] == [tokenizer.decode([t]) for t in ids]
    for pos in range(1, len(ids)):
        assert abs(lp.token_logprobs[pos] - ref[pos - 1, ids[pos]].item()) < 1e-3
        # OpenAI's shape: token text -> logprob of the prompt token and the top 2 (texts can collide: the
        # later entry wins, as in vLLM).
        values, top_ids = torch.topk(ref[pos - 1], 2)
        expected = {tokenizer.decode([ids[pos]]): ref[pos - 1, ids[pos]].item()}
        expected.update({tokenizer.decode([t]): v for t, v in zip(top_ids.tolist(), values.tolist())})
        got = lp.top_logprobs[pos]
        assert got.keys() == expected.keys() and all(abs(got[k] - expected[k]) < 1e-3 for k in got)
    assert c.text.startswith(PROMPT)
    assert lp.text_offset == sorted(lp.text_offset)
    if max_tokens == 0:
        assert c.text == PROMPT and c.finish_reason == "length" and r.usage.completion_tokens == 0
    else:
        assert r.usage.completion_tokens == max_tokens
        assert all(v is not None for v in lp.token_logprobs[len(ids):])


def test_echo_with_token_prompts_and_streaming(client, hf):
    tokenizer, _ = hf
    ids = tokenizer.encode(PROMPT)
    whole = client.completions.create(model=MODEL, prompt=[ids], echo=True, logprobs=1, max_tokens=4,
                                      temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=[ids], echo=True, logprobs=1, max_tokens=4,
                                            temperature=0, stream=True))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    tokens = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert text == whole.choices[0].text and text.startswith(tokenizer.decode(ids))
    assert tokens == whole.choices[0].logprobs.tokens


def test_prompt_logprobs_extra_field(client, hf):
    tokenizer, logprobs = hf
    ids = tokenizer.encode(PROMPT)
    ref = logprobs(ids)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0,
                                  extra_body={"prompt_logprobs": 2})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for pos in range(1, len(ids)):
        entry = plp[pos][str(ids[pos])]
        row = ref[pos - 1]
        assert abs(entry["logprob"] - row[ids[pos]].item()) < 1e-3
        assert entry["rank"] == int((row > row[ids[pos]]).sum()) + 1
        assert entry["decoded_token"] == tokenizer.decode([ids[pos]])
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                          extra_body={"prompt_logprobs": 0})
    assert chat.model_extra["prompt_logprobs"][0] is None and len(chat.model_extra["prompt_logprobs"]) > 3


def test_fifty_json_schema_requests_validate(client):
    check_json_schema_requests(client, MODEL, num=50)


@pytest.mark.parametrize("extra, check", [
    ({"guided_choice": ["red", "green", "blue"]}, lambda t: t in ("red", "green", "blue")),
    ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, lambda t: len(t) == 6 and t[3] == "-" and t[:3].isdigit()),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
    ({"guided_json": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                      "required": ["n"]}}, lambda t: 0 <= json.loads(t)["n"] <= 9),
])
def test_vllm_guided_extras(client, extra, check):
    for seed in range(3):
        r = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=200, temperature=1.0, seed=seed,
                                      extra_body=extra)
        assert r.choices[0].finish_reason == "stop" and check(r.choices[0].text), r.choices[0].text


def test_json_object_response_format(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please"}],
                                       max_tokens=400, temperature=0.7, seed=3,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # an open-ended object can outgrow max_tokens; what was produced is still an object's prefix
        assert r.choices[0].message.content.lstrip().startswith("{")


def test_tool_choice_required_streamed_and_not(client):
    for seed in range(3):
        check_required_tool_call(client, MODEL, seed)
        check_required_tool_call_streamed(client, MODEL, seed)
    # Same seed, same calls, whether streamed or not.
    whole = check_required_tool_call(client, MODEL, 7)
    streamed = check_required_tool_call_streamed(client, MODEL, 7)
    assert [(n, json.loads(a)) for n, a in whole] == [(n, json.loads(a)) for n, a in streamed]


def test_named_tool_choice(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "time?"}], tools=WEATHER_TOOLS, max_tokens=300,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=1.0, seed=1)
    c = r.choices[0]
    assert c.finish_reason == "stop" and len(c.message.tool_calls) == 1
    assert c.message.tool_calls[0].function.name == "get_time"
    assert json.loads(c.message.tool_calls[0].function.arguments)["tz"] in ("UTC", "CET")


def test_tool_messages_reach_the_chat_template(client, hf):
    tokenizer, _ = hf
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"days\": 2}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"forecast\": \"snow\"}"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=WEATHER_TOOLS, tool_choice="none",
                                       max_tokens=1)
    rendered = [dict(m) for m in messages]
    rendered[1] = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo",
                                                                                             "days": 2}}}]}
    text = tokenizer.apply_chat_template(rendered, tools=WEATHER_TOOLS, tokenize=False, add_generation_prompt=True)
    assert "<tool_response>" in text and '"arguments": {"city": "Oslo", "days": 2}' in text
    assert r.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))
    assert r.choices[0].message.tool_calls is None


def test_auto_tool_choice_without_a_call_is_content(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       tools=WEATHER_TOOLS, max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_logit_bias_forces_a_token(client, hf):
    tokenizer, _ = hf
    r = client.completions.create(model=MODEL, prompt=[[0, 40, 41]], max_tokens=4, temperature=0,
                                  logit_bias={"300": 100})
    assert tokenizer.encode(r.choices[0].text, add_special_tokens=False) == [300] * 4


def test_best_of_returns_the_candidate_with_the_best_mean_logprob(client):
    prompt, seed = "Once upon a time", 11
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0, seed=seed, best_of=3,
                                  n=1, extra_body={"ignore_eos": True})
    candidates = []
    for i in range(3):
        c = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0, seed=seed + i,
                                      logprobs=0, extra_body={"ignore_eos": True}).choices[0]
        candidates.append((sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs), c.text))
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.choices[0].logprobs is None
    assert r.choices[0].text == max(candidates)[1]
    assert r.usage.completion_tokens == 18


@pytest.mark.parametrize("path, body, param", [
    ("completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("completions", {"prompt": "x", "best_of": 2, "stream": True}, "best_of"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "functions": [{"name": "f"}]},
     "functions"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": WEATHER_TOOLS,
                          "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}],
                          "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0]"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
     "tool_choice"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": WEATHER_TOOLS,
                          "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}},
     "response_format"),
])
def test_unsupported_or_invalid_fields_are_400s(server, path, body, param):
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{server.url}/v1/{path}", json.dumps({"model": MODEL, **body}).encode(),
                                     {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=60)
    assert info.value.code == 400
    assert json.loads(info.value.read())["error"]["param"] == param
