"""Incremental detokenizer and stop-string matcher, against the real default tokenizer."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tetri.server.detok import IncrementalDetokenizer, StopMatcher
from tetri.server.engine_api import ChoiceDelta
from tetri.server.generation import ChoiceState

TEXTS = ["東京 😀 café", "naïve résumé привет", "😀😀😀 ok", "Hello, world! 3.14159", "a\nb\tc  東"]


def stream(tok, ids, prompt=()):
    detok = IncrementalDetokenizer(tok.decode, prompt)
    pieces = [detok.step(t) for t in ids]
    pieces.append(detok.flush())
    return pieces


def test_multibyte_never_broken_and_concat_equals_decode(tok):
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert any("\ufffd" in tok.decode([i]) for i in ids) or text.isascii()
        pieces = stream(tok, ids)
        assert all("\ufffd" not in p for p in pieces), pieces
        assert "".join(pieces) == tok.decode(ids) == text


def test_prompt_context_does_not_leak_into_output(tok):
    prompt = tok.encode("The capital of France is", add_special_tokens=False)
    ids = tok.encode(" Paris, 東京", add_special_tokens=False)
    assert "".join(stream(tok, ids, prompt)) == tok.decode(ids)


def test_held_back_until_character_completes(tok):
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok.decode)
    outs = [detok.step(t) for t in ids]
    assert outs[:-1] == [""] * (len(ids) - 1) and outs[-1] == "😀"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=4, max_value=511), max_size=40))
def test_any_id_sequence_concat_equals_decode(tok, ids):
    # Arbitrary ids may spell invalid UTF-8 (U+FFFD is then real output); the text must still add up.
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="ab東😀 é", max_size=30))
def test_valid_text_never_yields_replacement(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    pieces = stream(tok, ids)
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == text


def feed_all(matcher, pieces):
    out = []
    for p in pieces:
        text, hit = matcher.feed(p)
        out.append(text)
        if hit:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_stop_split_across_pieces():
    m = StopMatcher(["STOP"])
    emitted = []
    for piece in ["abc S", "T", "O", "Pxyz"]:
        text, hit = m.feed(piece)
        emitted.append(text)
        assert "S" not in "".join(emitted)  # never a partial stop string
    assert hit and "".join(emitted) == "abc "


def test_stop_false_prefix_released():
    assert feed_all(StopMatcher(["STOP"]), ["ST", "OR", "E"]) == ("STORE", False)
    m = StopMatcher(["STOP"])
    assert m.feed("xxST") == ("xx", False)
    assert m.feed("A") == ("STA", False)


def test_earliest_of_several_stops_wins():
    assert feed_all(StopMatcher(["world", "lo w"]), ["hel", "lo wor", "ld"]) == ("hel", True)
    assert feed_all(StopMatcher(["\n\n", "END"]), ["a\n", "\nEND"]) == ("a", True)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abS", max_size=30), st.lists(st.integers(1, 5), min_size=1, max_size=30), st.text(alphabet="abS", min_size=1, max_size=3))
def test_matcher_equals_find_on_whole_text(text, cuts, stop):
    pieces, i = [], 0
    for c in cuts:
        pieces.append(text[i : i + c])
        i += c
    pieces.append(text[i:])
    pos = text.find(stop)
    expect = (text, False) if pos < 0 else (text[:pos], True)
    assert feed_all(StopMatcher([stop]), pieces) == expect


def test_choice_state_stop_string_across_tokens(tok):
    text = "The quick brown fox jumps"
    ids = tok.encode(text, add_special_tokens=False)
    stop = "ck bro"
    pieces = [tok.decode([i]) for i in ids]
    assert not any(stop in p for p in pieces)  # it only exists across a token boundary
    state = ChoiceState(0, tok, [], [stop], min_tokens=0)
    texts = []
    for t in ids:
        up = state.feed(ChoiceDelta(index=0, token_ids=[t]))
        if up is not None:
            texts.append(up.text)
        if state.finish_reason:
            break
    assert "".join(texts) == "The qui" and state.finish_reason == "stop"
    assert state.stop_hit


def test_choice_state_eos_not_in_text_and_flush(tok):
    ids = tok.encode("café", add_special_tokens=False)
    state = ChoiceState(0, tok, [], [], min_tokens=0)
    up = state.feed(ChoiceDelta(index=0, token_ids=ids + [tok.eos_token_id], finish_reason="stop"))
    assert up.text == "café" and up.finish_reason == "stop" and state.num_tokens == len(ids) + 1


def test_choice_state_min_tokens_defers_stop(tok):
    """Stop strings apply to the text generated after the first min_tokens tokens."""
    ids = tok.encode("ab ab ab", add_special_tokens=False)  # a b ' a' b ' a' b
    assert len(ids) == 6
    state = ChoiceState(0, tok, [], ["ab"], min_tokens=4)
    texts = [state.feed(ChoiceDelta(index=0, token_ids=[t])).text for t in ids]
    assert state.finish_reason == "stop" and "".join(texts) == "ab ab "
