"""Kaldi-compatible log-mel filterbank features, global CMVN and SpecAugment.

Features follow the Freeze-Omni / WeNet recipe: 80 mel bins, 25 ms windows every 10 ms, povey
window, pre-emphasis 0.97, no dither by default, ``snip_edges=True`` (so ``T = 1 + (N - 400) // 160``
frames for ``N >= 400`` samples at 16 kHz), computed on samples scaled to the int16 range as Kaldi
expects. :func:`fbank` (offline) and :class:`StreamingFbank` (chunked, for the streaming encoder /
server) use the same options and give the same frames.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypeVar

import kaldi_native_fbank as knf
import numpy as np
import torch

from datamodules.audio import INPUT_SAMPLE_RATE

NUM_MEL_BINS = 80
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
INT16_SCALE = 32768.0

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def fbank_options(
    sample_rate: int = INPUT_SAMPLE_RATE, num_mel_bins: int = NUM_MEL_BINS, dither: float = 0.0
) -> knf.FbankOptions:
    """The project's ``knf.FbankOptions`` (see module docstring)."""
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = float(sample_rate)
    opts.frame_opts.frame_length_ms = FRAME_LENGTH_MS
    opts.frame_opts.frame_shift_ms = FRAME_SHIFT_MS
    opts.frame_opts.dither = float(dither)
    opts.frame_opts.snip_edges = True
    opts.frame_opts.window_type = "povey"
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.mel_opts.num_bins = int(num_mel_bins)
    opts.energy_floor = 0.0
    return opts


def num_frames(num_samples: int, sample_rate: int = INPUT_SAMPLE_RATE) -> int:
    """Number of fbank frames produced for ``num_samples`` samples (snip_edges=True)."""
    win = int(sample_rate * FRAME_LENGTH_MS / 1000)
    hop = int(sample_rate * FRAME_SHIFT_MS / 1000)
    return 0 if num_samples < win else 1 + (num_samples - win) // hop


def _as_kaldi_samples(wav: np.ndarray) -> np.ndarray:
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"fbank expects a mono waveform [N], got shape {wav.shape}")
    return np.ascontiguousarray(wav, dtype=np.float32) * np.float32(INT16_SCALE)


def _collect(extractor: knf.OnlineFbank, start: int, stop: int, num_mel_bins: int) -> np.ndarray:
    if stop <= start:
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    return np.stack([extractor.get_frame(i) for i in range(start, stop)]).astype(np.float32, copy=False)


def fbank(
    wav: np.ndarray, sample_rate: int = INPUT_SAMPLE_RATE, num_mel_bins: int = NUM_MEL_BINS, dither: float = 0.0
) -> np.ndarray:
    """Offline log-mel fbank of ``wav [N]`` (float in [-1, 1] at ``sample_rate``, normally 16 kHz).

    Returns ``feats [T, num_mel_bins]`` float32 with ``T = num_frames(N)``.
    """
    extractor = knf.OnlineFbank(fbank_options(sample_rate, num_mel_bins, dither))
    extractor.accept_waveform(float(sample_rate), _as_kaldi_samples(wav))
    extractor.input_finished()
    return _collect(extractor, 0, extractor.num_frames_ready, num_mel_bins)


