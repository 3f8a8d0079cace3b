"""Transcript normalisation, CTC output units (characters, BPE pieces or LLM tokens) and word error rate.

One normalisation serves CTC targets, CTC hypotheses and LLM transcripts, so every WER in
the tables compares like with like: lower case, letters, digits and apostrophes kept, hyphens
and slashes become spaces, other punctuation is dropped, whitespace collapsed.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
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


class BPEUnits:
    """CTC output units from a small BPE over normalised transcripts: index 0 is the blank.

    Word pieces keep the label sequence well below the encoder's 25 Hz frame rate (characters
    need about 0.7 labels per frame on fast synthetic speech, which starves CTC of blanks).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.units = [BLANK] + [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, alphabet: str) -> BPEUnits:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=list(alphabet), show_progress=False)
        tok.train_from_iterator((normalize_transcript(t) for t in texts), trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> BPEUnits:
        return cls(Tokenizer.from_str(text))

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    def __len__(self) -> int:
        return len(self.units)

    def encode(self, text: str) -> list[int]:
        return [i + 1 for i in self.tokenizer.encode(normalize_transcript(text)).ids]

    def oov(self, text: str) -> set[str]:
        alphabet = {u for u in self.units[1:] if len(u) == 1}
        return {c for c in normalize_transcript(text).replace(" ", "") if c not in alphabet}

    def decode(self, ids: list[int]) -> str:
        out, prev = [], 0
        for i in ids:
            if i != prev and i != 0:
                out.append(i - 1)
            prev = i
        return _SPACES.sub(" ", self.tokenizer.decode(out)).strip()


class LLMTokenUnits:
    """CTC output units that are tokens of the LLM's own tokenizer (index 0 is the blank).

    The units are the tokens the normalised training transcripts use, so a frame's CTC
    distribution is a distribution over LLM tokens: the adapter's lexical path then reads
    each unit's exact LLM input embedding (no averaging over the several tokens a word piece
    of a separate BPE would split into). `token_ids` maps unit k to LLM token `token_ids[k-1]`.
    """

    def __init__(self, tokenizer: Tokenizer, token_ids: list[int]):
        self.tokenizer, self.token_ids = tokenizer, list(token_ids)
        self.units = [BLANK] + [tokenizer.id_to_token(i) for i in self.token_ids]
        self._index = {t: k for k, t in enumerate(self.token_ids, start=1)}

    @classmethod
    def from_texts(cls, tokenizer: Tokenizer, texts: Iterable[str]) -> LLMTokenUnits:
        used = {i for t in texts for i in tokenizer.encode(normalize_transcript(t), add_special_tokens=False).ids}
        return cls(tokenizer, sorted(used))

    @classmethod
    def from_json(cls, text: str) -> LLMTokenUnits:
        spec = json.loads(text)
        return cls(Tokenizer.from_str(spec["tokenizer"]), spec["token_ids"])

    def to_json(self) -> str:
        return json.dumps({"tokenizer": self.tokenizer.to_str(), "token_ids": self.token_ids})

    def __len__(self) -> int:
        return len(self.units)

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(normalize_transcript(text), add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        """Unit indices of the normalised text; tokens no training transcript used are dropped."""
        return [self._index[i] for i in self._tokens(text) if i in self._index]

    def oov(self, text: str) -> set[str]:
        return {self.tokenizer.id_to_token(i) for i in self._tokens(text) if i not in self._index}

    def decode(self, ids: list[int]) -> str:
        out, prev = [], 0
        for i in ids:
            if i != prev and i != 0:
                out.append(self.token_ids[i - 1])
            prev = i
        return _SPACES.sub(" ", self.tokenizer.decode(out)).strip()
