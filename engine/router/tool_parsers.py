"""Tool calls out of model text: one parser per output format, for whole texts and for streams.

Formats (``PARSERS``):

- ``hermes`` (Qwen2/2.5/3, Hermes, many ChatML models): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks; text outside them is content.
- ``llama3_json`` (Llama 3.x): the whole output is ``{"name": ..., "parameters": {...}}`` (optionally after
  ``<|python_tag|>``), several separated by ``;``; anything else is content.
- ``required`` (``tool_choice="required"``, any model; the grammar forces it): a JSON array of
  ``{"name": ..., "parameters": {...}}``.
- ``named`` (``tool_choice`` names a function; the grammar forces it): the whole output is the arguments.

Every parser reads a *prefix* of the output and returns a ``Snapshot``: content so far and each call's name
(once complete) and raw argument text so far. The raw argument text of a call only grows as the output
grows, so a stream is the difference between consecutive snapshots (``ToolCallStream``): a first delta with
the call's id, type and name, then argument fragments whose concatenation is the final JSON text.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Callable

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
LLAMA_PYTHON_TAG = "<|python_tag|>"


@dataclass
class CallSnapshot:
    name: str | None = None
    """The function name, once its JSON string is complete."""
    arguments: str = ""
    """Raw JSON text of the arguments seen so far (complete when ``complete``)."""
    complete: bool = False


@dataclass
class Snapshot:
    content: str = ""
    calls: list[CallSnapshot] = field(default_factory=list)


# ---- a partial-JSON reader: spans of an object's top-level values -------------------------------------
def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _value_end(text: str, i: int) -> int | None:
    """End (exclusive) of the JSON value starting at ``text[i]``; None when the text stops inside it."""
    if i >= len(text):
        return None
    if text[i] == '"':
        j = i + 1
        while j < len(text):
            if text[j] == "\\":
                j += 2
                continue
            if text[j] == '"':
                return j + 1
            j += 1
        return None
    if text[i] in "{[":
        depth, j, in_string = 0, i, False
        while j < len(text):
            c = text[j]
            if in_string:
                if c == "\\":
                    j += 1
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        return None
    j = i  # number, true, false, null: ends at a delimiter
    while j < len(text) and text[j] not in ",}] \t\r\n":
        j += 1
    return j if j < len(text) else None


def scan_object(text: str, start: int) -> tuple[dict[str, tuple[int, int | None]], int | None]:
    """Top-level members of the JSON object at ``text[start] == "{"``: key -> (value start, value end or None
    while incomplete), and the object's end (exclusive) or None. Keys not yet complete are left out."""
    members: dict[str, tuple[int, int | None]] = {}
    i = _skip_ws(text, start + 1)
    while i < len(text):
        if text[i] == "}":
            return members, i + 1
        if text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        key_end = _value_end(text, i) if text[i] == '"' else None
        if key_end is None:
            return members, None
        try:
            key = json.loads(text[i:key_end])
        except ValueError:
            return members, None
        i = _skip_ws(text, key_end)
        if i >= len(text) or text[i] != ":":
            return members, None
        i = _skip_ws(text, i + 1)
        if i >= len(text):
            return members, None
        end = _value_end(text, i)
        members[key] = (i, end)
        if end is None:
            return members, None
        i = _skip_ws(text, end)
    return members, None


def _call_from_object(text: str, start: int, args_key: str) -> tuple[CallSnapshot, int | None]:
    members, end = scan_object(text, start)
    call = CallSnapshot()
    name = members.get("name")
    if name is not None and name[1] is not None:
        try:
            value = json.loads(text[name[0]:name[1]])
            call.name = value if isinstance(value, str) else None
        except ValueError:
            pass
    for key in (args_key, "arguments", "parameters"):
        span = members.get(key)
        if span is not None:
            call.arguments = text[span[0]:span[1] if span[1] is not None else len(text)]
            break
    call.complete = end is not None
    if call.complete and not call.arguments:
        call.arguments = "{}"
    return call, end


