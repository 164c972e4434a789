"""Structured outputs: grammars that constrain generated tokens (JSON schema, regex, choice, EBNF, JSON object).

A request's path: ``SamplingParams.structured_outputs`` is checked without a tokenizer where it is parsed
(``validate``: the router and ``LLMEngine.make_request`` answer a bad schema with a ``ValueError`` naming
the field). The engine's ``GrammarCompiler`` compiles it against the tokenizer on a worker thread (the
scheduler does not admit the request before that finished, so a slow schema never stalls the batch) and
the request gets a ``GrammarState``: a matcher that has accepted every generated token. Each step the
model runner asks the ``MaskFiller`` for the next-token bitmask of the constrained rows; it fills them on
its own thread while the forward runs, and the sampler applies the mask to the logits.

Resuming: ``GrammarState`` accepts tokens before its grammar is compiled and replays them afterwards, so a
decode server handed a request's first token (disaggregated prefill) or a request migrated with its
generated tokens resumes the matcher by accepting them (``GrammarState.accept_all``), no special path.

Backend: xgrammar (vLLM's default; the choice is measured in bench/NOTES.md).
"""
from duet.engine.structured_output.grammar import GrammarCompiler, validate
from duet.engine.structured_output.masks import MaskFiller
from duet.engine.structured_output.state import GrammarState

__all__ = ["GrammarCompiler", "GrammarState", "MaskFiller", "validate"]
