"""Incremental detokenization equals a full decode and never emits a broken UTF-8 character."""
from __future__ import annotations

import pytest

from duet.engine.detokenizer import IncrementalDetokenizer
from duet.engine.tokenizer import load_tokenizer

TEXTS = ["café naïve 東京 🙂 done", "plain ascii text, with punctuation!", "🙂🙂🙂 東京東京"]


@pytest.fixture(scope="module")
def tok(llama_dir):
    return load_tokenizer(llama_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode_without_broken_chars(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 3
    detok = IncrementalDetokenizer(tok, [0])
    pieces = []
    for t in ids:
        detok.push(t)
        piece = detok.take_new_text(finished=False)
        assert "\ufffd" not in piece
        pieces.append(piece)
    detok.flush()
    pieces.append(detok.take_new_text(finished=True))
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text


def test_multibyte_chars_are_split_across_byte_tokens(tok):
    # The tiny byte-level tokenizer spells rare characters as several byte tokens: the case that matters.
    ids = tok.encode("🙂", add_special_tokens=False)
    assert len(ids) > 1


def test_stop_string_is_held_back_and_cut(tok):
    text = "alpha beta STOP gamma"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [0], stop=["STOP"])
    streamed = ""
    for t in ids:
        detok.push(t)
        streamed += detok.take_new_text(finished=False)
        assert "STO" not in streamed
        if detok.stop_reason:
            break
    streamed += detok.take_new_text(finished=True)
    assert detok.stop_reason == "STOP"
    assert streamed == "alpha beta "