def _held_back(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag`` (kept out of content)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# ---- the formats -----------------------------------------------------------------------------------------
def parse_hermes(text: str, final: bool = False) -> Snapshot:
    snap = Snapshot()
    pos, parts = 0, []
    while True:
        open_at = text.find(HERMES_OPEN, pos)
        if open_at < 0:
            tail = text[pos:]
            parts.append(tail if final else tail[:len(tail) - _held_back(tail, HERMES_OPEN)])
            break
        parts.append(text[pos:open_at])
        body = _skip_ws(text, open_at + len(HERMES_OPEN))
        if body >= len(text):
            break
        if text[body] != "{":  # not a call after all: keep it as content
            parts.append(HERMES_OPEN)
            pos = open_at + len(HERMES_OPEN)
            continue
        call, end = _call_from_object(text, body, "arguments")
        snap.calls.append(call)
        if end is None:
            break
        close_at = text.find(HERMES_CLOSE, end)
        if close_at < 0:
            break
        pos = close_at + len(HERMES_CLOSE)
    snap.content = "".join(parts)
    if final:
        snap.calls = [c for c in snap.calls if c.name is not None]
    return snap


def parse_llama3_json(text: str, final: bool = False) -> Snapshot:
    start = _skip_ws(text, 0)
    if not final and LLAMA_PYTHON_TAG.startswith(text[start:]):
        return Snapshot()  # maybe the tag's first characters: wait
    if text.startswith(LLAMA_PYTHON_TAG, start):
        start = _skip_ws(text, start + len(LLAMA_PYTHON_TAG))
    if start >= len(text):
        return Snapshot(content="" if not final else text)
    if text[start] != "{":
        return Snapshot(content=text)
    return _call_list(text, start, "parameters", separator=";", final=final)


def parse_required(text: str, final: bool = False) -> Snapshot:
    start = _skip_ws(text, 0)
    if start >= len(text) or text[start] != "[":
        return Snapshot(content=text if final else "")
    return _call_list(text, _skip_ws(text, start + 1), "parameters", separator=",", final=final)


def _call_list(text: str, i: int, args_key: str, separator: str, final: bool) -> Snapshot:
    snap = Snapshot()
    while i < len(text) and text[i] == "{":
        call, end = _call_from_object(text, i, args_key)
        snap.calls.append(call)
        if end is None:
            break
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == separator:
            i = _skip_ws(text, i + 1)
    if final:
        snap.calls = [c for c in snap.calls if c.name is not None]
    return snap


def named_parser(name: str) -> Callable[[str, bool], Snapshot]:
    def parse(text: str, final: bool = False) -> Snapshot:
        return Snapshot(calls=[CallSnapshot(name, text, final)])

    return parse


PARSERS: dict[str, Callable[[str, bool], Snapshot]] = {
    "hermes": parse_hermes,
    "llama3_json": parse_llama3_json,
    "required": parse_required,
}


def detect_parser(chat_template: str | None) -> str:
    """The ``PARSERS`` name for a chat template: Llama 3's mentions ``<|python_tag|>`` or ``ipython``; others,
    Qwen's included, get ``hermes``."""
    template = chat_template or ""
    if LLAMA_PYTHON_TAG in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


# ---- results ---------------------------------------------------------------------------------------------
def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _normalized(arguments: str) -> str:
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False)
    except ValueError:
        return arguments


def tool_calls(snapshot: Snapshot) -> list[dict]:
    """OpenAI ``message.tool_calls`` of a final snapshot (arguments as compact JSON text)."""
    return [{"id": new_call_id(), "type": "function",
             "function": {"name": c.name, "arguments": _normalized(c.arguments)}} for c in snapshot.calls]


class ToolCallStream:
    """Turns a growing output text into content deltas and OpenAI ``delta.tool_calls`` entries."""

    def __init__(self, parse: Callable[[str, bool], Snapshot]):
        self.parse = parse
        self.text = ""
        self.num_content_chars = 0
        self.sent: list[tuple[str, int]] = []
        """Per call announced: (its id, argument characters sent)."""

    @property
    def num_calls(self) -> int:
        return len(self.sent)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        """(new content, new tool-call delta entries) after ``text`` was appended to the output."""
        self.text += text
        snap = self.parse(self.text, final)
        content = snap.content[self.num_content_chars:]
        self.num_content_chars = max(self.num_content_chars, len(snap.content))
        deltas = []
        for index, call in enumerate(snap.calls):
            if index >= len(self.sent):
                if call.name is None:
                    break
                call_id = new_call_id()
                self.sent.append((call_id, 0))
                deltas.append({"index": index, "id": call_id, "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            call_id, num_sent = self.sent[index]
            if len(call.arguments) > num_sent:
                deltas.append({"index": index, "function": {"arguments": call.arguments[num_sent:]}})
                self.sent[index] = (call_id, len(call.arguments))
        return content, deltas
