"""Tool-call parsers on model outputs in the formats the model families emit.

The Hermes outputs are Qwen2.5-7B-Instruct's transcript in Qwen's function-calling guide (two parallel calls,
preceded by nothing, and one preceded by text); the Llama ones follow Meta's Llama 3.1 / 3.2 prompt-format
guide (a JSON object with ``parameters``, ``<|python_tag|>`` optional, several calls joined by ``;``).
Every output is also streamed in pieces of every size: the deltas must rebuild exactly what the whole-text
parse returns.
"""
from __future__ import annotations

import json

import pytest

from duet.engine.router.tool_parsers import (
    PARSERS,
    ToolCallStream,
    detect_parser,
    named_parser,
    parse_hermes,
    parse_llama3_json,
    parse_required,
    scan_object,
    tool_calls,
)

QWEN_PARALLEL = (
    '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, '
    'USA", "date": "2024-10-01"}}\n</tool_call>'
)
QWEN_WITH_TEXT = (
    'Let me look that up for you.\n<tool_call>\n{"name": "search", "arguments": {"query": "vLLM \\"paged\\" '
    'attention", "filters": {"year": [2023, 2024], "note": "}{ braces in a string"}}}\n</tool_call>'
)
QWEN_NO_CALL = "The capital of France is Paris. A <tool_call> tag in prose is not a call."
LLAMA_SINGLE = '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", "unit": "Fahrenheit"}}'
LLAMA_TAGGED = '<|python_tag|>{"name": "brave_search", "parameters": {"query": "current weather in Menlo Park"}}'
LLAMA_MULTI = ('{"name": "get_weather", "parameters": {"city": "Paris"}}; '
               '{"name": "get_time", "parameters": {"tz": "Europe/Paris"}}')
LLAMA_TEXT = "I can't call a tool for that, but here is an answer: 42."
REQUIRED = ('[{"name": "get_weather", "parameters": {"city": "Rome", "days": 3}}, '
            '{"name": "get_time", "parameters": {}}]')


def calls_of(parse, text):
    snap = parse(text, True)
    return snap.content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in tool_calls(snap)]


def test_hermes_parallel_calls():
    content, calls = calls_of(parse_hermes, QWEN_PARALLEL)
    assert content.strip() == ""
    assert calls == [("get_current_temperature", {"location": "San Francisco, CA, USA"}),
                     ("get_temperature_date", {"location": "San Francisco, CA, USA", "date": "2024-10-01"})]


def test_hermes_text_then_call_with_tricky_strings():
    content, calls = calls_of(parse_hermes, QWEN_WITH_TEXT)
    assert content.strip() == "Let me look that up for you."
    assert calls == [("search", {"query": 'vLLM "paged" attention',
                                 "filters": {"year": [2023, 2024], "note": "}{ braces in a string"}})]


def test_hermes_prose_mentioning_the_tag_is_content():
    content, calls = calls_of(parse_hermes, QWEN_NO_CALL)
    assert calls == [] and content == QWEN_NO_CALL


@pytest.mark.parametrize("text, expected", [
    (LLAMA_SINGLE, [("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})]),
    (LLAMA_TAGGED, [("brave_search", {"query": "current weather in Menlo Park"})]),
    (LLAMA_MULTI, [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"})]),
])
def test_llama3_json_calls(text, expected):
    content, calls = calls_of(parse_llama3_json, text)
    assert calls == expected and content == ""


def test_llama3_plain_text_is_content():
    assert calls_of(parse_llama3_json, LLAMA_TEXT) == (LLAMA_TEXT, [])


def test_required_array():
    assert calls_of(parse_required, REQUIRED)[1] == [("get_weather", {"city": "Rome", "days": 3}), ("get_time", {})]


def test_scan_object_reports_incomplete_members():
    text = '{"name": "f", "arguments": {"a": [1, 2'
    members, end = scan_object(text, 0)
    assert end is None and members["name"][1] is not None and members["arguments"][1] is None


def rebuild(parse, text: str, step: int):
    stream = ToolCallStream(parse)
    content, calls = "", {}
    pieces = [text[i:i + step] for i in range(0, len(text), step)]
    for i, piece in enumerate(pieces):
        new_content, deltas = stream.feed(piece, final=i == len(pieces) - 1)
        content += new_content
        for d in deltas:
            entry = calls.setdefault(d["index"], {"name": None, "arguments": "", "id": None})
            if "id" in d:
                assert entry["id"] is None and d["type"] == "function" and d["function"]["arguments"] == ""
                entry["id"], entry["name"] = d["id"], d["function"]["name"]
            else:
                assert entry["id"] is not None, "arguments before the call was announced"
                entry["arguments"] += d["function"]["arguments"]
    return content, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


@pytest.mark.parametrize("parse, text", [
    (parse_hermes, QWEN_PARALLEL), (parse_hermes, QWEN_WITH_TEXT), (parse_hermes, QWEN_NO_CALL),
    (parse_llama3_json, LLAMA_MULTI), (parse_llama3_json, LLAMA_TAGGED), (parse_llama3_json, LLAMA_TEXT),
    (parse_required, REQUIRED),
])
@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_streamed_deltas_rebuild_the_whole_parse(parse, text, step):
    whole_content, whole_calls = calls_of(parse, text)
    content, calls = rebuild(parse, text, step)
    assert calls == whole_calls
    assert content.strip() == whole_content.strip()
    assert "<tool_call" not in content or not whole_calls  # a tag's first characters never leak as content


def test_named_parser_streams_the_whole_output_as_arguments():
    args = '{"city": "Oslo", "days": 2}'
    assert rebuild(named_parser("get_weather"), args, 4) == ("", [("get_weather", {"city": "Oslo", "days": 2})])


def test_detect_parser_from_chat_template():
    assert detect_parser("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert detect_parser("<|start_header_id|>ipython<|end_header_id|>") == "llama3_json"
    assert detect_parser(None) == "hermes"
    assert set(PARSERS) == {"hermes", "llama3_json", "required"}
