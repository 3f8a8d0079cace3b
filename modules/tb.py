"""TensorBoard pictures and sounds: spectrograms, CTC posteriorgrams, audio samples."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: drawing here leaves the caller's backend alone


def log_posteriorgram(writer, tag: str, feats: torch.Tensor, log_probs: torch.Tensor, units: list[str], step: int):
    """fbank [T, F] above CTC posteriors [T', V] (blank row greyed), one figure."""
    feats = feats.detach().float().cpu().numpy()
    post = log_probs.detach().float().exp().cpu().numpy()
    fig = Figure(figsize=(10, 6), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1)
    ax1.imshow(feats.T, origin="lower", aspect="auto", interpolation="nearest")
    ax1.set_title("fbank (raw, 100 Hz)")
    ax1.set_ylabel("mel bin")
    ax2.imshow(post.T, origin="lower", aspect="auto", interpolation="nearest", cmap="Greys")
    ax2.set_title("CTC posteriors (25 Hz)")
    ax2.set_yticks(np.arange(len(units)))
    ax2.set_yticklabels(["_" if u == " " else ("ø" if i == 0 else u) for i, u in enumerate(units)], fontsize=5)
    ax2.set_xlabel("encoder frame")
    writer.add_figure(tag, fig, step, close=False)


def log_audio(writer, tag: str, wav: torch.Tensor | np.ndarray, sample_rate: int, step: int) -> None:
    """A mono waveform [N] in [-1, 1] as a TensorBoard audio sample."""
    wav = torch.as_tensor(wav).detach().float().cpu().clamp(-1, 1)
    writer.add_audio(tag, wav[None], step, sample_rate=sample_rate)


def spectrogram_figure(spectra: dict[str, torch.Tensor | np.ndarray]) -> Figure:
    """Log-mel spectrograms [n_mels, frames], one panel per entry, in one figure."""
    fig = Figure(figsize=(10, 2.5 * len(spectra)), layout="constrained")
    axes = fig.subplots(len(spectra), 1, squeeze=False)
    for ax, (name, spec) in zip(axes[:, 0], spectra.items()):
        spec = torch.as_tensor(spec).detach().float().cpu().numpy()
        ax.imshow(spec, origin="lower", aspect="auto", interpolation="nearest")
        ax.set_title(name)
        ax.set_ylabel("mel bin")
    axes[-1, 0].set_xlabel("frame")
    return fig


def log_spectrograms(writer, tag: str, spectra: dict[str, torch.Tensor], step: int) -> None:
    writer.add_figure(tag, spectrogram_figure(spectra), step, close=False)
