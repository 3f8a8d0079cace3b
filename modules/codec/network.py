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
    # "hifigan": the paper's generator (transposed convs at the sample rate, below);
    # "istft": ConvNeXt blocks at istft_hop and an inverse STFT (Vocos-style): most of its work
    # runs at 80 frames a second instead of 24,000 samples, so a CPU trains it in minutes
    generator: str = "hifigan"
    istft_hop: int = 300  # a divisor of the token hop: frames per token = token hop / istft_hop
    istft_n_fft: int = 1200
    istft_width: int = 256
    istft_layers: int = 8
    # "wave": the paper's encoder (strided convs over the waveform, below); "mel": ConvNeXt blocks
    # over a log-mel spectrogram at mel_encoder_hop, then a strided conv down to the token rate
    # (a CPU encodes a second of audio in a few milliseconds)
    encoder: str = "wave"
    mel_encoder_hop: int = 200  # a divisor of the token hop
    mel_encoder_layers: int = 4
    codebook_size: int = 1024
    global_dim: int = 128  # voice vector; added in the generator where the channels equal it
    global_groups: int = 8
    global_codebook_size: int = 1024
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.1  # share of a code's fair EMA count below which it restarts
    # > 0: codes are looked up as unit vectors of this many dimensions (a linear map from `dim`
    # and back; `modules.layers.quantizer.FactorizedQuantizer`); 0: in the full `dim` (the paper)
    code_dim: int = 0
    commitment_weight: float = 0.25
    # > 0: the first this many training steps pass the encoder's vectors to the generator
    # unquantized; the codebooks then start from the vectors of a trained encoder, not of a random
    # one. 0: quantized from the first step (the paper).
    quantize_after: int = 0
    # discriminators (training only): MPD periods and widths, MSD scales and base width
    disc_periods: list[int] = field(default_factory=lambda: [2, 3, 5, 7, 11])
    disc_period_widths: list[int] = field(default_factory=lambda: [32, 128, 512, 1024])
    disc_scales: int = 3
    disc_scale_width: int = 128
    disc_segment: int = 0  # samples per item the discriminators judge (a random window); 0: the whole crop
    # generator loss = mel_weight * log-mel L1 + commitment_weight * VQ
    #                  (+ adversarial_weight * LSGAN + feature_weight * feature matching from step adversarial_start)
    mel_weight: float = 45.0
    # + stft_weight * multi-resolution STFT loss (spectral convergence + log-magnitude L1) over
    # (n_fft, hop) pairs; 0 turns it off
    stft_weight: float = 0.0
    stft_resolutions: list[list[int]] = field(default_factory=lambda: [[512, 120], [1024, 240], [2048, 480]])
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


class ConvNeXtBlock(nn.Module):
    """Depthwise conv (kernel 7) -> LayerNorm -> pointwise MLP (x4, GELU) -> layer scale, residual."""

    def __init__(self, dim: int, layer_scale: float):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.scale = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).transpose(1, 2))
        y = self.down(F.gelu(self.up(y))) * self.scale
        return x + y.transpose(1, 2)


