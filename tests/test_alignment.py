"""modules/speech_decoder/alignment.py: token start shares from eSpeak's word events."""

from __future__ import annotations

import re

import numpy as np
import pytest

from modules.speech_decoder.alignment import ESpeakAligner, decoder_tokens, token_fractions


def words_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True):
    """One token per word, with a leading space as GPT-style tokenizers have it."""
    spans = [(max(0, m.start() - 1) if m.start() else 0, m.end()) for m in re.finditer(r"\S+", text)]
    return {"input_ids": list(range(len(spans))), "offset_mapping": spans}


def test_tokens_start_where_their_words_are_spoken():
    text = "one two three"
    enc = words_tokenizer(text)
    words = [(0, 100), (4, 500), (8, 600)]  # "three" is spoken late, after a pause
    f = token_fractions(text, enc["offset_mapping"], words, 1000)
    assert f.tolist() == pytest.approx([0.1, 0.5, 0.6, 1.0])
    with pytest.raises(ValueError):
        token_fractions(text, enc["offset_mapping"], words, 0)


def test_shares_never_go_back_even_if_events_do():
    text = "a b c"
    f = token_fractions(text, words_tokenizer(text)["offset_mapping"], [(0, 0), (2, 800), (4, 300)], 1000)
    assert np.all(np.diff(f) >= 0) and f[-1] == 1.0


class SpaceWords:
    """A BPE-like tokenizer: " word" and "word" are different tokens, as in GPT-style vocabularies."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=True):
        found = list(re.finditer(r" ?\S+", text))
        ids = [self.vocab.setdefault(m.group(), len(self.vocab)) for m in found]
        return {"input_ids": ids, "offset_mapping": [m.span() for m in found]}


def test_leading_space_spells_a_sentence_start_as_inside_a_sentence():
    tok = SpaceWords()
    inside, _ = decoder_tokens(tok, "fourteen. Twelve plus two")
    plain, _ = decoder_tokens(tok, "Twelve plus two")
    spaced, offsets = decoder_tokens(tok, "Twelve plus two", leading_space=True)
    assert plain[0] not in inside  # "Twelve" at a text's start is a token never seen inside one
    assert spaced == inside[1:]
    assert offsets == [(0, 6), (6, 11), (11, 15)]  # spans on the text itself
    words = [(0, 0), (7, 400), (12, 700)]
    _, plain_offsets = decoder_tokens(tok, "Twelve plus two")
    assert token_fractions("Twelve plus two", offsets, words, 1000).tolist() == pytest.approx(
        token_fractions("Twelve plus two", plain_offsets, words, 1000).tolist()
    )


class SilentTTS:
    def synthesize_words(self, text, voice):
        raise ValueError("cannot synthesize empty text")


def test_a_text_without_word_timings_is_spread_evenly_and_counted(caplog):
    aligner = ESpeakAligner(words_tokenizer)
    aligner._tts = SilentTTS()
    with caplog.at_level("WARNING"):
        assert aligner("x y z w").tolist() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
        aligner("x y z w")  # cached: not counted twice
        aligner("p q")
    assert aligner.fallbacks == 2
    assert sum("no eSpeak word timings" in r.message for r in caplog.records) == 1  # the first is logged
    d = aligner.durations(["x y z w", "p q"], [40, 10], 4)
    assert d.tolist() == [[10, 10, 10, 10], [5, 5, 0, 0]]
