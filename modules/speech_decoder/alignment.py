"""Where each text token of an answer is spoken, from eSpeak's word events.

The decoder's training speech is eSpeak's assistant voice, so the synthesizer can say where every
word of a training text starts. `token_fractions` spreads those word starts over the LLM's tokens
(by character position, linearly between word starts) and gives each token's start as a share of
the utterance; times the utterance's codec-token count they are the token durations that
`speech_decoder.duration_positions` trains on (and that its duration head learns to predict).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def token_fractions(
    text: str, offsets: list[tuple[int, int]], words: list[tuple[int, int]], num_samples: int
) -> np.ndarray:
    """Start of each token [m] plus the end (1.0) as shares of the utterance: [m + 1], non-decreasing.

    `offsets` are the tokens' character spans in `text` (a tokenizer's offset mapping), `words`
    the (character index, sample index) of each spoken word's start, `num_samples` the audio's
    length. A token starts at its first non-space character; characters between two word starts
    are spread evenly over the time between them, those after the last word over the time to the
    end of the audio.
    """
    if num_samples <= 0:
        raise ValueError("the utterance has no samples")
    chars = [c for c, _ in words]
    times = [min(max(s, 0), num_samples) for _, s in words]
    if not chars or chars[0] > 0:
        chars, times = [0, *chars], [0, *times]
    chars.append(max(len(text), chars[-1] + 1))
    times.append(num_samples)
    times = np.maximum.accumulate(np.asarray(times, dtype=np.float64))
    starts = []
    for s, e in offsets:
        piece = text[s:e]
        starts.append(s + len(piece) - len(piece.lstrip()) if piece.strip() else s)
    out = np.interp(np.asarray(starts, dtype=np.float64), np.asarray(chars, dtype=np.float64), times) / num_samples
    return np.maximum.accumulate(np.append(out, 1.0))


def decoder_tokens(tokenizer, text: str, leading_space: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
    """The tokens the decoder speaks `text` as, and their character spans in `text`: the plain
    tokenization, or (`speech_decoder.leading_space`) that of " " + text with the spans shifted
    back onto `text` (the space belongs to the first token)."""
    enc = tokenizer((" " if leading_space else "") + text, add_special_tokens=False, return_offsets_mapping=True)
    shift = 1 if leading_space else 0
    return list(enc["input_ids"]), [(max(s - shift, 0), max(e - shift, 0)) for s, e in enc["offset_mapping"]]


class ESpeakAligner:
    """Token start shares (`token_fractions`) of texts spoken in the assistant voice, cached by text.

    A text eSpeak gives no word timings for (nothing it can say) gets its tokens spread evenly;
    `fallbacks` counts those texts and the first one is logged, so a corpus where that is common
    shows it (the decoder stage logs the count as `aligner_fallbacks`)."""

    def __init__(self, tokenizer, leading_space: bool = False):
        self.tokenizer, self.leading_space = tokenizer, leading_space
        self.cache: dict[str, np.ndarray] = {}
        self.fallbacks = 0
        self._tts = None

    def __call__(self, text: str) -> np.ndarray:
        if text not in self.cache:
            from datamodules.corpus.espeak import ESpeak
            from datamodules.corpus.voices import ASSISTANT_VOICE

            self._tts = self._tts or ESpeak()
            ids, offsets = decoder_tokens(self.tokenizer, text, self.leading_space)
            try:
                audio, words = self._tts.synthesize_words(text, ASSISTANT_VOICE)
                self.cache[text] = token_fractions(text, offsets, words, len(audio))
            except (RuntimeError, ValueError) as e:  # nothing to speak: spread the tokens evenly
                if not self.fallbacks:
                    log.warning("no eSpeak word timings for %r (%s): its tokens are spread evenly", text[:80], e)
                self.fallbacks += 1
                m = len(ids)
                self.cache[text] = np.linspace(0.0, 1.0, m + 1)
        return self.cache[text]

    def durations(self, texts: list[str], lengths: list[int], width: int) -> np.ndarray:
        """[B, width] codec tokens per text token (0 past a text's end): each text's shares times
        its number of codec tokens."""
        out = np.zeros((len(texts), width), dtype=np.float32)
        for i, (text, n) in enumerate(zip(texts, lengths)):
            d = np.diff(self(text)) * n
            out[i, : len(d)] = d[:width]
        return out


# The symbols of `TokenPhonemes`: eSpeak's IPA letters (its English voices use a few dozen of
# them; the rest cover its other languages). Id 0 is "no text here", 1 a token with nothing to
# pronounce (punctuation), 2 any symbol not listed.
PHONEME_SYMBOLS = (
    "abcdefghijklmnopqrstuvwxyz"
    "æçðøħŋœɐɑɒɓɔɕɖɗɘəɚɛɜɝɞɟɠɡɢɣɤɥɦɧɨɪɫɬɭɮɯɰɱɲɳɴɵɶɸɹɺɻɽɾʀʁʂʃʄʈʉʊʋʌʍʎʏʐʑʒʔʕʘʙʛʜʝʟʡʢβθχᵻ"
    "ːˑ\u0303\u0329\u032a"
)
NO_PHONEME, SILENT_TOKEN, OTHER_PHONEME = 0, 1, 2
NUM_PHONEME_IDS = 3 + len(PHONEME_SYMBOLS)
_SYMBOL_IDS = {c: 3 + i for i, c in enumerate(PHONEME_SYMBOLS)}
_SKIPPED = set("ˈˌ -‿|")  # stress marks and separators take no time of their own


def phoneme_ids(ipa: str) -> list[int]:
    """eSpeak IPA -> symbol ids (stress marks and spaces dropped, unknown letters OTHER_PHONEME)."""
    return [_SYMBOL_IDS.get(c, OTHER_PHONEME) for c in ipa if c not in _SKIPPED]


class TokenPhonemes:
    """What each LLM token says, as eSpeak's phonemes of its text in the assistant voice's
    language (`speech_decoder.aligned_phonemes`): rows of token ids -> [B, m, P] symbol ids, the
    first P phonemes of each token (SILENT_TOKEN for a token with none, NO_PHONEME after its
    last), cached by token id, so that it depends on the token alone and generation sees what
    training saw. A token phonemized out of its word ("ing") is only approximately right; the
    stand-in's tokens are mostly whole words."""

    def __init__(self, tokenizer, max_phonemes: int):
        if max_phonemes < 1:
            raise ValueError(f"speech_decoder.aligned_phonemes must be at least 1, not {max_phonemes}")
        self.tokenizer = tokenizer
        self.max_phonemes = max_phonemes
        self.cache: dict[int, list[int]] = {}
        self._tts = None

    def token(self, token_id: int) -> list[int]:
        if token_id not in self.cache:
            from datamodules.corpus.espeak import ESpeak
            from datamodules.corpus.voices import ASSISTANT_VOICE

            self._tts = self._tts or ESpeak()
            text = self.tokenizer.decode([token_id])
            ids = phoneme_ids(self._tts.phonemes(text, ASSISTANT_VOICE)) if text.strip() else []
            self.cache[token_id] = ids[: self.max_phonemes] or [SILENT_TOKEN]
        return self.cache[token_id]

    def __call__(self, rows: list[list[int]], width: int) -> np.ndarray:
        """[B, width, P] int64 symbol ids of each row's tokens (NO_PHONEME on padding)."""
        out = np.full((len(rows), width, self.max_phonemes), NO_PHONEME, dtype=np.int64)
        for i, row in enumerate(rows):
            for j, t in enumerate(row[:width]):
                ids = self.token(int(t))
                out[i, j, : len(ids)] = ids
        return out