class ISTFTGenerator(nn.Module):
    """Code vectors [B, dim, T] (+ voice vector) -> waveform [B, 1, hop T] through an inverse STFT.

    Each token becomes `hop / istft_hop` frames (a transposed conv); ConvNeXt blocks at that
    frame rate, with the voice vector added at their input, predict every frame's log-magnitude
    and phase of `istft_n_fft // 2 + 1` bins; `torch.istft` (Hann window) makes the samples.
    """

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        hop = hop_length(cfg)
        if hop % cfg.istft_hop:
            raise ValueError(f"codec.istft_hop {cfg.istft_hop} must divide the token hop {hop}")
        self.n_fft, self.hop, self.up, w = cfg.istft_n_fft, cfg.istft_hop, hop // cfg.istft_hop, cfg.istft_width
        up = self.up
        self.conv_pre = nn.Conv1d(cfg.dim, w, 7, padding=3)
        # up frames per token (an odd factor gives one frame too many, cropped in forward)
        self.upsample = nn.ConvTranspose1d(w, w, 2 * up, stride=up, padding=up // 2) if up > 1 else nn.Identity()
        self.voice = nn.Linear(cfg.global_dim, w)
        self.norm = nn.LayerNorm(w)
        self.blocks = nn.ModuleList(ConvNeXtBlock(w, 1.0 / cfg.istft_layers) for _ in range(cfg.istft_layers))
        self.norm_post = nn.LayerNorm(w)
        self.head = nn.Linear(w, cfg.istft_n_fft + 2)
        self.register_buffer("window", torch.hann_window(cfg.istft_n_fft), persistent=False)

    def forward(self, x: torch.Tensor, voice: torch.Tensor | None = None) -> torch.Tensor:
        frames = x.shape[-1] * self.up
        x = self.upsample(self.conv_pre(x))[..., :frames]
        if voice is not None:
            x = x + self.voice(voice)[:, :, None]
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        mag, phase = self.head(self.norm_post(x.transpose(1, 2))).float().chunk(2, dim=-1)
        spec = torch.polar(torch.exp(mag).clamp(max=100.0), phase).transpose(1, 2)
        wav = torch.istft(spec, self.n_fft, self.hop, window=self.window, center=True, length=frames * self.hop)
        return wav[:, None].clamp(-1.0, 1.0)


def _block(cfg: CodecConfig, key: str, choices: dict[str, type]) -> nn.Module:
    """The block `cfg.<key>` names among `choices`, built from cfg."""
    name = getattr(cfg, key)
    if name not in choices:
        raise ValueError(f"codec.{key} must be " + " or ".join(f"'{c}'" for c in choices) + f", got {name!r}")
    return choices[name](cfg)


def build_generator(cfg: CodecConfig) -> nn.Module:
    return _block(cfg, "generator", {"hifigan": Generator, "istft": ISTFTGenerator})


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


class MelEncoder(nn.Module):
    """Waveform [B, 1, S] -> local vectors [B, dim, S / hop] and the voice feature [B, global_dim],
    from an 80-bin log-mel at `mel_encoder_hop`: ConvNeXt blocks at that rate, a strided conv to
    the token rate, ConvNeXt blocks there; the voice feature is a time mean of the first blocks'
    output (Linear, leaky ReLU, BatchNorm, as the waveform encoder's)."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        hop = hop_length(cfg)
        if hop % cfg.mel_encoder_hop:
            raise ValueError(f"codec.mel_encoder_hop {cfg.mel_encoder_hop} must divide the token hop {hop}")
        self.stride, d, layers = hop // cfg.mel_encoder_hop, cfg.dim, cfg.mel_encoder_layers
        self.mel = LogMel(cfg.sample_rate, n_fft=4 * cfg.mel_encoder_hop, hop=cfg.mel_encoder_hop)
        self.conv_pre = nn.Conv1d(80, d, 7, padding=3)
        self.blocks = nn.ModuleList(ConvNeXtBlock(d, 1.0 / layers) for _ in range(layers))
        self.down = nn.Conv1d(d, d, 2 * self.stride, stride=self.stride)
        self.down_pad = self.stride // 2, self.stride - self.stride // 2  # frames / stride vectors out
        self.blocks_post = nn.ModuleList(ConvNeXtBlock(d, 1.0 / layers) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        g = cfg.global_dim
        self.global_out = nn.Sequential(nn.Linear(d, g), nn.LeakyReLU(0.1), nn.BatchNorm1d(g))

    def forward(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        frames = wav.shape[-1] // self.mel.hop
        x = self.mel(wav)[..., :frames]  # [B, 80, frames]
        x = self.conv_pre((x + 5.0) / 4.0)  # log-mel of speech lies around -5 +- 4
        for block in self.blocks:
            x = block(x)
        voice = self.global_out(x.mean(-1))
        x = self.down(F.pad(x, self.down_pad))
        for block in self.blocks_post:
            x = block(x)
        return self.norm(x.transpose(1, 2)).transpose(1, 2), voice


def build_encoder(cfg: CodecConfig) -> nn.Module:
    return _block(cfg, "encoder", {"wave": Encoder, "mel": MelEncoder})


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


class MultiResolutionSTFTLoss(nn.Module):
    """Sum over (n_fft, hop) pairs of spectral convergence and log-magnitude L1 (Hann windows)."""

    def __init__(self, resolutions: list[list[int]]):
        super().__init__()
        self.resolutions = [(int(n), int(h)) for n, h in resolutions]
        for n, _ in self.resolutions:
            self.register_buffer(f"window_{n}", torch.hann_window(n), persistent=False)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y, x = y.reshape(-1, y.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()
        total = y.new_zeros(())
        for n, h in self.resolutions:
            w = getattr(self, f"window_{n}")
            sy = torch.stft(y, n, h, window=w, return_complex=True).abs().clamp(min=1e-5)
            sx = torch.stft(x, n, h, window=w, return_complex=True).abs().clamp(min=1e-5)
            total = total + torch.linalg.norm(sy - sx) / torch.linalg.norm(sx) + F.l1_loss(sy.log(), sx.log())
        return total / len(self.resolutions)
