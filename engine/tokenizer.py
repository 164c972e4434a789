"""Loading a checkpoint's tokenizer (tokenizer.json + tokenizer_config.json, chat template included)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def load_tokenizer(model_dir: str | Path, chat_template: str | None = None):
    """A ``transformers`` fast tokenizer from a local directory; never touches the network.

    ``chat_template``: a Jinja template (``load_chat_template``) replacing the checkpoint's."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: tokenizer directory does not exist")
    if not (model_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{model_dir / 'tokenizer.json'}: missing tokenizer file (--tokenizer DIR names "
                                "another directory)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file's contents, or the value itself when it is a template (has ``{{`` or
    ``{%``), as vLLM reads it. Raises ``FileNotFoundError`` for a path that does not exist."""
    if value is None:
        return None
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text()
    except OSError:  # a template too long to be a path
        pass
    if "{{" in value or "{%" in value:
        return value
    raise FileNotFoundError(f"--chat-template {value}: no such file (and not a Jinja template)")


def generation_config_dir(model_dir: str | Path, generation_config: str = "auto") -> Path | None:
    """The directory whose generation_config.json applies: the model's (``auto``), none (``vllm``/``none``),
    or the one given."""
    if generation_config == "auto":
        return Path(model_dir)
    if generation_config in ("vllm", "none"):
        return None
    return Path(generation_config)


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None) -> list[int]:
    """Token ids of a chat rendered with the checkpoint's chat template (``tools``: OpenAI function specs, for
    templates that render them; messages may carry ``tool_calls`` and ``role: "tool"``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("messages: this model's tokenizer_config.json has no chat_template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         tools=tools)
    return tokenizer.encode(text, add_special_tokens=False)


def bad_words_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """Token sequences of ``words`` at the start of a text and after a space (vLLM bans both spellings)."""
    out: list[list[int]] = []
    for word in words:
        for text in (word, " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in out:
                out.append(ids)
    return out


def generation_defaults(model_dir: str | Path | None) -> dict:
    """Sampling defaults from ``generation_config.json`` mapped onto SamplingParams field names ({} for None)."""
    if model_dir is None:
        return {}
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    out: dict = {}
    if raw.get("do_sample") is False:
        out["temperature"] = 0.0
    elif "temperature" in raw:
        out["temperature"] = float(raw["temperature"])
    for src, dst, conv in (("top_p", "top_p", float), ("top_k", "top_k", int), ("min_p", "min_p", float),
                           ("repetition_penalty", "repetition_penalty", float)):
        if raw.get(src) is not None:
            out[dst] = conv(raw[src])
    if raw.get("max_new_tokens") is not None:
        out["max_tokens"] = int(raw["max_new_tokens"])
    return out


def generation_eos_ids(model_dir: str | Path | None) -> tuple[int, ...]:
    if model_dir is None:
        return ()
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)