class StreamingFbank:
    """Chunked fbank extraction giving exactly the frames of :func:`fbank` on the concatenation.

    >>> stream = StreamingFbank()
    >>> feats = [stream.accept(chunk) for chunk in chunks]  # each [t_i, 80], t_i may be 0

    Frames already returned are released from the underlying ``knf.OnlineFbank``.
    """

    def __init__(
        self, sample_rate: int = INPUT_SAMPLE_RATE, num_mel_bins: int = NUM_MEL_BINS, dither: float = 0.0
    ) -> None:
        self.sample_rate = int(sample_rate)
        self.num_mel_bins = int(num_mel_bins)
        self.dither = float(dither)
        self.reset()

    def reset(self) -> None:
        """Start a new utterance."""
        self._extractor = knf.OnlineFbank(fbank_options(self.sample_rate, self.num_mel_bins, self.dither))
        self._next = 0  # frames of this extractor returned so far
        self._offset = 0  # frames of the utterance returned before this extractor (a restored state)
        self._finished = False
        self._tail = np.zeros(0, np.float32)  # samples from the next frame's start on (the resumable state)

    @property
    def num_frames_emitted(self) -> int:
        """Frames returned so far for the current utterance."""
        return self._offset + self._next

    def accept(self, chunk: np.ndarray) -> np.ndarray:
        """Feed ``chunk [n]`` (float in [-1, 1]); return the newly completed frames ``[t, num_mel_bins]``."""
        if self._finished:
            raise RuntimeError("StreamingFbank.accept() after finish(); call reset() for a new utterance")
        if len(chunk) > 0:
            self._extractor.accept_waveform(float(self.sample_rate), _as_kaldi_samples(chunk))
            self._tail = np.concatenate([self._tail, np.asarray(chunk, np.float32)])
        return self._drain()

    def finish(self) -> np.ndarray:
        """Flush the end of the utterance (no extra frame with snip_edges=True); returns ``[t, num_mel_bins]``."""
        self._extractor.input_finished()
        self._finished = True
        return self._drain()

    def _drain(self) -> np.ndarray:
        ready = self._extractor.num_frames_ready
        out = _collect(self._extractor, self._next, ready, self.num_mel_bins)
        if ready > self._next:
            self._extractor.pop(ready - self._next)
            self._tail = self._tail[(ready - self._next) * self._shift :]
            self._next = ready
        return out

    @property
    def _shift(self) -> int:
        return int(self.sample_rate * FRAME_SHIFT_MS / 1000)

    def state_dict(self) -> dict:
        """What resumes this stream exactly (`from_state_dict`): ``tail [n]`` float32, the samples
        from the next frame's start on (each frame depends only on its own window), and
        ``frames``, the frames emitted so far. Tensors and ints only (a session file loads with
        ``torch.load(weights_only=True)``)."""
        if self._finished:
            raise RuntimeError("a finished StreamingFbank has no state to resume")
        return {"tail": torch.from_numpy(self._tail.copy()), "frames": self.num_frames_emitted}

    @classmethod
    def from_state_dict(cls, state: dict, **kwargs) -> StreamingFbank:
        """A stream that continues exactly where the one that gave `state` (`state_dict`) stood."""
        stream = cls(**kwargs)
        stream._offset = int(state["frames"])
        tail = np.asarray(torch.as_tensor(state["tail"]).numpy(), np.float32)
        if len(tail):
            stream._extractor.accept_waveform(float(stream.sample_rate), _as_kaldi_samples(tail))
            stream._tail = tail.copy()
        return stream


class CMVNStats:
    """Accumulates global CMVN statistics (sum and sum of squares per dim, float64)."""

    def __init__(self, dim: int = NUM_MEL_BINS) -> None:
        self.mean_stat = np.zeros(dim, dtype=np.float64)
        self.var_stat = np.zeros(dim, dtype=np.float64)
        self.frame_num = 0

    def add(self, feats: np.ndarray | torch.Tensor) -> None:
        """Accumulate ``feats [T, dim]``."""
        x = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
        x = x.astype(np.float64, copy=False)
        if x.ndim != 2 or x.shape[1] != self.mean_stat.shape[0]:
            raise ValueError(f"expected feats [T, {self.mean_stat.shape[0]}], got {x.shape}")
        self.mean_stat += x.sum(axis=0)
        self.var_stat += np.square(x).sum(axis=0)
        self.frame_num += int(x.shape[0])

    def merge(self, other: CMVNStats) -> None:
        self.mean_stat += other.mean_stat
        self.var_stat += other.var_stat
        self.frame_num += other.frame_num

    def to_dict(self) -> dict:
        """The Freeze-Omni / WeNet ``global_cmvn`` JSON layout."""
        return {
            "mean_stat": self.mean_stat.tolist(),
            "var_stat": self.var_stat.tolist(),
            "frame_num": int(self.frame_num),
        }

    def save(self, path: str | os.PathLike) -> None:
        if self.frame_num == 0:
            raise ValueError("no frames accumulated; refusing to write empty CMVN stats")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")


