"""OpenAI request parsing, validation and response formatting (no server)."""
from __future__ import annotations

import math

import pytest

from duet.engine.detokenizer import IncrementalDetokenizer
from duet.engine.router import openai_protocol as proto
from duet.engine.router.dispatcher import TokenDelta
from duet.engine.router.openai_protocol import APIError, ChoiceState, TokenStrings, parse_chat, parse_completion

MODEL = "tiny"


def completion(**body):
    return parse_completion({"model": MODEL, "prompt": "hi", **body}, model_name=MODEL)


def chat(**body):
    return parse_chat({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}, model_name=MODEL)


def rejected(fn, **body) -> APIError:
    with pytest.raises(APIError) as info:
        fn(**body)
    return info.value


@pytest.mark.parametrize("prompt, expected", [
    ("hello", ["hello"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_completion_prompt_shapes(prompt, expected):
    assert parse_completion({"prompt": prompt}, model_name=MODEL).prompts == expected


def test_completion_fields_map_onto_sampling_params():
    req = completion(max_tokens=5, temperature=0.5, top_p=0.9, top_k=4, min_p=0.1, n=3, seed=11, stop="x",
                     stop_token_ids=[7], logprobs=2, presence_penalty=0.5, frequency_penalty=-0.5,
                     repetition_penalty=1.1, min_tokens=1, ignore_eos=True, user="u", unknown_field=1)
    assert (req.n, req.stop, req.max_tokens) == (3, ["x"], 5)
    p = req.sampling_params(10, 2, max_model_len=64, max_default_tokens=16)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.logprobs) == (5, 0.5, 0.9, 4, 0.1, 13, 2)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.min_tokens) == ([], [7], True, 1)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)


def test_default_max_tokens_is_rest_of_context_capped():
    req = completion()
    assert req.sampling_params(10, 0, max_model_len=64, max_default_tokens=1000).max_tokens == 54
    assert req.sampling_params(10, 0, max_model_len=64, max_default_tokens=8).max_tokens == 8
    assert rejected(req.sampling_params, num_prompt_tokens=64, choice_idx=0, max_model_len=64,
                    max_default_tokens=8).param == "prompt"


def test_defaults_apply_when_fields_are_omitted():
    req = parse_completion({"prompt": "x"}, model_name=MODEL, defaults={"temperature": 0.0, "top_k": 5, "junk": 1})
    p = req.sampling_params(1, 0, max_model_len=8, max_default_tokens=4)
    assert (p.temperature, p.top_k) == (0.0, 5)
    assert parse_completion({"prompt": "x", "temperature": 0.7}, model_name=MODEL,
                            defaults={"temperature": 0.0}).sampling["temperature"] == 0.7


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"n": 0}, "n"),
    ({"n": proto.MAX_N + 1}, "n"),
    ({"n": True}, "n"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"stop": ""}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop": ["a"] * 17}, "stop"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
    ({"stream": 1}, "stream"),
    ({"stream_options": "x"}, "stream_options"),
    ({"echo": "yes"}, "echo"),
    ({"logit_bias": {"1": 200}}, "logit_bias"),
    ({"logit_bias": {"a": 1}}, "logit_bias"),
    ({"suffix": "y"}, "suffix"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"best_of": 3, "stream": True}, "best_of"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"bad_words": [""]}, "bad_words"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"guided_regex": "(a"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
    ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [[1], [True]]}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": ["a"] * 20, "n": 16}, "prompt"),
    ({"model": 3}, "model"),
])
def test_completion_rejections_name_the_field(body, param):
    err = rejected(completion, **body)
    assert (err.status, err.param) == (400, param), err.message
    assert err.body()["error"]["type"] == "invalid_request_error"
    assert err.body()["error"]["message"]


def test_wrong_model_is_404_model_not_found():
    err = rejected(completion, model="gpt-4")
    assert (err.status, err.param, err.code) == (404, "model", "model_not_found")
    assert parse_completion({"prompt": "x"}, model_name=MODEL).prompts == ["x"]  # model may be omitted


def test_body_must_be_an_object():
    assert rejected(parse_completion, body=[1], model_name=MODEL).status == 400
    assert rejected(parse_chat, body="x", model_name=MODEL).status == 400


def test_context_and_vocab_checks():
    req = completion(max_tokens=60)
    err = rejected(req.sampling_params, num_prompt_tokens=10, choice_idx=0, max_model_len=64, max_default_tokens=8)
    assert err.param == "max_tokens" and "64" in err.message
    assert rejected(req.check_prompt, token_ids=[1, 512], vocab_size=512).param == "prompt"
    assert rejected(req.check_prompt, token_ids=[], vocab_size=512).param == "prompt"
    req.check_prompt([0, 511], 512)
    assert rejected(completion(stop_token_ids=[512]).check_prompt, token_ids=[1], vocab_size=512).param == \
        "stop_token_ids"
    chat_req = chat(max_completion_tokens=60)
    assert rejected(chat_req.sampling_params, num_prompt_tokens=10, choice_idx=0, max_model_len=64,
                    max_default_tokens=8).param == "max_completion_tokens"
    assert rejected(chat_req.check_prompt, token_ids=[999], vocab_size=512).param == "messages"


def test_chat_messages_and_logprobs():
    req = parse_chat({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": "really"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
    ], "logprobs": True, "top_logprobs": 3, "max_tokens": 4}, model_name=MODEL)
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "system", "content": "really"},
                            {"role": "user", "content": "a\nb"}, {"role": "assistant", "content": ""}]
    assert req.sampling["logprobs"] == 3 and req.max_tokens == 4
    assert chat(logprobs=True).sampling["logprobs"] == 0
    assert "logprobs" not in chat(logprobs=False).sampling
    assert chat(max_completion_tokens=7, max_tokens=3).max_tokens == 7


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ({"logprobs": 1}, "logprobs"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
])
def test_chat_rejections_name_the_field(body, param):
    err = rejected(chat, **body)
    assert (err.status, err.param) == (400, param), err.message


