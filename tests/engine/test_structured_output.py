"""Structured outputs and token constraints in the engine (tiny random model: any valid output must come from
the constraint, not from the model)."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from duet.engine import EngineConfig, SamplingParams
from duet.engine.llm_engine import LLMEngine
from duet.engine.request import Request
from duet.engine.sampler import Sampler
from duet.engine.sampling_params import StructuredOutputsParams
from duet.engine.structured_output import GrammarState, MaskFiller, validate

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(llama_dir):
    e = LLMEngine(EngineConfig(model=llama_dir, show_progress=False, num_kv_blocks=512, max_model_len=512))
    yield e
    e.close()


def run(engine: LLMEngine, requests: list[tuple[str, str, SamplingParams]]) -> dict:
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def test_json_schema_outputs_parse_and_validate(engine):
    so = StructuredOutputsParams(json=json.dumps(SCHEMA))
    outs = run(engine, [(f"j{i}", "Describe a person:", SamplingParams(max_tokens=400, temperature=1.0, seed=i,
                                                                       structured_outputs=so)) for i in range(50)])
    for out in outs.values():
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({o.text for o in outs.values()}) > 10  # sampled, not one forced string


def test_length_bounded_strings_are_valid_json(engine):
    """xgrammar alone lets raw control characters into a ``maxLength`` string (invalid JSON); Duet rewrites
    such strings as patterns. (Lengths are not checked here: a random byte-level model also emits overlong
    UTF-8 sequences, which xgrammar counts as one character and Python decodes as several U+FFFD.)"""
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 6}},
              "required": ["s"]}
    so = StructuredOutputsParams(json=json.dumps(schema))
    outs = run(engine, [(f"b{i}", "Say:", SamplingParams(max_tokens=300, temperature=1.0, seed=i,
                                                         structured_outputs=so)) for i in range(20)])
    for out in outs.values():
        assert out.finish_reason == "stop"
        value = json.loads(out.text)["s"]
        assert not any(ord(c) < 0x20 for c in value), out.text


def test_unconstrained_sampling_does_not_produce_the_schema(engine):
    # The control: the same model without the grammar does not emit valid JSON.
    outs = run(engine, [(f"u{i}", "Describe a person:", SamplingParams(max_tokens=60, temperature=1.0, seed=i))
                        for i in range(5)])
    for out in outs.values():
        with pytest.raises(ValueError):
            json.loads(out.text)


@pytest.mark.parametrize("so, check", [
    (StructuredOutputsParams(regex=r"[a-c]{2,5}-\d{1,3}"), lambda t: re.fullmatch(r"[a-c]{2,5}-\d{1,3}", t)),
    (StructuredOutputsParams(choice=["yes", "no", "maybe so"]), lambda t: t in ("yes", "no", "maybe so")),
    (StructuredOutputsParams(grammar='root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'),
     lambda t: re.fullmatch(r"\(\d+(\+\d+)*\)", t)),
    (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
])
def test_regex_choice_grammar_and_json_object(engine, so, check):
    outs = run(engine, [(f"g{i}", "Answer:", SamplingParams(max_tokens=300, temperature=1.0, seed=i,
                                                            structured_outputs=so)) for i in range(8)])
    for out in outs.values():
        if so.json_object and out.finish_reason == "length":
            continue  # an unbounded JSON object may outgrow max_tokens; a finished one must parse
        assert out.finish_reason == "stop" and check(out.text), out.text


def test_greedy_constrained_output_equals_masked_argmax_reference(engine, llama_dir):
    """Greedy + grammar == argmax over the grammar's allowed tokens at every step, with logits from
    ``prompt_logits`` (an independent full forward) and the grammar's own matcher."""
    so = StructuredOutputsParams(choice=["alpha beta", "alphabet", "gamma"])
    out = run(engine, [("greedy", "Pick:", SamplingParams(max_tokens=20, temperature=0, structured_outputs=so))])
    tokens = out["greedy"].token_ids
    compiler = engine.grammar_compiler
    state = GrammarState(compiler.compile_async(so))
    ids = engine.tokenizer.encode("Pick:")
    vocab = engine.model_config.vocab_size
    import xgrammar as xgr

    for token in tokens:
        logits = engine.runner.prompt_logits(ids)[-1:].clone()
        mask = xgr.allocate_token_bitmask(1, vocab)
        state.fill(mask, 0)
        xgr.apply_token_bitmask_inplace(logits, mask)
        assert int(torch.argmax(logits)) == token
        state.accept(token)
        ids.append(token)
    assert state.is_terminated


def test_grammar_state_resumes_from_tokens_and_replays_before_compiled(engine):
    so = StructuredOutputsParams(json=json.dumps(SCHEMA))
    tok = engine.tokenizer
    prefix = tok.encode('{"name": "Al", "age": 3', add_special_tokens=False)
    future = engine.grammar_compiler.compile_async(so)
    resumed = GrammarState.resume(future, prefix)  # may run before compilation finished: replayed later
    fresh = GrammarState(future)
    for t in prefix:
        assert fresh.accept(t)
    vocab = engine.model_config.vocab_size
    import xgrammar as xgr

    a, b = xgr.allocate_token_bitmask(1, vocab), xgr.allocate_token_bitmask(1, vocab)
    resumed.fill(a, 0)
    fresh.fill(b, 0)
    assert torch.equal(a, b) and resumed.num_accepted == len(prefix)
    bad = GrammarState.resume(future, tok.encode("[1]", add_special_tokens=False))
    bad.fill(a, 0)
    assert bad.error is not None


