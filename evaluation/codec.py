"""The codec report (`python infer.py eval_codec`): reconstruction measures on the TTS test split
(log-mel L1, mel-cepstral distortion, SI-SNR: the phase-aware one, code use) and the
intelligibility judge's WER on the original vs the reconstructed audio -> runs/<exp>/eval/codec.{json,md},
with two pictures: mel spectrograms of originals against their resynthesis
(`codec_spectrograms.png`) and the judge's WER against training minutes, from the codec stage's
validations (`codec_wer_curve.png`).
"""

from __future__ import annotations

import json
import logging

import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig

from datamodules.transcripts import wer
from evaluation.judge import mel_cepstral_distortion
from modules.codec.stage import STAGE, evaluate_codec, load_codec
from modules.config import eval_dir, run_dir
from modules.encoder.ctc import load_judge, transcribe
from modules.tb import spectrogram_figure

log = logging.getLogger(__name__)


def report_codec(cfg: DictConfig) -> dict:
    """`python infer.py eval_codec`: `evaluate_codec` on the TTS test split, plus the judge's
    WER on the original and the reconstructed audio (when stage `judge` has run)."""
    codec = load_codec(cfg)
    audio: dict = {}
    result = evaluate_codec(cfg, codec, "test", cfg.eval.limit, audio)
    try:
        judge = load_judge(cfg)
    except FileNotFoundError as e:
        log.warning("no judge: %s", e)
        judge = None
    rate = codec.codec_cfg.sample_rate
    result["mcd_db"] = mel_cepstral_distortion(audio["originals"], audio["reconstructions"], rate)
    if judge is not None:
        refs = audio["texts"]
        result["judge_wer_original"] = wer(transcribe(judge, audio["originals"], rate), refs)
        result["judge_wer_reconstructed"] = wer(transcribe(judge, audio["reconstructions"], rate), refs)
        result["over_floor"] = result["judge_wer_reconstructed"] / max(result["judge_wer_original"], 1e-9)
    lines = [
        f"### Codec reconstructions of the TTS test split ({result['utterances']} utterances, "
        f"{result['bits_per_second']:.0f} bit/s)",
        "",
        "| log-mel L1 | MCD | SI-SNR | code perplexity | codes used | judge WER original | judge WER reconstructed |",
        "|---|---|---|---|---|---|---|",
        f"| {result['mel_distance']:.3f} | {result['mcd_db']:.2f} dB | {result['si_snr_db']:.1f} dB | "
        f"{result['code_perplexity']:.0f} | {100 * result['codes_used']:.1f}% | "
        + (f"{100 * result['judge_wer_original']:.1f}% | {100 * result['judge_wer_reconstructed']:.1f}% "
           f"({result['over_floor']:.2f} x) |" if judge is not None else "- | - |"),
    ]  # fmt: skip
    out = eval_dir(cfg)
    spectrograms = {}
    for i in range(min(2, len(audio["originals"]))):
        spectrograms[f"original: {audio['texts'][i]}"] = codec.mel(torch.from_numpy(audio["originals"][i]))[0]
        spectrograms[f"resynthesis {i + 1}"] = codec.mel(torch.from_numpy(audio["reconstructions"][i]))[0]
    if spectrograms:
        spectrogram_figure(spectrograms).savefig(out / "codec_spectrograms.png", dpi=80)
    curve = codec_curve(cfg)
    if curve:
        result["judge_curve"] = curve
        lines += ["", "The judge's WER on dev resynthesis during training (validation time left out):", "",
                  "| step | training minutes | judge WER | floor on the same utterances |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {p['step']} | {p['train_minutes']:.1f} | {100 * p['judge_wer']:.1f}% | "
                  f"{100 * p['judge_wer_original']:.1f}% |" for p in curve]  # fmt: skip
        curve_figure(curve).savefig(out / "codec_wer_curve.png", dpi=80)
    table = "\n".join(lines) + "\n"
    (out / "codec.json").write_text(json.dumps({**result, "table": table}, indent=2) + "\n")
    (out / "codec.md").write_text(table)
    print(table)
    return result


def codec_curve(cfg: DictConfig) -> list[dict]:
    """The codec stage's `judge_curve` (metrics.json): step, training minutes, judge WER, floor."""
    path = run_dir(cfg, STAGE) / "metrics.json"
    return json.loads(path.read_text()).get("judge_curve", []) if path.is_file() else []


def curve_figure(curve: list[dict]) -> Figure:
    fig = Figure(figsize=(5, 3.2), layout="constrained")
    ax = fig.subplots()
    minutes = [p["train_minutes"] for p in curve]
    ax.plot(minutes, [100 * p["judge_wer"] for p in curve], "o-", label="resynthesis")
    ax.plot(minutes, [100 * p["judge_wer_original"] for p in curve], "--", label="original (floor)")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("judge WER (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
