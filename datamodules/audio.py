"""Audio I/O and THE resampling function of the project.

Every waveform in the project is a 1-D ``np.float32`` array in [-1, 1] paired with its sample rate.
The speech *input* side (fbank features, encoder) runs at :data:`INPUT_SAMPLE_RATE` (16 kHz); the
speech *output* side (codec / vocoder targets) runs at :data:`OUTPUT_SAMPLE_RATE` (24 kHz). Any
rate conversion goes through :func:`resample` (soxr, quality ``"HQ"``) so that all stages agree
bit-for-bit on how audio is resampled.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

INPUT_SAMPLE_RATE = 16000
OUTPUT_SAMPLE_RATE = 24000
RESAMPLE_QUALITY = "HQ"

AudioSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO


class AudioDecodeError(RuntimeError):
    """Raised when audio cannot be read; the message names the source and the reason."""


class TruncatedAudioError(AudioDecodeError):
    """Raised when a file decodes to fewer frames than its header announces."""


def _describe(src: AudioSource) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes in memory>"
    return f"<stream {getattr(src, 'name', type(src).__name__)}>"


def _open_target(src: AudioSource):
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src))
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    return src


def load_audio(src: AudioSource) -> tuple[np.ndarray, int]:
    """Decode an audio file (path, raw bytes or binary stream) with soundfile.

    Returns ``(wav [N] float32 in [-1, 1], sample_rate)``; multi-channel audio is downmixed by
    averaging the channels. Raises :class:`AudioDecodeError` (naming the source and the reason) if
    the file is missing, not audio, corrupt, or :class:`TruncatedAudioError` if it ends before
    the number of frames announced in its header.
    """
    name = _describe(src)
    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise AudioDecodeError(f"cannot read audio {name}: no such file")
    try:
        with sf.SoundFile(_open_target(src)) as f:
            sr = int(f.samplerate)
            expected = int(f.frames)
            data = f.read(dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError, EOFError, OSError) as exn:
        raise AudioDecodeError(f"cannot decode audio {name}: {exn}") from exn
    if expected > 0 and data.shape[0] < expected:
        raise TruncatedAudioError(
            f"truncated audio {name}: decoded {data.shape[0]} of {expected} frames announced in the header"
        )
    wav = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)
    return np.ascontiguousarray(wav, dtype=np.float32), sr


def audio_info(src: AudioSource) -> tuple[int, int, int, str]:
    """Read only the header: ``(sample_rate, num_frames, channels, format)`` e.g. ``"FLAC"``."""
    name = _describe(src)
    if isinstance(src, (str, os.PathLike)) and not Path(src).is_file():
        raise AudioDecodeError(f"cannot read audio {name}: no such file")
    try:
        info = sf.info(_open_target(src))
    except (sf.SoundFileError, RuntimeError, ValueError, OSError) as exn:
        raise AudioDecodeError(f"cannot read audio header of {name}: {exn}") from exn
    return int(info.samplerate), int(info.frames), int(info.channels), str(info.format)


def resample(wav: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample ``wav [N]`` (or ``[N, C]``) from ``sr_in`` to ``sr_out`` with soxr "HQ".

    Returns the input object unchanged when the rates match. The output has
    ``round(N * sr_out / sr_in)`` samples and the input's dtype (float32 for project audio).
    """
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    if int(sr_in) == int(sr_out):
        return wav
    if wav.shape[0] == 0:
        return wav[:0].copy()
    return soxr.resample(wav, sr_in, sr_out, quality=RESAMPLE_QUALITY)


def to_rate(wav: np.ndarray, sr: int, target: int) -> np.ndarray:
    """Convert any waveform to the project convention at ``target`` Hz.

    Accepts int16 / int32 / float64 / float32 input of shape ``[N]`` or ``[N, C]`` and returns a
    mono float32 ``[M]`` array at ``target`` Hz (int PCM is scaled to [-1, 1], channels averaged),
    resampled with :func:`resample`.
    """
    wav = np.asarray(wav)
    if np.issubdtype(wav.dtype, np.integer):
        wav = wav.astype(np.float32) / float(-np.iinfo(wav.dtype).min)
    wav = wav.astype(np.float32, copy=False)
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    elif wav.ndim != 1:
        raise ValueError(f"expected a waveform of shape [N] or [N, C], got {wav.shape}")
    return np.ascontiguousarray(resample(wav, sr, target), dtype=np.float32)


def encode_flac(wav: np.ndarray, sr: int) -> bytes:
    """Encode ``wav [N]`` (float in [-1, 1], clipped) as FLAC PCM_16 at ``sr`` Hz; returns the bytes."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1.0, 1.0), int(sr), format="FLAC", subtype="PCM_16")
    return buf.getvalue()
