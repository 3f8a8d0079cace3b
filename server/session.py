"""One conversation's state (`Session`) and what the engine reports about it (`Event`, `Decision`, `Reply`).

A session holds everything of one conversation, the models nothing: the streaming input state
(fbank tail, encoder and adapter caches, the LLM's KV cache: `InputState`), the VAD's recurrent
state and context (`VADState`), the dialogue mode, the pre-roll and turn audio and the history.
`Session.state_dict` is composed of each part's own `state_dict` (tensors and plain values only),
so a session saved to a file (`save` / `load`, `torch.load(weights_only=True)`) continues
exactly as the original would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from modules.speech_llm.streaming import InputState
from server.vad import VADState

SESSION_FORMAT = 2


def _tensors(chunks: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.array(c, np.float32)) for c in chunks]


@dataclass
class Session:
    """All state of one conversation (module docstring)."""

    input: InputState
    vad: VADState
    mode: str = "idle"  # idle | listen | answer (until the engine generates the reply)
    clock: int = 0  # 160 ms input chunks consumed
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # < 160 ms not yet consumed
    preroll: list[np.ndarray] = field(default_factory=list)  # the last chunks heard while idle
    turn_start: int = 0  # LLM positions before the open user turn
    turn_chunks: int = 0  # chunks of the open turn (pre-roll included)
    quiet_chunks: int = 0  # consecutive chunks without speech in the open turn
    turn_audio: list[np.ndarray] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # {"role", "text"} of finished turns

    # --- save / restore ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": SESSION_FORMAT,
            "input": self.input.state_dict(),
            "vad": self.vad.state_dict(),
            "mode": self.mode,
            "clock": self.clock,
            "pending": torch.from_numpy(self.pending.copy()),
            "preroll": _tensors(self.preroll),
            "turn_start": self.turn_start,
            "turn_chunks": self.turn_chunks,
            "quiet_chunks": self.quiet_chunks,
            "turn_audio": _tensors(self.turn_audio),
            "history": [dict(h) for h in self.history],
        }

    @classmethod
    def from_state_dict(cls, d: dict) -> Session:
        if d.get("format") != SESSION_FORMAT:
            raise ValueError(f"session file format {d.get('format')!r}; this code reads format {SESSION_FORMAT}")
        return cls(
            InputState.from_state_dict(d["input"]), VADState.from_state_dict(d["vad"]), d["mode"], int(d["clock"]),
            d["pending"].numpy(), [c.numpy() for c in d["preroll"]], int(d["turn_start"]), int(d["turn_chunks"]),
            int(d["quiet_chunks"]), [c.numpy() for c in d["turn_audio"]], [dict(h) for h in d["history"]],
        )  # fmt: skip

    def save(self, path: str | Path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> Session:
        return cls.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))


@dataclass
class Event:
    kind: str  # turn_start | answer | drop | vad_timeout
    chunk: int  # input chunk index (its end is at (chunk + 1) * 160 ms of input audio)
    probs: list[float] | None = None


@dataclass
class Decision:
    """The state head's reading of the latest chunk."""

    state: int  # LISTEN, ANSWER or DROP (datamodules.corpus.turns)
    probs: list[float]  # P(listen, answer, drop), rounded to 4 decimals (the rule reads these)


@dataclass
class Reply:
    text: str
    segments: list[str]
    audio: np.ndarray  # 24 kHz (empty for a text-only reply)
    pcm_chunks: list[tuple[float, np.ndarray]]  # (seconds after the decision, chunk) as they were produced
    latency_ms: dict[str, float]
    tokens: int
