"""Voice activity gate of the streaming engine: silero-vad (its model ships in the wheel) on 16 kHz chunks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class VADState:
    """One stream's silero-vad state: context [1, c] (the last samples heard), state [2, 1, 128] (recurrent)."""

    context: torch.Tensor
    state: torch.Tensor

    def state_dict(self) -> dict:
        return {"context": self.context, "state": self.state}

    @classmethod
    def from_state_dict(cls, d: dict) -> VADState:
        return cls(d["context"], d["state"])


# --- VAD -------------------------------------------------------------------------------------------
class VADGate:
    """silero-vad as a function of a per-session state (its packaged model keeps the recurrent
    state and the 64-sample context inside the module; here they live in the session)."""

    WINDOW = 512

    def __init__(self, threshold: float = 0.5):
        from silero_vad import load_silero_vad

        self.model = load_silero_vad()
        self.inner = self.model._model
        self.context = int(self.inner.context_size_samples)
        self.threshold = threshold

    def init_state(self) -> VADState:
        return VADState(torch.zeros(1, self.context), torch.zeros(2, 1, 128))

    @torch.inference_mode()
    def speech_prob(self, state: VADState, chunk: np.ndarray) -> float:
        """Highest speech probability over the chunk's 512-sample windows (16 kHz); updates state."""
        best = 0.0
        x = torch.from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
        for i in range(0, len(x) - self.WINDOW + 1, self.WINDOW):
            window = torch.cat([state.context, x[None, i : i + self.WINDOW]], 1)
            out, state.state = self.inner(window, state.state)
            state.context = window[:, -self.context :]
            best = max(best, float(out.reshape(-1)[0]))
        return best
