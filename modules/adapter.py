"""The adapter: encoder frames (25 Hz) -> LLM input embeddings (12.5 Hz).

    x [B, T, D_enc] -> causal Conv1d(k=5, stride 2) -> LayerNorm -> GELU -> Linear -> [B, ceil(T/2), D_llm]

The convolution is causal (k - 1 zeros on the left), so output t depends on encoder frames
2t - 4 .. 2t only. Streaming keeps the unconsumed input tail in an `AdapterState` (the conv
cache); its outputs equal the offline ones. With the paper's sizes (1024 -> 2048 -> 3584 for
Qwen2-7B) it has 17,835,520 parameters.
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


@dataclass
class AdapterState:
    """buffer: [B, m, D_enc] input frames (left zeros at the start) the next output starts at."""

    buffer: torch.Tensor

    def clone(self) -> AdapterState:
        return AdapterState(self.buffer.clone())


def adapter_length(num_frames: torch.Tensor | int, stride: int = 2) -> torch.Tensor | int:
    """Outputs for `num_frames` inputs of the causal strided conv: ceil(T / stride)."""
    if isinstance(num_frames, torch.Tensor):
        return torch.div(num_frames + stride - 1, stride, rounding_mode="floor")
    return (num_frames + stride - 1) // stride


class SpeechAdapter(nn.Module):
    """Causal strided conv adapter from the encoder width to the LLM width."""

    def __init__(self, cfg: AdapterConfig, input_dim: int, output_dim: int):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden_dim or 2 * input_dim
        self.input_dim, self.output_dim = input_dim, output_dim
        self.conv = nn.Conv1d(input_dim, hidden, cfg.kernel_size, cfg.stride)
        self.norm = nn.LayerNorm(hidden, eps=cfg.norm_eps)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, output_dim)

    def _project(self, padded: torch.Tensor) -> torch.Tensor:
        """padded [B, T + k - 1, D_enc] (left context included) -> [B, T', D_llm]."""
        h = self.conv(padded.transpose(1, 2)).transpose(1, 2)
        return self.proj(self.act(self.norm(h)))

    def forward(self, x: torch.Tensor, x_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D_enc], x_lens [B] -> (out [B, ceil(T/2), D_llm], out_lens [B])."""
        if x.shape[1] == 0:
            return x.new_zeros(x.shape[0], 0, self.output_dim), torch.zeros_like(x_lens)
        padded = nn.functional.pad(x, (0, 0, self.cfg.kernel_size - 1, 0))
        return self._project(padded), adapter_length(x_lens, self.cfg.stride)

    def init_state(self, batch_size: int = 1) -> AdapterState:
        w = self.conv.weight
        return AdapterState(
            torch.zeros(batch_size, self.cfg.kernel_size - 1, self.input_dim, device=w.device, dtype=w.dtype)
        )

    def stream(self, x: torch.Tensor, state: AdapterState) -> tuple[torch.Tensor, AdapterState]:
        """Feed encoder frames `x [B, t, D_enc]`; return (new embeddings [B, n, D_llm], new state)."""
        buf = torch.cat([state.buffer, x.to(state.buffer.dtype)], dim=1)
        k, s = self.cfg.kernel_size, self.cfg.stride
        n = (buf.shape[1] - k) // s + 1 if buf.shape[1] >= k else 0
        if n == 0:
            return buf.new_zeros(buf.shape[0], 0, self.output_dim), AdapterState(buf)
        out = self._project(buf[:, : s * (n - 1) + k])
        return out, AdapterState(buf[:, s * n :])
