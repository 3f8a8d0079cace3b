"""The codec report (`python infer.py eval_codec`): reconstruction measures on the TTS test split
and the intelligibility judge's WER on the original vs the reconstructed audio -> runs/<exp>/eval/codec.{json,md}.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from modules.codec.stage import evaluate_codec, load_codec

log = logging.getLogger(__name__)


def report_codec(cfg: DictConfig) -> dict:
    """`python infer.py eval_codec`: `evaluate_codec` on the TTS test split, plus the judge's
    WER on the original and the reconstructed audio (when stage `judge` has run)."""
    import json

    from modules.config import eval_dir

    codec = load_codec(cfg)
    audio: dict = {}
    result = evaluate_codec(cfg, codec, "test", cfg.eval.limit, audio)
    try:
        from datamodules.transcripts import wer
        from modules.encoder.ctc import load_judge, transcribe

        judge = load_judge(cfg)
    except FileNotFoundError as e:
        log.warning("no judge: %s", e)
        judge = None
    if judge is not None:
        rate, refs = codec.codec_cfg.sample_rate, audio["texts"]
        result["judge_wer_original"] = wer(transcribe(judge, audio["originals"], rate), refs)
        result["judge_wer_reconstructed"] = wer(transcribe(judge, audio["reconstructions"], rate), refs)
    lines = [
        f"### Codec reconstructions of the TTS test split ({result['utterances']} utterances, "
        f"{result['bits_per_second']:.0f} bit/s)",
        "",
        "| log-mel L1 | SI-SNR | code perplexity | codes used | judge WER original | judge WER reconstructed |",
        "|---|---|---|---|---|---|",
        f"| {result['mel_distance']:.3f} | {result['si_snr_db']:.1f} dB | {result['code_perplexity']:.0f} | "
        f"{100 * result['codes_used']:.1f}% | "
        + (f"{100 * result['judge_wer_original']:.1f}% | {100 * result['judge_wer_reconstructed']:.1f}% |"
           if judge is not None else "- | - |"),
    ]  # fmt: skip
    table = "\n".join(lines) + "\n"
    out = eval_dir(cfg)
    (out / "codec.json").write_text(json.dumps({**result, "table": table}, indent=2) + "\n")
    (out / "codec.md").write_text(table)
    print(table)
    return result
