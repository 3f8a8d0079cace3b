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

from omegaconf import DictConfig, OmegaConf

from datamodules.transcripts import wer
from modules.config import eval_dir
from modules.encoder.ctc import ctc_decoder, decode_split, load_judge

log = logging.getLogger(__name__)

GROUPS = {"assistant voice (TTS test)": "tts", "held-out user voices (ASR test)": "asr"}


def judge_floor(cfg: DictConfig, limit: int = 0) -> dict[str, dict]:
    """{group: {"wer", "utterances"}}: the judge's full-context greedy WER on each group's test split."""
    judge = load_judge(cfg)
    out = {}
    for label, data in GROUPS.items():
        split_cfg = cfg.copy()
        OmegaConf.update(split_cfg, "data.asr.test_shards", cfg.data[data].test_shards)
        refs, hyps = decode_split(split_cfg, "test", {"judge": ctc_decoder(judge)}, [0], limit, desc=label)
        n = limit or len(refs)
        out[label] = {"wer": wer(hyps["judge_0"][:n], refs[:n]), "utterances": len(refs[:n])}
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
