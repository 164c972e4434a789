"""Structured-output and tool-call checks shared by the native and vLLM executor tests (real servers, the real
``openai`` client, ``jsonschema`` as the judge)."""
from __future__ import annotations

import json
from concurrent import futures

import jsonschema

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "member", "colors"],
    "additionalProperties": False,
}
WEATHER_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather forecast for a city",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                       "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Local time in a time zone",
        "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
                       "additionalProperties": False}}},
]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in WEATHER_TOOLS}
MAX_TOKENS = 300
# A random model never closes an unbounded array of calls on purpose: the checks ask for one call
# (parallel_tool_calls=false, which the grammar turns into maxItems 1).


def check_json_schema_requests(client, model: str, num: int = 50, concurrency: int = 16,
                               extra_body: dict | None = None) -> list[dict]:
    """``num`` sampled ``response_format: json_schema`` chat requests; each output parses and validates."""
    def one(i: int) -> dict:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Describe person number {i} as JSON."}],
            max_tokens=MAX_TOKENS, temperature=1.0, seed=i, extra_body=extra_body,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        value = json.loads(choice.message.content)
        jsonschema.validate(value, PERSON)
        return value

    with futures.ThreadPoolExecutor(concurrency) as pool:
        values = list(pool.map(one, range(num)))
    assert len({json.dumps(v, sort_keys=True) for v in values}) > 5  # sampled outputs, not one forced string
    return values


def _check_call(name: str, arguments: str) -> None:
    assert name in TOOL_SCHEMAS, name
    jsonschema.validate(json.loads(arguments), TOOL_SCHEMAS[name])


def check_required_tool_call(client, model: str, seed: int = 0) -> list[tuple[str, str]]:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What's the weather in Rome?"}], tools=WEATHER_TOOLS,
        tool_choice="required", parallel_tool_calls=False, max_tokens=MAX_TOKENS, temperature=1.0, seed=seed)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and not choice.message.content
    for call in calls:
        assert call.type == "function" and call.id
        _check_call(call.function.name, call.function.arguments)
    return [(c.function.name, c.function.arguments) for c in calls]


def check_required_tool_call_streamed(client, model: str, seed: int = 0) -> list[tuple[str, str]]:
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What's the weather in Rome?"}], tools=WEATHER_TOOLS,
        tool_choice="required", parallel_tool_calls=False, max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
        stream=True)
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or ():
            entry = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                entry["id"], entry["name"] = d.id, d.function.name
            entry["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls and not content
    for entry in calls.values():
        assert entry["id"] and entry["name"]
        _check_call(entry["name"], entry["arguments"])
    return [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]
