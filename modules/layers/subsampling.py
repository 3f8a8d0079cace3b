"""Conv2d front end that subsamples fbank frames by 4 (100 Hz -> 25 Hz, one frame per 40 ms).

Two 3x3 convolutions with stride 2 and no padding, then a linear layer over channels x
frequency. Output frame t sees input frames 4t .. 4t + 6 (a 7-frame receptive field), so a
streaming caller that keeps the unconsumed tail of the input gets exactly the offline output.
"""

from __future__ import annotations

import torch
from torch import nn

RECEPTIVE_FIELD = 7  # input frames behind one output frame
STRIDE = 4  # input frames per output frame


def subsampled_length(num_frames: torch.Tensor | int) -> torch.Tensor | int:
    """Output frames for `num_frames` input frames: floor((floor((T - 1) / 2) - 1) / 2), at least 0."""
    if isinstance(num_frames, torch.Tensor):
        return (torch.div(torch.div(num_frames - 1, 2, rounding_mode="floor") - 1, 2, rounding_mode="floor")).clamp(
            min=0
        )
    return max(0, ((num_frames - 1) // 2 - 1) // 2)


class Conv2dSubsampling4(nn.Module):
    """feats [B, T, F] -> [B, T', D] with T' = subsampled_length(T)."""

    def __init__(self, input_dim: int, channels: int, output_dim: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, 2),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, 2),
            nn.ReLU(),
        )
        freq = ((input_dim - 1) // 2 - 1) // 2
        self.out = nn.Linear(channels * freq, output_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.conv(feats.unsqueeze(1))  # (B, C, T', F')
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f))
