"""Streaming speech synthesis: text segmentation, the speech-token FIFO, codec windows and joins.

Reference sections 3.3 and 4.5, rebuilt (and with the release's slow spots left out):

* `TextSegmenter` cuts the generated answer text into segments for the speech decoder: at a
  piece ending in a sentence end (. ? ! : newline, and their full-width forms) once the segment
  holds `min_tokens` tokens; commas count too for the first segment of an answer and for
  segments already `comma_after` tokens long. "1." (a digit before the period) never cuts.
  Without `clauses` only full stops (. ? ! newline) cut: whole sentences, as the decoder
  learnt to speak them.
* `TokenFIFO` turns a stream of codec tokens into PCM: the first window decodes
  `first_chunk + context` tokens and emits the audio of the first `first_chunk`; later windows
  decode `context + chunk + context` tokens and emit the middle `chunk` (10 tokens = 250 ms of
  context on each side, 20 then 40 tokens per window); `flush` decodes the rest. Consecutive
  windows overlap by `crossfade` samples, joined with a linear cross-fade instead of the
  release's search for a quiet cut, so a join never clicks and never holds audio back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

SENTENCE_ENDS = tuple(".?!:\n。？！：")
COMMAS = tuple(",，")
FULL_STOPS = tuple(".?!\n。？！")  # the only cuts without clauses


class TextSegmenter:
    """Feed generated text pieces (one per LLM token); get segments to speak."""

    def __init__(self, min_tokens: int = 4, comma_after: int = 20, clauses: bool = True):
        self.min_tokens, self.comma_after, self.clauses = min_tokens, comma_after, clauses
        self.text, self.tokens, self.segments_done = "", 0, 0

    def feed(self, piece: str) -> str | None:
        """Add one token's text; returns a finished segment or None."""
        previous = self.text
        self.text += piece
        self.tokens += 1
        stripped = piece.rstrip(" ")
        if not stripped or self.tokens < self.min_tokens:
            return None
        if not self.clauses:
            ends = FULL_STOPS
        elif self.segments_done == 0 or self.tokens >= self.comma_after:
            ends = SENTENCE_ENDS + COMMAS
        else:
            ends = SENTENCE_ENDS
        if not stripped.endswith(ends):
            return None
        if stripped.endswith(".") and stripped == "." and previous.rstrip()[-1:].isdigit():
            return None  # "1." in a list, not a sentence end
        return self._cut()

    def flush(self) -> str | None:
        """The rest of the answer (at EOS), if any."""
        return self._cut() if self.text.strip() else None

    def state_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "segments_done": self.segments_done}

    def load_state_dict(self, d: dict) -> None:
        self.text, self.tokens, self.segments_done = str(d["text"]), int(d["tokens"]), int(d["segments_done"])

    def _cut(self) -> str:
        segment, self.text, self.tokens = self.text.strip(), "", 0
        self.segments_done += 1
        return segment


class ReplyText:
    """A reply's text as its tokens arrive: `piece(ids)` takes all the tokens so far and returns
    the text they add, or None while the last ones end in an incomplete character (they come out
    with the next token)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.text = tokenizer, ""

    def piece(self, ids: list[int]) -> str | None:
        new = self.tokenizer.decode(ids, skip_special_tokens=True)
        piece = new[len(self.text) :]
        if "\ufffd" in piece:
            return None
        self.text = new
        return piece


def split_reply(
    tokenizer, ids: list[int], min_tokens: int = 4, comma_after: int = 20, clauses: bool = True
) -> list[tuple[str, int, int]]:
    """A finished reply's segments as the engine cuts them while it streams: (text, first token,
    end token) each, the tokens fed one at a time through `ReplyText` and `TextSegmenter`."""
    seg, out, start, text = TextSegmenter(min_tokens, comma_after, clauses), [], 0, ReplyText(tokenizer)
    for i in range(len(ids)):
        piece = text.piece(ids[: i + 1])
        if piece is None:
            continue
        done = seg.feed(piece)
        if done:
            out.append((done, start, i + 1))
            start = i + 1
    rest = seg.flush()
    if rest:
        out.append((rest, start, len(ids)))
    return out


class TokenFIFO:
    """Codec tokens in, PCM chunks out (see the module docstring).

    `decode(tokens: list[int]) -> np.ndarray` returns `hop` samples per token.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], np.ndarray],
        hop: int = 600,
        first_chunk: int = 20,
        chunk: int = 40,
        context: int = 10,
        crossfade: int = 240,
    ):
        if crossfade > context * hop:
            raise ValueError(f"crossfade {crossfade} samples exceeds the context of {context} tokens")
        self.decode, self.hop = decode, hop
        self.first_chunk, self.chunk, self.context, self.crossfade = first_chunk, chunk, context, crossfade
        self.tokens: list[int] = []
        self.emitted = 0  # tokens whose audio has been emitted (up to the cross-fade tail)
        self.tail: np.ndarray | None = None  # the last `crossfade` samples, held for the next join

    def state_dict(self) -> dict:
        """The tokens held, how many are emitted and the cross-fade tail [crossfade] (or None);
        the window settings and `decode` belong to the constructor."""
        tail = None if self.tail is None else torch.from_numpy(self.tail.copy())
        return {"tokens": list(self.tokens), "emitted": self.emitted, "tail": tail}

    def load_state_dict(self, d: dict) -> None:
        self.tokens, self.emitted = [int(t) for t in d["tokens"]], int(d["emitted"])
        self.tail = None if d["tail"] is None else np.asarray(torch.as_tensor(d["tail"]).numpy(), np.float32)

    def _window(self, start: int, stop: int, keep_from: int, keep_to: int) -> np.ndarray:
        """Decode tokens[start:stop]; return the samples of tokens[keep_from:keep_to] plus the
        `crossfade` samples after them (when decoded)."""
        audio = self.decode(self.tokens[start:stop])
        a = (keep_from - start) * self.hop
        b = min(len(audio), (keep_to - start) * self.hop + self.crossfade)
        return audio[a:b]

    def _join(self, piece: np.ndarray, final: bool) -> np.ndarray:
        n = self.crossfade
        if self.tail is not None and n:
            ramp = np.linspace(0.0, 1.0, n + 2, dtype=np.float32)[1:-1]
            head = self.tail * (1 - ramp) + piece[:n] * ramp
            piece = np.concatenate([head, piece[n:]])
        if final or not n:
            self.tail = None
            return piece
        self.tail = piece[-n:].copy()
        return piece[:-n]

    def push(self, token: int) -> Iterator[np.ndarray]:
        """Add one token; yields a PCM chunk when a window is complete."""
        self.tokens.append(int(token))
        c, p = self.chunk, self.context
        if self.emitted == 0:
            if len(self.tokens) >= self.first_chunk + p:
                yield self._join(self._window(0, self.first_chunk + p, 0, self.first_chunk), False)
                self.emitted = self.first_chunk
        elif len(self.tokens) >= self.emitted + c + p:
            start = self.emitted - p
            yield self._join(self._window(start, self.emitted + c + p, self.emitted, self.emitted + c), False)
            self.emitted += c

    def flush(self) -> np.ndarray:
        """The audio of every token not yet emitted (at EOS or the length cap)."""
        # A window is emitted only once `context` more tokens exist, so after one there is always
        # a rest to decode (and the cross-fade tail to join it to).
        if len(self.tokens) <= self.emitted:
            return np.zeros(0, dtype=np.float32)
        start = max(0, self.emitted - self.context)
        out = self._join(self._window(start, len(self.tokens), self.emitted, len(self.tokens)), True)
        self.tokens, self.emitted = [], 0
        return out
