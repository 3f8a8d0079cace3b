"""The adapter: encoder frames (25 Hz) -> LLM input embeddings (12.5 Hz).

    x [B, T, D_enc] -> causal Conv1d(k=5, stride 2) -> LayerNorm -> GELU -> Linear -> [B, ceil(T/2), D_llm]

The convolution is causal (k - 1 zeros on the left), so output t depends on encoder frames
2t - 4 .. 2t only. Streaming keeps the unconsumed input tail in an `AdapterState` (the conv
cache); its outputs equal the offline ones. With the paper's sizes (1024 -> 2048 -> 3584 for
Qwen2-7B) it has 17,835,520 parameters.

Lexical path (`lexical: true`, off in the paper's configs). The stage-1 CTC head, carried
over into the adapter, turns every encoder frame into a distribution over its units; each
unit has a fixed vector (the `lexicon`): the frozen LLM's input embedding of that token when
the units are LLM tokens (`ctc.units=llm`), else the mean of the embeddings of its text, so
a frame's distribution gives the embedding of the word it hears. Output t adds the sum of
these over the `stride` newest frames of its window (a CTC spike lands in one frame, so a
word shows up once) to the conv path, whose last Linear starts near zero. Training
starts from speech that already reads like the words, which a small frozen LLM needs: it
cannot learn to read arbitrary vectors from a few hours of speech (README: Speech input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AdapterConfig:
    kernel_size: int = 5
    stride: int = 2
    hidden_dim: int = 0  # conv output channels; 0 = 2 x the encoder width (the paper's 2048)
    norm_eps: float = 1e-3
    lexical: bool = False  # add the lexical path (module docstring); needs the stage-1 CTC head


@dataclass
class AdapterState:
    """buffer: [B, m, D_enc] input frames (left zeros at the start) the next output starts at."""

    buffer: torch.Tensor

    def clone(self) -> AdapterState:
        return AdapterState(self.buffer.clone())

    def state_dict(self) -> dict:
        return {"buffer": self.buffer}

    @classmethod
    def from_state_dict(cls, d: dict) -> AdapterState:
        return cls(d["buffer"])


def adapter_length(num_frames: torch.Tensor | int, stride: int = 2) -> torch.Tensor | int:
    """Outputs for `num_frames` inputs of the causal strided conv: ceil(T / stride)."""
    if isinstance(num_frames, torch.Tensor):
        return torch.div(num_frames + stride - 1, stride, rounding_mode="floor")
    return (num_frames + stride - 1) // stride


class SpeechAdapter(nn.Module):
    """Causal strided conv adapter from the encoder width to the LLM width."""

    def __init__(self, cfg: AdapterConfig, input_dim: int, output_dim: int, num_units: int = 0):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden_dim or 2 * input_dim
        self.input_dim, self.output_dim = input_dim, output_dim
        self.conv = nn.Conv1d(input_dim, hidden, cfg.kernel_size, cfg.stride)
        self.norm = nn.LayerNorm(hidden, eps=cfg.norm_eps)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, output_dim)
        if cfg.lexical:
            if num_units < 2:
                raise ValueError("adapter.lexical needs the stage-1 CTC units (num_units >= 2)")
            self.ctc = nn.Linear(input_dim, num_units)  # the stage-1 CTC output layer, fine-tuned
            self.register_buffer("lexicon", torch.zeros(num_units, output_dim))  # unit -> LLM vector
            with torch.no_grad():  # the conv path starts near zero (not at zero: it must get gradients)
                self.proj.weight.mul_(0.01)
                self.proj.bias.zero_()

    def init_lexical(self, ctc_weight: torch.Tensor, ctc_bias: torch.Tensor, lexicon: torch.Tensor) -> None:
        """Start the lexical path from the stage-1 CTC output layer and the unit vectors [V, D_llm]."""
        if lexicon.shape != self.lexicon.shape or ctc_weight.shape != self.ctc.weight.shape:
            raise ValueError(
                f"the stage-1 CTC layer {tuple(ctc_weight.shape)} and lexicon {tuple(lexicon.shape)} do not fit "
                f"this adapter's lexical path: CTC layer {tuple(self.ctc.weight.shape)}, lexicon {tuple(self.lexicon.shape)}"
            )
        with torch.no_grad():
            self.ctc.weight.copy_(ctc_weight)
            self.ctc.bias.copy_(ctc_bias)
            self.lexicon.copy_(lexicon)

    def _frames(self, x: torch.Tensor) -> torch.Tensor:
        """What the adapter keeps per encoder frame: x, plus the frame's word vector (lexical path)."""
        if not self.cfg.lexical:
            return x
        probs = self.ctc(x).float().softmax(-1)
        return torch.cat([x, (probs @ self.lexicon.float()).to(x.dtype)], dim=-1)

    def _project(self, padded: torch.Tensor) -> torch.Tensor:
        """padded [B, T + k - 1, D_frame] (left context included) -> [B, T', D_llm]."""
        enc = padded[..., : self.input_dim]
        h = self.conv(enc.transpose(1, 2)).transpose(1, 2)
        out = self.proj(self.act(self.norm(h)))
        if self.cfg.lexical:
            k, s = self.cfg.kernel_size, self.cfg.stride
            n = out.shape[1]
            words = padded[:, k - s : k - s + s * n, self.input_dim :]  # the stride newest frames of each window
            out = out + words.reshape(words.shape[0], n, s, -1).sum(2).to(out.dtype)
        return out

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D_enc], x_lens [B] -> (out [B, ceil(T/2), D_llm], out_lens [B])."""
        if x.shape[1] == 0:
            return x.new_zeros(x.shape[0], 0, self.output_dim), torch.zeros_like(x_lens)
        padded = nn.functional.pad(self._frames(x), (0, 0, self.cfg.kernel_size - 1, 0))
        return self._project(padded), adapter_length(x_lens, self.cfg.stride)

    def init_state(self, batch_size: int = 1) -> AdapterState:
        w = self.conv.weight
        width = self.input_dim + (self.output_dim if self.cfg.lexical else 0)
        return AdapterState(torch.zeros(batch_size, self.cfg.kernel_size - 1, width, device=w.device, dtype=w.dtype))

    def stream(self, x: torch.Tensor, state: AdapterState) -> tuple[torch.Tensor, AdapterState]:
        """Feed encoder frames `x [B, t, D_enc]`; return (new embeddings [B, n, D_llm], new state)."""
        buf = torch.cat([state.buffer, self._frames(x.to(state.buffer.dtype))], dim=1)
        k, s = self.cfg.kernel_size, self.cfg.stride
        n = (buf.shape[1] - k) // s + 1 if buf.shape[1] >= k else 0
        if n == 0:
            return buf.new_zeros(buf.shape[0], 0, self.output_dim), AdapterState(buf)
        out = self._project(buf[:, : s * (n - 1) + k])
        return out, AdapterState(buf[:, s * n :])
