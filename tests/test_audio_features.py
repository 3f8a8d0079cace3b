"""Audio I/O, resampling, fbank (offline vs streaming), global CMVN and SpecAugment."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules.audio import (
    INPUT_SAMPLE_RATE,
    OUTPUT_SAMPLE_RATE,
    AudioDecodeError,
    encode_flac,
    load_audio,
    resample,
    to_rate,
)
from datamodules.features import (
    NUM_MEL_BINS,
    CMVNStats,
    GlobalCMVN,
    StreamingFbank,
    fbank,
    num_frames,
    spec_augment,
)


def chirp(seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    x = 0.4 * np.sin(2 * np.pi * (150 + 400 * t) * t) + 0.01 * rng.standard_normal(t.shape[0])
    return x.astype(np.float32)


def peak_hz(wav: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.fft.rfftfreq(len(wav), 1 / sr)[np.argmax(spec)])


# ---------------------------------------------------------------------------------------------- audio


def test_load_audio_downmixes_stereo(tmp_path):
    left, right = chirp(0.5, 22050, 1), chirp(0.5, 22050, 2)
    path = tmp_path / "stereo.flac"
    sf.write(path, np.stack([left, right], axis=1), 22050, subtype="PCM_16")
    wav, sr = load_audio(path)
    assert sr == 22050 and wav.dtype == np.float32 and wav.shape == left.shape
    np.testing.assert_allclose(wav, (left + right) / 2, atol=2e-4)
    wav_b, sr_b = load_audio(path.read_bytes())  # bytes work too
    assert sr_b == sr and np.array_equal(wav, wav_b)


def test_load_audio_errors_name_source_and_reason(tmp_path):
    missing = tmp_path / "nope.flac"
    with pytest.raises(AudioDecodeError, match=r"nope\.flac.*no such file"):
        load_audio(missing)
    garbage = tmp_path / "garbage.flac"
    garbage.write_bytes(b"not audio at all" * 20)
    with pytest.raises(AudioDecodeError, match=r"garbage\.flac"):
        load_audio(garbage)
    flac = encode_flac(chirp(1.0, 22050), 22050)
    with pytest.raises(AudioDecodeError):
        load_audio(flac[: len(flac) // 2])  # truncated


@pytest.mark.parametrize(
    ("sr_in", "sr_out"),
    [(22050, INPUT_SAMPLE_RATE), (INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE), (24000, 16000), (44100, 16000)],
)
def test_resample_rates_and_lengths(sr_in, sr_out):
    n = int(0.73 * sr_in)
    t = np.arange(n) / sr_in
    wav = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    out = resample(wav, sr_in, sr_out)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(out.shape[0] - n * sr_out / sr_in) <= 1
    assert abs(peak_hz(out, sr_out) - 440.0) < 3.0
    assert np.sqrt(np.mean(out[200:-200] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_resample_same_rate_is_identity_and_validates():
    wav = chirp(0.1, 16000)
    assert resample(wav, 16000, 16000) is wav
    assert resample(wav[:0], 22050, 16000).shape == (0,)
    with pytest.raises(ValueError):
        resample(wav, 0, 16000)


def test_to_rate_converts_int16_stereo():
    pcm = (np.stack([chirp(0.5, 22050), chirp(0.5, 22050)], axis=1) * 32767).astype(np.int16)
    out = to_rate(pcm, 22050, 16000)
    assert out.dtype == np.float32 and out.ndim == 1 and abs(out.shape[0] - 8000) <= 1
    assert np.abs(out).max() <= 1.0


# ---------------------------------------------------------------------------------------------- fbank


def test_fbank_shape_and_frame_count():
    for n in (399, 400, 401, 560, 16000, 23456):
        feats = fbank(chirp(n / 16000, 16000)[:n])
        assert feats.shape == (num_frames(n), NUM_MEL_BINS) and feats.dtype == np.float32
    assert num_frames(16000) == 98
    assert np.isfinite(fbank(chirp(1.0, 16000))).all()


def test_fbank_expects_int16_scale():
    wav = chirp(0.5, 16000)
    # Kaldi scaling: multiplying the signal by 2 adds log(4) to every (power) mel bin.
    np.testing.assert_allclose(fbank(2 * wav), fbank(wav) + np.log(4.0), atol=1e-3)
    assert fbank(wav).mean() > 5.0  # int16 range, not [-1, 1] (which would give about -5)


@pytest.mark.parametrize("chunk", [2560, 1000, 7])
def test_streaming_fbank_equals_offline(chunk):
    wav = chirp(2.3, 16000, seed=3)
    offline = fbank(wav)
    stream = StreamingFbank()
    parts = [stream.accept(wav[i : i + chunk]) for i in range(0, len(wav), chunk)]
    parts.append(stream.finish())
    online = np.concatenate(parts, axis=0)
    assert online.shape == offline.shape
    np.testing.assert_allclose(online, offline, atol=1e-4, rtol=0)
    assert stream.num_frames_emitted == offline.shape[0]
    with pytest.raises(RuntimeError):
        stream.accept(wav[:10])
    stream.reset()
    assert stream.accept(wav[:2560]).shape == (num_frames(2560), NUM_MEL_BINS)


# ---------------------------------------------------------------------------------------------- CMVN


def test_cmvn_stats_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    scale = np.linspace(0.5, 3.0, NUM_MEL_BINS)
    offset = np.linspace(-2.0, 8.0, NUM_MEL_BINS)
    chunks = [
        (rng.standard_normal((int(rng.integers(50, 300)), NUM_MEL_BINS)) * scale + offset).astype(np.float32)
        for _ in range(12)
    ]
    stats = CMVNStats()
    for c in chunks[:6]:
        stats.add(c)
    other = CMVNStats()
    for c in chunks[6:]:
        other.add(torch.from_numpy(c))
    stats.merge(other)
    path = tmp_path / "cmvn.json"
    stats.save(path)
    raw = json.loads(path.read_text())
    assert set(raw) == {"mean_stat", "var_stat", "frame_num"}
    allf = np.concatenate(chunks).astype(np.float64)
    assert raw["frame_num"] == allf.shape[0]
    np.testing.assert_allclose(raw["mean_stat"], allf.sum(0), rtol=1e-9)
    np.testing.assert_allclose(raw["var_stat"], (allf**2).sum(0), rtol=1e-9)

    cmvn = GlobalCMVN.load(path)
    np.testing.assert_allclose(cmvn.mean, allf.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cmvn.istd, 1 / allf.std(0), rtol=1e-4)
    normed = cmvn(allf.astype(np.float32))
    assert normed.dtype == np.float32
    np.testing.assert_allclose(normed.mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(normed.std(0), 1.0, atol=1e-3)
    as_tensor = cmvn(torch.from_numpy(allf.astype(np.float32)))
    assert isinstance(as_tensor, torch.Tensor)
    np.testing.assert_allclose(as_tensor.numpy(), normed, atol=1e-5)


def test_cmvn_constant_dim_and_bad_files(tmp_path):
    cmvn = GlobalCMVN.from_stats([2.0, 4.0], [2.0, 10.0], 2)  # dim 0 constant: var 0 -> clamped
    assert np.isfinite(cmvn.istd).all() and cmvn.istd[0] == pytest.approx(1e10, rel=1e-3)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mean": [1.0]}))
    with pytest.raises(ValueError, match="mean_stat"):
        GlobalCMVN.load(bad)
    with pytest.raises(FileNotFoundError):
        GlobalCMVN.load(tmp_path / "missing.json")
    with pytest.raises(ValueError):
        cmvn(np.zeros((3, 5), np.float32))


# ---------------------------------------------------------------------------------------------- SpecAugment


def _runs(mask: np.ndarray) -> list[int]:
    """Lengths of runs of True in a 1-D boolean array."""
    runs, n = [], 0
    for v in mask:
        if v:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    if n:
        runs.append(n)
    return runs


def test_spec_augment_masks_only_within_widths():
    feats = torch.ones(300, NUM_MEL_BINS)
    for seed in range(50):
        out = spec_augment(
            feats, np.random.default_rng(seed), num_freq_masks=1, freq_width=12, num_time_masks=1, time_width=40
        )
        assert torch.equal(feats, torch.ones(300, NUM_MEL_BINS))  # input untouched
        zero = (out == 0).numpy()
        cols = zero.all(axis=0)
        rows = zero.all(axis=1)
        # every zero lies in a fully masked column or a fully masked row
        assert np.array_equal(zero, cols[None, :] | rows[:, None])
        assert all(r <= 12 for r in _runs(cols)) and len(_runs(cols)) <= 1
        assert all(r <= 40 for r in _runs(rows)) and len(_runs(rows)) <= 1
    for seed in range(20):
        out = spec_augment(feats.numpy(), np.random.default_rng(seed), 3, 10, 2, 30)
        zero = out == 0
        assert zero.all(axis=0).sum() <= 30 and zero.all(axis=1).sum() <= 60
    a = spec_augment(feats, np.random.default_rng(7))
    b = spec_augment(feats, np.random.default_rng(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        spec_augment(torch.ones(2, 3, 4), np.random.default_rng(0))


def test_spec_augment_short_input():
    feats = torch.ones(5, NUM_MEL_BINS)
    out = spec_augment(feats, np.random.default_rng(0), 2, 10, 2, 50)
    assert out.shape == feats.shape


def test_encode_flac_round_trip():
    wav = chirp(0.3, 22050)
    data = encode_flac(wav, 22050)
    info = sf.info(io.BytesIO(data))
    assert info.format == "FLAC" and info.subtype == "PCM_16" and info.samplerate == 22050
    back, _ = load_audio(data)
    np.testing.assert_allclose(back, wav, atol=1 / 32767 + 1e-6)


def test_warp_augment_stretches_time_and_warps_frequency():
    from datamodules.features import warp_augment

    rng = np.random.default_rng(0)
    feats = torch.randn(200, 80)
    same = warp_augment(feats, np.random.default_rng(1), max_time_stretch=0.0, max_freq_warp=0.0)
    assert torch.allclose(same, feats, atol=1e-6)  # rate 1 and alpha 1: the identity
    lengths = {warp_augment(feats, rng, 0.15, 0.1).shape[0] for _ in range(50)}
    assert min(lengths) >= round(200 / 1.15) and max(lengths) <= round(200 / 0.85) and len(lengths) > 5
    # A pure tone in bin 40 moves to bin 40 / alpha under a mel-axis warp by alpha.
    tone = torch.zeros(50, 80)
    tone[:, 40] = 1.0
    warped = warp_augment(tone, np.random.default_rng(3), 0.0, 0.1)
    peak = int(warped[0].argmax())
    assert peak != 40 and abs(peak - 40) <= 40 * 0.1 / 0.9 + 1
    assert isinstance(warp_augment(feats.numpy(), rng), np.ndarray)