def test_bad_grammars_are_refused_with_the_field():
    for so, field in ((StructuredOutputsParams(json='{"type": "nonsense"}'), "structured_outputs.json"),
                      (StructuredOutputsParams(regex="(ab"), "structured_outputs.regex"),
                      (StructuredOutputsParams(grammar="root ::= undefined_rule"), "structured_outputs.grammar")):
        with pytest.raises(ValueError, match=re.escape(field)):
            validate(so)
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json="{}", regex="a")


def test_engine_refuses_bad_grammar_before_queueing(engine):
    with pytest.raises(ValueError, match="structured_outputs.regex"):
        engine.add_request("bad", "x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="(a")))
    assert engine.get_request("bad") is None


def test_threaded_and_inline_masks_agree(engine):
    so = StructuredOutputsParams(json=json.dumps(SCHEMA))
    states = [GrammarState(engine.grammar_compiler.compile_async(so)) for _ in range(4)]
    states[1].accept_all(engine.tokenizer.encode('{"name": "Bo"', add_special_tokens=False))
    filler = MaskFiller(engine.model_config.vocab_size)
    future = filler.submit([states[0], None, states[1], states[2]])
    mask = future.result()
    inline = MaskFiller(engine.model_config.vocab_size, overlap=False).submit(
        [states[0], None, states[1], states[2]]).result()
    assert mask.rows == inline.rows == [0, 2, 3] and torch.equal(mask.bitmask, inline.bitmask)
    assert not torch.equal(mask.bitmask[0], mask.bitmask[2])  # a different state, a different mask
    assert filler.submit([None, None]) is None
    filler.close()


def test_logit_bias_allowed_token_ids_and_bad_words(engine):
    tok = engine.tokenizer
    vocab = engine.model_config.vocab_size
    base = run(engine, [("base", "Once upon a time", SamplingParams(max_tokens=12, temperature=0))])["base"]
    forced = 300
    biased = run(engine, [("bias", "Once upon a time", SamplingParams(
        max_tokens=6, temperature=0, logit_bias={forced: 100.0}))])["bias"]
    assert biased.token_ids == [forced] * 6 and base.token_ids[0] != forced
    allowed = [100, 200, 250]
    outs = run(engine, [(f"al{i}", "Once upon a time", SamplingParams(max_tokens=12, temperature=1.0, seed=i,
                                                                     allowed_token_ids=allowed)) for i in range(4)])
    assert all(set(o.token_ids) <= set(allowed) for o in outs.values())
    assert len({t for o in outs.values() for t in o.token_ids}) > 1
    # bad_words: the greedy output's first two tokens as one word, banned as a sequence.
    word = tok.decode(base.token_ids[:2])
    banned = run(engine, [("bw", "Once upon a time", SamplingParams(max_tokens=12, temperature=0,
                                                                   bad_words=[word]))])["bw"]
    assert banned.token_ids[:1] == base.token_ids[:1] and banned.token_ids[1] != base.token_ids[1]
    with pytest.raises(ValueError, match="allowed_token_ids"):
        engine.add_request("oov", "x", SamplingParams(allowed_token_ids=[vocab]))


def test_sampler_applies_bias_and_mask_to_greedy_rows():
    vocab = 64
    logits = torch.linspace(0, 1, vocab).unsqueeze(0)
    req = Request("r", [1, 2], SamplingParams(temperature=0, logit_bias={3: 5.0}), eos_token_ids=(1,))
    assert Sampler()(logits, [req])[0].token_id == 3
    req = Request("r", [1, 2], SamplingParams(temperature=0, allowed_token_ids=[7, 9]), eos_token_ids=(1,))
    assert Sampler()(logits, [req])[0].token_id == 9


def test_cpu_token_mask_matches_xgrammar_kernel(engine):
    """The CPU id-list path (greedy rows decided over their allowed ids, -inf at disallowed ids) agrees with
    xgrammar's own apply kernel, for rows allowing few tokens (structure) and most tokens (inside a string)."""
    import xgrammar as xgr

    so = StructuredOutputsParams(json=json.dumps(SCHEMA))
    tok = engine.tokenizer
    prefixes = ["", '{"name": "Bo', '{"name": "Bob", "age": 4', '{"name": "A", "age": 1, "ok": true, "tags": [']
    states = [GrammarState.resume(engine.grammar_compiler.compile_async(so), tok.encode(p, add_special_tokens=False))
              for p in prefixes]
    vocab = engine.model_config.vocab_size
    mask = MaskFiller(vocab, overlap=False).submit([states[0], None, states[1], states[2], states[3]]).result()
    assert mask.greedy_rows.numel() and mask.disallowed_flat.numel()  # both kinds of rows occur
    torch.manual_seed(0)
    logits = torch.randn(5, vocab)
    reference = logits.clone()
    xgr.apply_token_bitmask_inplace(reference, mask.bitmask, vocab_size=vocab, indices=mask.rows)
    greedy = [True, True, False, True, False]
    got = logits.clone()
    decided = mask.apply(got, greedy)
    for row in range(5):
        if row in decided:
            assert decided[row] == int(torch.argmax(reference[row])) and greedy[row]
        else:
            assert torch.equal(got[row], reference[row]), row
    assert set(decided) == {r for r in mask.greedy_rows.tolist() if greedy[r]}
