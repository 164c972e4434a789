"""OpenAI request fields that constrain the output: ``response_format``, vLLM's ``structured_outputs`` and
``guided_*`` extras, and ``tools`` + ``tool_choice``. Each becomes a ``StructuredOutputsParams`` (the grammar
the engine enforces) and, for tools, the way the output is read back (``ToolMode``).

``tool_choice`` (OpenAI's meanings; vLLM's grammar shapes):

- ``none``: tools reach the chat template, the output is plain content;
- ``auto`` (default with tools): free text; the model's tool-call format is parsed out of it
  (``engine.router.tool_parsers``, picked from the chat template);
- ``required``: the grammar forces a JSON array of ``{"name", "parameters"}`` objects, one per call (one at
  most with ``parallel_tool_calls: false``), each matching one tool's schema;
- ``{"type": "function", "function": {"name": ...}}``: the grammar forces that function's arguments object.

Tool-call grammars are compact JSON (no optional whitespace): the arguments are re-serialized for the client
anyway, and a model cannot pad a call with blanks until ``max_tokens`` runs out.
``structured_outputs`` holding only options (``disable_any_whitespace``) applies them to ``response_format``'s
or a ``guided_*`` grammar, as vLLM merges them.

Errors are ``APIError``s naming the field; grammars are checked without a tokenizer (``validate``).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from duet.engine.router.api_error import APIError
from duet.engine.sampling_params import STRUCTURED_KINDS, StructuredOutputsParams
from duet.engine.structured_output import validate

_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolMode:
    """How a chat request's output is read back."""

    choice: str
    """``none``, ``auto``, ``required`` or ``named``."""
    name: str | None = None
    """The forced function (``named``)."""


def _structured(fields: dict, param: str) -> StructuredOutputsParams:
    try:
        so = StructuredOutputsParams(**fields)
        validate(so)
    except TypeError as e:
        raise APIError(f"{param}: {e}", param=param) from None
    except ValueError as e:
        raise APIError(f"{param}: {e}".replace(f"{param}: structured_outputs", param), param=param) from None
    return so


def _response_format(value) -> StructuredOutputsParams | None:
    if not isinstance(value, dict):
        raise APIError("response_format: expected an object with a type", param="response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _structured({"json_object": True}, "response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise APIError("response_format.json_schema: expected {\"name\", \"schema\": {...}}",
                           param="response_format")
        return _structured({"json": spec.get("schema", {})}, "response_format")
    raise APIError(f"response_format.type: expected text, json_object or json_schema, got {kind!r}",
                   param="response_format")


def parse_structured_outputs(body: dict) -> StructuredOutputsParams | None:
    """The grammar ``body`` asks for through exactly one of response_format, structured_outputs, guided_*."""
    found: list[tuple[str, StructuredOutputsParams | None]] = []
    options: dict = {}
    if body.get("response_format") is not None:
        found.append(("response_format", _response_format(body["response_format"])))
    if body.get("structured_outputs") is not None:
        so = body["structured_outputs"]
        if not isinstance(so, dict):
            raise APIError("structured_outputs: expected an object", param="structured_outputs")
        if any(so.get(kind) not in (None, False) for kind in STRUCTURED_KINDS):
            found.append(("structured_outputs", _structured(dict(so), "structured_outputs")))
        else:  # only options (disable_any_whitespace): they apply to response_format's grammar, as in vLLM
            options = dict(so)
    for name, kind in _GUIDED.items():
        if body.get(name) is not None:
            extra = {"disable_any_whitespace": True} if body.get("guided_whitespace_pattern") == "" else {}
            found.append((name, _structured({kind: body[name], **extra}, name)))
    found = [(name, so) for name, so in found if so is not None]
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise APIError(f"{found[1][0]}: only one output constraint per request ({names} given)", param=found[1][0])
    if not found:
        return None
    name, so = found[0]
    if options:
        fields = {k: v for k, v in dataclasses.asdict(so).items() if v not in (None, False)}
        so = _structured({**fields, **options}, "structured_outputs")
    return so


def parse_tools(body: dict) -> list[dict] | None:
    """``tools`` as chat-template-ready function specs (``{"type": "function", "function": {...}}``)."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise APIError("tools: expected a list of {\"type\": \"function\", \"function\": {...}}", param="tools")
    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise APIError(f"{where}: only {{\"type\": \"function\"}} tools are supported", param=where)
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise APIError(f"{where}.function: expected an object", param=where)
        name = fn.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise APIError(f"{where}.function.name: expected 1-64 letters, digits, _ . or -", param=where)
        if name in names:
            raise APIError(f"{where}.function.name: {name!r} is defined twice", param=where)
        names.add(name)
        parameters = fn.get("parameters", EMPTY_PARAMETERS)
        if not isinstance(parameters, dict):
            raise APIError(f"{where}.function.parameters: expected a JSON schema object", param=where)
        _structured({"json": parameters}, f"{where}.function.parameters")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise APIError(f"{where}.function.description: expected a string", param=where)
        spec = {"name": name, "parameters": parameters}
        if description is not None:
            spec["description"] = description
        if fn.get("strict") is not None:
            spec["strict"] = bool(fn["strict"])
        out.append({"type": "function", "function": spec})
    return out or None


def parse_tool_choice(body: dict, tools: list[dict] | None) -> ToolMode:
    value = body.get("tool_choice")
    if value is None:
        return ToolMode("auto" if tools else "none")
    if value in ("none", "auto", "required"):
        if value != "none" and not tools:
            raise APIError(f"tool_choice: {value!r} needs tools", param="tool_choice")
        return ToolMode(value)
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if not any(t["function"]["name"] == name for t in tools or ()):
            raise APIError(f"tool_choice: no tool named {name!r}", param="tool_choice")
        return ToolMode("named", name)
    raise APIError("tool_choice: expected none, auto, required or {\"type\": \"function\", \"function\": "
                   "{\"name\": ...}}", param="tool_choice")


def tool_grammar(tools: list[dict], mode: ToolMode, parallel: bool = True) -> StructuredOutputsParams | None:
    """The grammar that enforces ``required`` or a named tool; None for ``none`` / ``auto``."""
    if mode.choice == "named":
        fn = next(t["function"] for t in tools if t["function"]["name"] == mode.name)
        return StructuredOutputsParams(json=json.dumps(fn["parameters"], ensure_ascii=False),
                                       disable_any_whitespace=True)
    if mode.choice != "required":
        return None
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                             "parameters": t["function"]["parameters"]},
              "required": ["name", "parameters"], "additionalProperties": False}
             for t in tools]
    schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=json.dumps(schema, ensure_ascii=False), disable_any_whitespace=True)
