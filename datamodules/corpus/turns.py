"""User turns for the state classifier: when has the user finished, and does it call for an answer?

The corpus tool (`tools.make_corpus`, kind `turns`) speaks, in the voices of each split,
material of six kinds, each with silence before and after:

* `question`: a spoken QA question (state 1 at its end: answer);
* `paused_question`: the same with a pause of 0.3-1.0 s at a word boundary in its middle third
  (state 0 through the pause: the question is not complete);
* `backchannel` ("uh huh", "okay", ...), `filler` ("um", "hmm", ...), `noise` (no speech:
  white, brown or humming noise, clicks) and `not_addressed` (a statement, often to someone by
  name): state 2 at the end (the user has stopped, do not answer).

`chunk_labels` turns a turn's true end of speech into one label per 160 ms chunk, the rate at
which the classifier decides: 0 while the chunk ends before the end of speech (pauses
included), IGNORE for the first chunk after it (it holds under 160 ms of silence, which a
short gap between words also gives), then the turn's label.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class TurnsDataConfig:
    """The turns shards (`data.turns`) and the batch sizes of stage input_4_state."""

    train_shards: str | None = None
    dev_shards: str | None = None
    test_shards: str | None = None
    record_batch: int = 16  # turns per forward pass of the frozen speech LLM when recording states
    batch_size: int = 512  # recorded chunk states per training step of the head
    limit: int = 0  # stage input_4_state records the first N training turns only; 0 = all (`make demo`)
    # Share of the recorded turns (train, dev and the report's test turns) that follow an earlier
    # exchange: a question heard and answered by the frozen LLM (`modules.state_classifier.exchange_embeddings`)
    context_prob: float = 0.0


LISTEN, ANSWER, DROP, IGNORE = 0, 1, 2, 3
STATE_NAMES = {LISTEN: "listen", ANSWER: "answer", DROP: "drop"}
CHUNK_S = 0.16  # one decision per 160 ms chunk of audio (the encoder's 4 frames)

KIND_SHARES = {  # share of each kind among a split's turns
    "question": 0.35,
    "paused_question": 0.20,
    "backchannel": 0.12,
    "filler": 0.08,
    "noise": 0.10,
    "not_addressed": 0.15,
}
KIND_LABEL = {"question": ANSWER, "paused_question": ANSWER} | {
    k: DROP for k in ("backchannel", "filler", "noise", "not_addressed")
}
BACKCHANNELS = (
    "uh huh", "okay", "mm hmm", "right", "yeah", "I see", "got it", "sure", "oh really", "yes yes",
    "alright", "cool", "oh okay", "I know", "mhm",
)  # fmt: skip
FILLERS = ("um", "uh", "hmm", "er", "um um", "well um", "uh hmm", "ah")
NAMES = ("Tom", "Anna", "Mike", "Sara", "David", "Lucy", "Peter", "Emma", "Jack", "Mia")
LEAD_S = (0.1, 0.5)  # silence before the turn
PAUSE_S = (0.3, 1.0)  # the pause inside a paused question
TAIL_S = 1.3  # silence after the end: 8 decisions
NOISE_S = (0.3, 1.2)


def _split_words(text: str, rng: random.Random) -> tuple[str, str] | None:
    """Two halves of `text` at a word boundary in its middle third (None if under 4 words)."""
    words = text.split()
    if len(words) < 4:
        return None
    lo, hi = max(1, len(words) // 3), max(2, (2 * len(words)) // 3)
    k = rng.randint(lo, hi)
    return " ".join(words[:k]), " ".join(words[k:])


def plan_turns(n: int, questions: list[str], statements: list[str], rng: random.Random) -> list[dict[str, Any]]:
    """`n` turns: {"kind", "label", "text", "pieces"}; pieces are ("speech", text), ("silence",
    seconds) or ("noise", type, seconds), lead and tail silence included."""
    kinds = list(KIND_SHARES)
    counts = {k: round(n * KIND_SHARES[k]) for k in kinds}
    counts["question"] += n - sum(counts.values())
    order = [k for k in kinds for _ in range(counts[k])]
    rng.shuffle(order)
    turns = []
    for kind in order:
        lead = ("silence", round(rng.uniform(*LEAD_S), 3))
        if kind in ("question", "paused_question"):
            text = rng.choice(questions)
            halves = _split_words(text, rng) if kind == "paused_question" else None
            if kind == "paused_question" and halves is None:
                kind = "question"
            if halves:
                body = [("speech", halves[0]), ("silence", round(rng.uniform(*PAUSE_S), 3)), ("speech", halves[1])]
            else:
                body = [("speech", text)]
        elif kind == "backchannel":
            text = rng.choice(BACKCHANNELS)
            body = [("speech", text)]
        elif kind == "filler":
            text = rng.choice(FILLERS)
            body = [("speech", text)]
        elif kind == "noise":
            text = ""
            body = [("noise", rng.choice(["white", "brown", "hum", "clicks"]), round(rng.uniform(*NOISE_S), 3))]
        else:  # not_addressed: a statement, half of them to someone by name
            text = rng.choice(statements)
            if rng.random() < 0.5:
                text = f"{rng.choice(NAMES)}, {text[0].lower()}{text[1:]}"
            body = [("speech", text)]
        turns.append({"kind": kind, "label": KIND_LABEL[kind], "text": text,
                      "pieces": [lead, *body, ("silence", TAIL_S)]})  # fmt: skip
    return turns


def active_span(audio: np.ndarray, rate: int, frame_s: float = 0.01) -> tuple[int, int] | None:
    """(first, last + 1) sample of the 10 ms frames whose RMS reaches 2% of the loudest frame's
    (and 0.003 absolute); None if no frame does."""
    hop = max(1, int(rate * frame_s))
    n = len(audio) // hop
    if n == 0:
        return None
    rms = np.sqrt((audio[: n * hop].reshape(n, hop).astype(np.float64) ** 2).mean(1))
    loud = np.flatnonzero(rms >= max(0.003, 0.02 * rms.max()))
    if loud.size == 0:
        return None
    return int(loud[0]) * hop, (int(loud[-1]) + 1) * hop


def make_noise(kind: str, seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    level = rng.uniform(0.03, 0.2)
    if kind == "white":
        x = rng.standard_normal(n)
    elif kind == "brown":
        x = np.cumsum(rng.standard_normal(n))
        x = x - np.convolve(x, np.ones(256) / 256, mode="same")  # no drift
    elif kind == "hum":
        t = np.arange(n) / rate
        f = rng.choice([50.0, 60.0, 120.0])
        x = np.sin(2 * np.pi * f * t) + 0.5 * np.sin(4 * np.pi * f * t) + 0.05 * rng.standard_normal(n)
    elif kind == "clicks":
        x = np.zeros(n)
        for pos in rng.integers(0, max(1, n - 64), size=max(2, int(seconds * rng.uniform(4, 12)))):
            x[pos : pos + 64] += rng.standard_normal(64) * np.hanning(64) * 4
    else:
        raise ValueError(f"unknown noise type {kind!r}")
    x = x / max(np.abs(x).max(), 1e-9)
    return (level * x).astype(np.float32)


def assemble_turn(pieces: list, synthesize, rate: int, key: str) -> tuple[np.ndarray, list[list[float]]]:
    """Audio of a turn's pieces (`synthesize(text) -> float32 audio at rate`) and its sound spans
    [[start_s, end_s], ...] (speech or noise, silence trimmed by `active_span`)."""
    seed = zlib.crc32(key.encode())
    parts, spans, pos = [], [], 0
    for piece in pieces:
        if piece[0] == "silence":
            audio = np.zeros(round(piece[1] * rate), np.float32)
        elif piece[0] == "speech":
            audio = np.asarray(synthesize(piece[1]), np.float32)
        elif piece[0] == "noise":
            audio = make_noise(piece[1], piece[2], rate, seed)
        else:
            raise ValueError(f"unknown piece {piece!r}")
        if piece[0] != "silence":
            span = active_span(audio, rate)
            if span is not None:
                spans.append([round((pos + span[0]) / rate, 4), round((pos + span[1]) / rate, 4)])
        parts.append(audio)
        pos += len(audio)
    return np.concatenate(parts) if parts else np.zeros(0, np.float32), spans


def chunk_labels(num_chunks: int, end_s: float, label: int, chunk_s: float = CHUNK_S) -> np.ndarray:
    """One label per chunk (module docstring): chunk c decides at (c + 1) * chunk_s."""
    t = (np.arange(num_chunks) + 1) * chunk_s
    out = np.full(num_chunks, label, dtype=np.int64)
    out[t <= end_s + 1e-9] = LISTEN
    out[(t > end_s + 1e-9) & (t <= end_s + chunk_s + 1e-9)] = IGNORE
    return out
