"""The intelligibility judge's floor (`python infer.py eval_judge`): how well the judge (stage
`judge`, a full-context CTC model outside the chain) hears eSpeak's ground-truth audio, per voice
group, on test sentences it never trained on:

* the assistant voice: the TTS test split (the voice every generated answer imitates);
* held-out user voices: the ASR test split (voices absent from every training split).

A generated-speech WER (Table 2, the codec report, speech -> speech QA) is only as meaningful as
this floor is low. Writes runs/<exp>/eval/judge.{json,md}.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import torch
from omegaconf import DictConfig

from datamodules.audio import resample
from datamodules.shards.reader import iter_metadata
from datamodules.transcripts import normalize_transcript, wer
from modules.codec.network import LogMel
from modules.config import eval_dir
from modules.encoder.ctc import ctc_decoder, decode_split, judge_train_shards, load_judge, reading_tts

log = logging.getLogger(__name__)

GROUPS = {"assistant voice (TTS test)": "tts", "held-out user voices (ASR test)": "asr"}


UNHEARD = "assistant voice, sentences absent from the judge's training text"


def training_texts(cfg: DictConfig) -> set[str]:
    """The normalized transcripts the judge trained on (its `data.asr.train_shards`)."""
    return {normalize_transcript(m["text"]) for _, m in iter_metadata(judge_train_shards(cfg))}


def judge_floor(cfg: DictConfig, limit: int = 0) -> dict[str, dict]:
    """{group: {"wer", "utterances"}}: the judge's full-context greedy WER on each group's test
    split, and on the assistant voice's test utterances whose text the judge never trained on
    (template answers recur across splits; this row is the floor without that help)."""
    judge = load_judge(cfg)
    seen = training_texts(cfg)
    out = {}
    for label, data in GROUPS.items():
        split_cfg = reading_tts(cfg, "test") if data == "tts" else cfg
        refs, hyps = decode_split(split_cfg, "test", {"judge": ctc_decoder(judge)}, [0], limit, desc=label)
        n = limit or len(refs)
        refs, hyp = refs[:n], hyps["judge_0"][:n]
        out[label] = {"wer": wer(hyp, refs), "utterances": len(refs)}
        if data == "tts":
            new = [i for i, r in enumerate(refs) if normalize_transcript(r) not in seen]
            if new:
                out[UNHEARD] = {"wer": wer([hyp[i] for i in new], [refs[i] for i in new]), "utterances": len(new)}
    return out


def evaluate_judge(cfg: DictConfig) -> dict:
    floors = judge_floor(cfg, cfg.eval.limit)
    lines = ["### The intelligibility judge on eSpeak's ground truth (full context, CTC greedy)", "",
             "| voice group | utterances | WER |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {g} | {r['utterances']} | {100 * r['wer']:.1f}% |" for g, r in floors.items()]
    table = "\n".join(lines) + "\n"
    out = eval_dir(cfg)
    (out / "judge.json").write_text(json.dumps({"floor": floors, "table": table}, indent=2) + "\n")
    (out / "judge.md").write_text(table)
    print(table)
    return floors


# --- a second measure, not ASR: mel-cepstral distortion -------------------------------------------
def _cepstra(wav, sample_rate: int, n_ceps: int = 13):
    """[frames, n_ceps] cepstra (c1..c13, c0 left out) of the 80-bin log-mel at 10 ms hops."""
    rate = 24000
    wav = resample(np.asarray(wav, dtype=np.float32), sample_rate, rate) if sample_rate != rate else wav
    logmel = LogMel(rate)(torch.as_tensor(wav, dtype=torch.float32)[None])[0].numpy()  # [80, frames]
    n = logmel.shape[0]
    k = np.arange(n)
    dct = np.cos(np.pi / n * (k[None, :] + 0.5) * np.arange(n_ceps + 1)[:, None]) * np.sqrt(2.0 / n)
    return (dct @ logmel)[1:].T


def dtw_mean_distance(a, b) -> float:
    """Mean Euclidean frame distance along the cheapest monotonic alignment of a [N, D] and b [M, D]
    (steps (1,0), (0,1), (1,1)); computed one anti-diagonal at a time."""
    if not len(a) or not len(b):
        return float("inf")
    cost = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    n, m = cost.shape
    acc = np.full((n + 1, m + 1), np.inf)
    steps = np.zeros((n + 1, m + 1))
    acc[0, 0] = 0.0
    for d in range(2, n + m + 1):  # cells (i, j) with i + j = d, 1-based
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        prev = np.stack([acc[i - 1, j], acc[i, j - 1], acc[i - 1, j - 1]])
        best = prev.argmin(0)
        acc[i, j] = cost[i - 1, j - 1] + prev[best, np.arange(len(i))]
        steps[i, j] = np.choose(best, [steps[i - 1, j], steps[i, j - 1], steps[i - 1, j - 1]]) + 1
    return float(acc[n, m] / steps[n, m])


def mel_cepstral_distortion(reference: list, generated: list, sample_rate: int) -> float:
    """Mean MCD in dB (10 / ln 10 * sqrt(2) * frame distance, DTW-aligned) of generated audio against
    its ground truth; cepstra of the log-mel, so an approximation of the WORLD/SPTK measure."""
    values = [
        dtw_mean_distance(_cepstra(r, sample_rate), _cepstra(g, sample_rate))
        for r, g in zip(reference, generated)
        if len(r) and len(g)
    ]
    return 10.0 / math.log(10.0) * math.sqrt(2.0) * sum(values) / max(len(values), 1)
