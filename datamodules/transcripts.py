"""Transcript normalisation, the CTC character vocabulary and word error rate.

One normalisation serves CTC targets, CTC hypotheses and LLM transcripts, so every WER in
the tables compares like with like: lower case, letters, digits and apostrophes kept, hyphens
and slashes become spaces, other punctuation is dropped, whitespace collapsed.
"""

from __future__ import annotations

import re
import unicodedata

from torchmetrics.functional.text import word_error_rate

BLANK = "<blank>"
_SPACE_LIKE = re.compile(r"[-/\u2013\u2014_]+")
_DROP = re.compile(r"[^\w' ]+")
_SPACES = re.compile(r"\s+")


def normalize_transcript(text: str) -> str:
    """'Sofia enjoys playing the piano, on Sundays!' -> 'sofia enjoys playing the piano on sundays'."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    text = _DROP.sub("", _SPACE_LIKE.sub(" ", text))
    return _SPACES.sub(" ", text).strip()


class CharVocab:
    """CTC output units: index 0 is the blank, then one index per character of `chars`."""

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError(f"CTC vocabulary has repeated characters: {chars!r}")
        self.units = [BLANK, *chars]
        self._index = {c: i for i, c in enumerate(self.units) if i > 0}

    def __len__(self) -> int:
        return len(self.units)

    def encode(self, text: str) -> list[int]:
        """Indices of the normalised text; characters outside the vocabulary are dropped."""
        return [self._index[c] for c in normalize_transcript(text) if c in self._index]

    def oov(self, text: str) -> set[str]:
        """Characters of the normalised text the vocabulary lacks."""
        return {c for c in normalize_transcript(text) if c not in self._index}

    def decode(self, ids: list[int]) -> str:
        """Greedy CTC collapse: merge repeats, drop blanks."""
        out, prev = [], 0
        for i in ids:
            if i != prev and i != 0:
                out.append(self.units[i])
            prev = i
        return _SPACES.sub(" ", "".join(out)).strip()


def wer(hypotheses: list[str], references: list[str]) -> float:
    """Corpus word error rate of normalised texts (total edits / total reference words)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    hyps = [normalize_transcript(h) for h in hypotheses]
    refs = [normalize_transcript(r) for r in references]
    return float(word_error_rate(hyps, refs))
