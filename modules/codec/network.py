"""Codec building blocks: 40 Hz single-codebook tokens at 24 kHz (the paper's TiCodec variant).

The component that trains them (stage `output_1_codec`) is `modules.codec.stage.Codec`.

  encoder   waveform [B, 1, S] -> strided convs 3·5·5·8 = 600 -> [B, 512, S / 600] (40 Hz)
  quantizer one codebook of 1024 x 512 (EMA updates, data-initialised, dead codes restarted)
  global    a 128-d voice vector from 8 groups of 1024 x 16 codes (the "global tokens")
  generator HiFi-GAN-style: conv_pre -> 4 transposed-conv upsamplers 8·5·5·3 (512 -> 32 channels),
            each followed by a multi-receptive-field block (residual blocks of kernels 3, 7, 11,
            averaged) -> conv_post -> tanh; the voice vector is added where the channels are 128.

Paper sizes (reference section 5): generator 15,369,857 parameters (this one: 15,368,833), codebooks
655,360 entries. Codebooks are buffers, not parameters: exponential moving averages of the vectors
assigned to each code update them (in training mode only), and checkpoints keep them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class CodecConfig:
    sample_rate: int = 24000
    dim: int = 512  # code vectors, encoder output and generator input width
    encoder_strides: list[int] = field(default_factory=lambda: [3, 5, 5, 8])  # product 600: 40 Hz at 24 kHz
    encoder_channels: int = 32  # first encoder width; doubles at each stride up to `dim`
    upsample_rates: list[int] = field(default_factory=lambda: [8, 5, 5, 3])
    upsample_kernels: list[int] = field(default_factory=lambda: [16, 11, 11, 5])
    resblock_kernels: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilations: list[int] = field(default_factory=lambda: [1, 3, 5])
    encoder_resblock_kernels: list[int] = field(default_factory=lambda: [3, 7, 11])  # fewer = cheaper encoder
    codebook_size: int = 1024
    global_dim: int = 128  # voice vector; added in the generator where the channels equal it
    global_groups: int = 8
    global_codebook_size: int = 1024
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.1  # share of a code's fair EMA count below which it restarts
    commitment_weight: float = 0.25
    # discriminators (training only): MPD periods and widths, MSD scales and base width
    disc_periods: list[int] = field(default_factory=lambda: [2, 3, 5, 7, 11])
    disc_period_widths: list[int] = field(default_factory=lambda: [32, 128, 512, 1024])
    disc_scales: int = 3
    disc_scale_width: int = 128
    # generator loss = mel_weight * log-mel L1 + commitment_weight * VQ
    #                  (+ adversarial_weight * LSGAN + feature_weight * feature matching from step adversarial_start)
    mel_weight: float = 45.0
    adversarial_weight: float = 1.0
    feature_weight: float = 2.0
    adversarial_start: int = 0


def hop_length(cfg: CodecConfig) -> int:
    """Samples per token (600 at the paper's 24 kHz and 40 Hz)."""
    return math.prod(cfg.encoder_strides)


# --- generator ----------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """Residual pairs: a dilated conv then a plain one, each after a leaky ReLU (HiFi-GAN's type 1)."""

    def __init__(self, channels: int, kernel: int, dilations: list[int]):
        super().__init__()
        self.dilated = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=d * (kernel - 1) // 2) for d in dilations
        )
        self.plain = nn.ModuleList(nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for a, b in zip(self.dilated, self.plain):
            x = x + b(F.leaky_relu(a(F.leaky_relu(x, 0.1)), 0.1))
        return x


class Generator(nn.Module):
    """Code vectors [B, 512, T] (+ voice vector [B, 128]) -> waveform [B, 1, 600 T] in [-1, 1]."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        if len(cfg.upsample_rates) != len(cfg.upsample_kernels):
            raise ValueError("codec.upsample_rates and upsample_kernels differ in length")
        if math.prod(cfg.upsample_rates) != hop_length(cfg):
            raise ValueError(
                f"codec.upsample_rates multiply to {math.prod(cfg.upsample_rates)}, "
                f"the encoder strides to {hop_length(cfg)}: they must agree"
            )
        self.conv_pre = nn.Conv1d(cfg.dim, cfg.dim, 7, padding=3)
        self.ups, self.mrfs = nn.ModuleList(), nn.ModuleList()
        ch, self.global_stage = cfg.dim, -1
        for i, (rate, kernel) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernels)):
            if (kernel - rate) % 2:
                raise ValueError(f"codec upsampler {i}: kernel {kernel} - rate {rate} must be even")
            self.ups.append(nn.ConvTranspose1d(ch, ch // 2, kernel, stride=rate, padding=(kernel - rate) // 2))
            ch //= 2
            self.mrfs.append(nn.ModuleList(ResBlock(ch, k, cfg.resblock_dilations) for k in cfg.resblock_kernels))
            if ch == cfg.global_dim:
                self.global_stage = i
        if self.global_stage < 0:
            raise ValueError(f"no generator stage has codec.global_dim = {cfg.global_dim} channels")
        self.conv_post = nn.Conv1d(ch, 1, 7, padding=3)

    def forward(self, x: torch.Tensor, voice: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv_pre(x)
        for i, (up, mrf) in enumerate(zip(self.ups, self.mrfs)):
            x = up(F.leaky_relu(x, 0.1))
            if i == self.global_stage and voice is not None:
                x = x + voice[:, :, None]
            x = sum(block(x) for block in mrf) / len(mrf)
        return torch.tanh(self.conv_post(F.leaky_relu(x, 0.01)))


# --- encoder ------------------------------------------------------------------------------------
class Downsample(nn.Module):
    """Strided conv (kernel 2 x stride) padded so that S samples give exactly S / stride frames."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, kernel = stride, 2 * stride
        self.pad = (kernel - stride) // 2, kernel - stride - (kernel - stride) // 2
        self.conv = nn.Conv1d(cin, cout, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(F.leaky_relu(x, 0.1), self.pad))


class Encoder(nn.Module):
    """Waveform [B, 1, S] -> local vectors [B, 512, S / 600] and the voice feature [B, 128].

    Mirror of the generator: conv_pre, then per stride residual blocks (+ GroupNorm) and a
    strided conv that doubles the channels; the voice feature is read where the channels equal
    `global_dim` (1,600 Hz at the paper's sizes): two convs, a mean over time, Linear, leaky
    ReLU, BatchNorm.
    """

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        ch = cfg.encoder_channels
        self.conv_pre = nn.Conv1d(1, ch, 7, padding=3)
        self.blocks, self.norms, self.downs = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.global_stage = -1
        for i, stride in enumerate(cfg.encoder_strides):
            self.blocks.append(
                nn.ModuleList(ResBlock(ch, k, cfg.resblock_dilations) for k in cfg.encoder_resblock_kernels)
            )
            self.norms.append(nn.GroupNorm(1, ch))
            out = cfg.dim if i == len(cfg.encoder_strides) - 1 else min(2 * ch, cfg.dim)
            self.downs.append(Downsample(ch, out, stride))
            ch = out
            if ch == cfg.global_dim and self.global_stage < 0:
                self.global_stage = i
        if self.global_stage < 0:
            raise ValueError(f"no encoder stage has codec.global_dim = {cfg.global_dim} channels")
        self.conv_post = nn.Conv1d(cfg.dim, cfg.dim, 3, padding=1)
        g = cfg.global_dim
        self.global_convs = nn.Sequential(
            nn.Conv1d(g, g // 2, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv1d(g // 2, g, 3, padding=1)
        )
        self.global_out = nn.Sequential(nn.Linear(g, g), nn.LeakyReLU(0.1), nn.BatchNorm1d(g))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, voice = self.conv_pre(wav), None
        for i, (mrf, norm, down) in enumerate(zip(self.blocks, self.norms, self.downs)):
            x = norm(sum(block(x) for block in mrf) / len(mrf))
            x = down(x)
            if i == self.global_stage:
                voice = self.global_out(self.global_convs(x).mean(-1))
        return self.conv_post(F.leaky_relu(x, 0.1)), voice


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] triangular filters on the HTK mel scale, each normalised to unit area."""
    fmax = fmax or sample_rate / 2

    def mel(f: torch.Tensor) -> torch.Tensor:
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    edges_mel = torch.linspace(float(mel(torch.tensor(fmin))), float(mel(torch.tensor(fmax))), n_mels + 2)
    edges = 700.0 * (10 ** (edges_mel / 2595.0) - 1.0)
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / (mid - lo)
    down = (hi - freqs[None]) / (hi - mid)
    bank = torch.clamp(torch.minimum(up, down), min=0.0)
    return bank * (2.0 / (hi - lo))


class LogMel(nn.Module):
    """Log mel spectrogram for the reconstruction loss (paper: 80 mels, n_fft 1024, hop 240, fmax 8 kHz)."""

    def __init__(
        self, sample_rate: int = 24000, n_fft: int = 1024, hop: int = 240, n_mels: int = 80, fmax: float = 8000
    ):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("bank", mel_filterbank(sample_rate, n_fft, n_mels, 0.0, fmax), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """[B, 1, S] or [B, S] -> [B, n_mels, frames]."""
        spec = torch.stft(wav.reshape(-1, wav.shape[-1]).float(), self.n_fft, self.hop, window=self.window,
                          center=True, return_complex=True).abs()  # fmt: skip
        return torch.log(torch.clamp(self.bank @ spec, min=1e-5))
