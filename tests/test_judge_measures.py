"""The judge's second measure: mel-cepstral distortion along a DTW alignment."""

import numpy as np
import pytest

from evaluation.judge import dtw_mean_distance, mel_cepstral_distortion


def test_dtw_aligns_a_slowed_copy_and_scores_it_near_zero():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 13))
    slowed = np.repeat(a, 2, axis=0)  # every frame said twice
    assert dtw_mean_distance(a, a) == 0.0 and dtw_mean_distance(a, slowed) == 0.0
    assert dtw_mean_distance(a, rng.standard_normal((55, 13))) > 1.0
    # brute force on a tiny case: the cheapest monotonic path's mean step cost
    x, y = np.array([[0.0], [1.0], [3.0]]), np.array([[0.0], [3.0]])
    assert dtw_mean_distance(x, y) == pytest.approx((0 + 1 + 0) / 3)  # (0,0) (1,0)|(1,1) (2,1): 0, 1, 0
    assert dtw_mean_distance(x, y[:0]) == float("inf")


def test_mcd_is_zero_for_the_same_audio_and_grows_with_noise():
    rng = np.random.default_rng(1)
    t = np.arange(24000) / 24000
    wav = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(len(t))
    wav = wav.astype(np.float32)
    noisy = [wav + (s * rng.standard_normal(len(wav))).astype(np.float32) for s in (0.03, 0.3)]
    assert mel_cepstral_distortion([wav], [wav], 24000) == pytest.approx(0.0, abs=1e-6)
    low, high = (mel_cepstral_distortion([wav], [n], 24000) for n in noisy)
    assert 0 < low < high
    # louder is the same sound: c0 (the level) is left out
    assert mel_cepstral_distortion([wav], [wav * 0.5], 24000) < 0.1
    # a 16 kHz copy is resampled before the cepstra
    assert mel_cepstral_distortion([wav[::3]], [wav[::3]], 8000) == pytest.approx(0.0, abs=1e-6)
