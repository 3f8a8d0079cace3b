"""The codec's training-only parts: multi-period and multi-scale discriminators, LSGAN and
feature-matching losses. Inference (`modules.codec.stage.load_codec`) never builds them.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.nn import functional as F


# --- discriminators and losses ------------------------------------------------------------------
def _scores_and_features(
    x: torch.Tensor, convs: nn.ModuleList, post: nn.Module
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A discriminator's conv stack: (flattened scores, every layer's activations for feature matching)."""
    feats = []
    for conv in convs:
        x = F.leaky_relu(conv(x), 0.1)
        feats.append(x)
    x = post(x)
    feats.append(x)
    return x.flatten(1), feats


class PeriodDiscriminator(nn.Module):
    """Waveform folded into [T / p, p] columns, 2-D convs along time (HiFi-GAN's MPD member)."""

    def __init__(self, period: int, widths: tuple[int, ...] = (32, 128, 512, 1024)):
        super().__init__()
        self.period = period
        chans = (1, *widths)
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, (5, 1), stride=(3, 1), padding=(2, 0)) for a, b in itertools.pairwise(chans)
        )
        self.convs.append(nn.Conv2d(widths[-1], widths[-1], (5, 1), padding=(2, 0)))
        self.post = nn.Conv2d(widths[-1], 1, (3, 1), padding=(1, 0))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, c, t = wav.shape
        if t % self.period:
            wav = F.pad(wav, (0, self.period - t % self.period), mode="reflect")
        return _scores_and_features(wav.view(b, c, -1, self.period), self.convs, self.post)


class ScaleDiscriminator(nn.Module):
    """Grouped strided 1-D convs over the waveform (HiFi-GAN's MSD member)."""

    def __init__(self, width: int = 128):
        super().__init__()
        w = width
        specs = [(1, w, 15, 1, 1), (w, w, 41, 2, 4), (w, 2 * w, 41, 2, 16), (2 * w, 4 * w, 41, 4, 16),
                 (4 * w, 8 * w, 41, 4, 16), (8 * w, 8 * w, 41, 1, 16), (8 * w, 8 * w, 5, 1, 1)]  # fmt: skip
        # groups shrink with narrow (CPU-size) widths so that they divide the channels
        self.convs = nn.ModuleList(
            nn.Conv1d(a, b, k, s, padding=k // 2, groups=math.gcd(g, a, b)) for a, b, k, s, g in specs
        )
        self.post = nn.Conv1d(8 * w, 1, 3, padding=1)

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return _scores_and_features(wav, self.convs, self.post)


class Discriminators(nn.Module):
    """MPD (periods 2, 3, 5, 7, 11) + MSD (the waveform, then pooled by 2 and by 4)."""

    def __init__(
        self,
        periods: tuple[int, ...] = (2, 3, 5, 7, 11),
        scales: int = 3,
        scale_width: int = 128,
        period_widths: tuple[int, ...] = (32, 128, 512, 1024),
    ):
        super().__init__()
        self.members = nn.ModuleList(
            [
                *(PeriodDiscriminator(p, tuple(period_widths)) for p in periods),
                *(ScaleDiscriminator(scale_width) for _ in range(scales)),
            ]
        )
        self.num_periods = len(periods)

    def forward(self, wav: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        outs, pooled = [], wav
        for i, member in enumerate(self.members):
            if i > self.num_periods:  # each later scale sees the waveform pooled once more
                pooled = F.avg_pool1d(pooled, 4, 2, padding=2)
            outs.append(member(pooled if i >= self.num_periods else wav))
        return outs


def discriminator_loss(real: list, fake: list) -> torch.Tensor:
    """Least-squares GAN: real scores towards 1, generated ones towards 0."""
    return sum(((1 - r) ** 2).mean() + (f**2).mean() for (r, _), (f, _) in zip(real, fake))


def generator_adversarial_loss(fake: list) -> torch.Tensor:
    return sum(((1 - f) ** 2).mean() for f, _ in fake)


def feature_matching_loss(real: list, fake: list) -> torch.Tensor:
    """L1 between the discriminators' inner activations on real and generated audio."""
    return sum(F.l1_loss(fr, rr.detach()) for (_, rf), (_, ff) in zip(real, fake) for rr, fr in zip(rf, ff))