class GlobalCMVN:
    """Global mean/variance normalisation ``(x - mean) * istd`` over the last dim.

    ``istd = 1 / sqrt(max(var, 1e-20))`` with ``var = var_stat / frame_num - mean**2``, as in the
    Freeze-Omni release (WeNet ``load_cmvn`` JSON format). Works on numpy arrays and torch tensors
    ``[..., dim]``; returns the same type.
    """

    def __init__(self, mean: np.ndarray, istd: np.ndarray) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)
        self.istd = np.asarray(istd, dtype=np.float32)
        if self.mean.shape != self.istd.shape or self.mean.ndim != 1:
            raise ValueError(f"mean {self.mean.shape} and istd {self.istd.shape} must be equal 1-D shapes")
        self._mean_t = torch.from_numpy(self.mean)
        self._istd_t = torch.from_numpy(self.istd)

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_stats(cls, mean_stat, var_stat, frame_num: int) -> GlobalCMVN:
        if frame_num <= 0:
            raise ValueError(f"CMVN frame_num must be positive, got {frame_num}")
        mean = np.asarray(mean_stat, dtype=np.float64) / frame_num
        var = np.asarray(var_stat, dtype=np.float64) / frame_num - mean**2
        istd = 1.0 / np.sqrt(np.maximum(var, 1e-20))
        return cls(mean, istd)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GlobalCMVN:
        """Load ``{"mean_stat": [D], "var_stat": [D], "frame_num": n}`` from ``path``."""
        try:
            stats = json.loads(Path(path).read_text())
            return cls.from_stats(stats["mean_stat"], stats["var_stat"], int(stats["frame_num"]))
        except FileNotFoundError as exn:
            raise FileNotFoundError(f"CMVN file not found: {path}") from exn
        except (KeyError, ValueError, TypeError) as exn:
            raise ValueError(f"bad CMVN file {path}: expected keys mean_stat, var_stat, frame_num ({exn})") from exn

    def __call__(self, feats: ArrayT) -> ArrayT:
        """Normalise ``feats [..., dim]``."""
        if feats.shape[-1] != self.dim:
            raise ValueError(f"CMVN dim {self.dim} does not match feats {tuple(feats.shape)}")
        if isinstance(feats, torch.Tensor):
            mean = self._mean_t.to(device=feats.device, dtype=feats.dtype)
            istd = self._istd_t.to(device=feats.device, dtype=feats.dtype)
            return (feats - mean) * istd
        return ((np.asarray(feats, dtype=np.float32) - self.mean) * self.istd).astype(np.float32, copy=False)


def spec_augment(
    feats: ArrayT,
    rng: np.random.Generator,
    num_freq_masks: int = 2,
    freq_width: int = 10,
    num_time_masks: int = 2,
    time_width: int = 50,
) -> ArrayT:
    """SpecAugment (frequency and time masking) of ``feats [T, F]``; returns a masked copy.

    Each frequency mask zeroes ``w ~ U{0..freq_width}`` consecutive bins starting at
    ``U{0..F-w}``; each time mask zeroes ``w ~ U{0..min(time_width, T)}`` consecutive frames.
    Zero is the feature mean after CMVN. ``rng`` is the only source of randomness (pure function).
    """
    if feats.ndim != 2:
        raise ValueError(f"spec_augment expects feats [T, F], got {tuple(feats.shape)}")
    out = feats.clone() if isinstance(feats, torch.Tensor) else np.array(feats, copy=True)
    num_t, num_f = int(feats.shape[0]), int(feats.shape[1])
    for _ in range(num_freq_masks):
        width = int(rng.integers(0, min(freq_width, num_f) + 1))
        start = int(rng.integers(0, num_f - width + 1))
        out[:, start : start + width] = 0
    for _ in range(num_time_masks):
        width = int(rng.integers(0, min(time_width, num_t) + 1))
        start = int(rng.integers(0, num_t - width + 1))
        out[start : start + width, :] = 0
    return out


def _interp_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of x [N, ...] linearly interpolated at fractional `positions` [M] (clamped)."""
    positions = positions.clamp(0, x.shape[0] - 1)
    lo = positions.floor().long()
    hi = (lo + 1).clamp(max=x.shape[0] - 1)
    w = (positions - lo).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return x[lo] * (1 - w) + x[hi] * w


def warp_augment(
    feats: ArrayT, rng: np.random.Generator, max_time_stretch: float = 0.15, max_freq_warp: float = 0.1
) -> ArrayT:
    """Speed and vocal-tract-length perturbation in the feature domain; returns a new ``[T', F]``.

    Time: the frames are resampled by a rate ``r ~ U(1 - max_time_stretch, 1 + max_time_stretch)``
    (``T' = round(T / r)``). Frequency: the mel axis is scaled by ``a ~ U(1 - max_freq_warp,
    1 + max_freq_warp)`` (bin j takes the value at j * a), which moves formants the way a
    longer or shorter vocal tract does. Cheap enough to run on cached fbank every epoch, where
    waveform speed perturbation would need the audio decoded and the fbank recomputed.
    """
    as_numpy = not isinstance(feats, torch.Tensor)
    x = torch.as_tensor(np.asarray(feats) if as_numpy else feats, dtype=torch.float32)
    if x.ndim != 2:
        raise ValueError(f"warp_augment expects feats [T, F], got {tuple(x.shape)}")
    rate = float(rng.uniform(1 - max_time_stretch, 1 + max_time_stretch))
    alpha = float(rng.uniform(1 - max_freq_warp, 1 + max_freq_warp))
    t_out = max(1, round(x.shape[0] / rate))
    x = _interp_rows(x, torch.arange(t_out, dtype=torch.float32) * rate)
    x = _interp_rows(x.T, torch.arange(x.shape[1], dtype=torch.float32) * alpha).T.contiguous()
    return x.numpy() if as_numpy else x