def test_stream_options_and_param_of():
    assert completion(stream=True, stream_options={"include_usage": True}).include_usage
    assert not completion(stream=False, stream_options={"include_usage": True}).include_usage
    assert proto.param_of("max_tokens: prompt (3) + ...") == "max_tokens"
    assert proto.param_of("prompt_token_ids: token id 9") is None
    assert proto.param_of("something else", "x") == "x"


# ---- ChoiceState: detokenization, stop strings, logprobs --------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    from duet.engine.tokenizer import load_tokenizer

    return load_tokenizer(llama_dir)


def _state(tokenizer, kind="completion", stop=(), top=None, min_tokens=0):
    prompt = tokenizer.encode("hello")
    detok = IncrementalDetokenizer(tokenizer, prompt, list(stop))
    return ChoiceState(0, kind, detok, min_tokens=min_tokens, top_logprobs=top, strings=TokenStrings(tokenizer))


def test_choice_state_text_and_stop_string(tokenizer):
    ids = tokenizer.encode(" the cat sat on the mat", add_special_tokens=False)
    state = _state(tokenizer, stop=["sat"])
    streamed = ""
    for t in ids:
        state.add(TokenDelta(token_ids=[t]))
        streamed += state.take()[0]
        if state.finished:
            break
    assert state.finish_reason == "stop" and streamed == " the cat "
    # Without a stop string the text is the plain decode, and the engine's finish reason is kept.
    state = _state(tokenizer)
    state.add(TokenDelta(token_ids=ids, finished=True, finish_reason="length"))
    assert state.take()[0] == tokenizer.decode(ids) and state.finish_reason == "length"
    assert state.num_tokens == len(ids)


def test_choice_state_stop_waits_for_min_tokens(tokenizer):
    ids = tokenizer.encode(" a b c d e", add_special_tokens=False)
    state = _state(tokenizer, stop=["a"], min_tokens=4)
    for t in ids[:3]:
        state.add(TokenDelta(token_ids=[t]))
        assert not state.finished
    state.add(TokenDelta(token_ids=[ids[3]]))
    assert state.finished and state.take()[0] == " " and state.num_tokens == 4


def test_choice_state_errors(tokenizer):
    state = _state(tokenizer)
    state.add(TokenDelta(finished=True, finish_reason="error", error="boom", status=503))
    assert state.finish_reason == "error" and state.error.status == 503 and state.error.message == "boom"
    state = _state(tokenizer)
    state.add(TokenDelta(finished=True, finish_reason="abort"))
    assert state.error is not None and state.error.status == 503


def test_logprob_formats(tokenizer):
    ids = tokenizer.encode(" hi there", add_special_tokens=False)[:2]
    lps = [{ids[0]: -0.5, 7: -1.0, 8: -2.0}, {ids[1]: -3.0, 9: -0.1, 10: -0.2}]
    state = _state(tokenizer, top=2)
    state.add(TokenDelta(token_ids=ids, logprobs=lps, finished=True, finish_reason="length"))
    text, lp = state.take()
    strings = TokenStrings(tokenizer)
    assert lp["tokens"] == [strings.text(t) for t in ids]
    assert lp["token_logprobs"] == [-0.5, -3.0]
    assert lp["text_offset"] == [0, len(lp["tokens"][0])]
    assert lp["top_logprobs"][1] == {strings.text(ids[1]): -3.0, strings.text(9): -0.1, strings.text(10): -0.2}
    choice = state.choice(text, lp, stream=False)
    assert choice["finish_reason"] == "length" and choice["text"] == text

    state = _state(tokenizer, kind="chat", top=1)
    state.add(TokenDelta(token_ids=ids, logprobs=lps, finished=True, finish_reason="stop"))
    text, lp = state.take()
    first = lp["content"][0]
    assert first["token"] == strings.text(ids[0]) and first["logprob"] == -0.5
    assert bytes(first["bytes"]).decode() == strings.text(ids[0])
    assert [t["logprob"] for t in first["top_logprobs"]] == [-0.5]
    assert lp["content"][1]["top_logprobs"][0]["logprob"] == -0.1
    assert state.choice(text, lp, stream=False)["message"] == {"role": "assistant", "content": text}
    role_chunk = state.choice("", None, stream=True, first=True)
    assert role_chunk["delta"] == {"role": "assistant", "content": ""} and role_chunk["finish_reason"] is None
    assert state.choice("", None, stream=True)["delta"] == {} and state.choice("", None, stream=True)["finish_reason"]


def test_token_bytes_of_partial_utf8(tokenizer):
    strings = TokenStrings(tokenizer)
    ids = tokenizer.encode("é€", add_special_tokens=False)
    assert bytes(b for t in ids for b in strings.bytes(t)).decode() == "é€"


def test_response_builders_and_sse():
    usage = proto.usage(5, 3, 2)
    assert usage == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                     "prompt_tokens_details": {"cached_tokens": 2}}
    body = proto.completion_response("cmpl-1", 10, MODEL, [], usage)
    assert body["object"] == "text_completion" and body["usage"] == usage
    assert proto.chat_response("c", 1, MODEL, [], usage)["object"] == "chat.completion"
    assert proto.chunk("chat", "c", 1, MODEL, [])["object"] == "chat.completion.chunk"
    assert "usage" in proto.chunk("completion", "c", 1, MODEL, [], usage)
    assert proto.sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert proto.models_response(MODEL, 1, 64)["data"][0]["id"] == MODEL
