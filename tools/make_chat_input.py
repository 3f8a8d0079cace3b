"""A spoken two-question input for `infer.py chat` from a test dialogue of the corpus.

    python -m tools.make_chat_input --corpus data/tiny --out runs/tiny/chat/question.wav [--dialogue 0] [--turns 2] [--pause 2.0]

Joins the first `--turns` spoken questions of test dialogue number `--dialogue` (unseen voice)
with `--pause` seconds of silence between them (0.5 s before the first), at the corpus' rate,
and prints the questions and the reference answers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import soundfile as sf

from datamodules.audio import load_audio


def make_chat_input(corpus: str, out: str, dialogue: int = 0, turns: int = 2, pause: float = 2.0) -> dict:
    manifest = Path(corpus) / "manifests" / "qa_test.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} is missing: build the corpus first (make corpus)")
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    if not 0 <= dialogue < len(rows):
        raise ValueError(f"--dialogue {dialogue}: the test split has dialogues 0..{len(rows) - 1}")
    d = rows[dialogue]
    parts, rate = [], None
    for k, turn in enumerate(d["turns"][:turns]):
        wav, sr = load_audio(str(Path(corpus) / turn["audio"]))
        rate = rate or sr
        gap = 0.5 if k == 0 else pause
        parts += [np.zeros(int(gap * sr), np.float32), wav.astype(np.float32)]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    sf.write(out, np.concatenate(parts), rate)
    summary = {"dialogue": d["id"], "speaker": d["speaker"], "out": out,
               "turns": [{"question": t["question"], "answer": t["answer"]} for t in d["turns"][:turns]]}  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default="data/tiny")
    p.add_argument("--out", required=True)
    p.add_argument("--dialogue", type=int, default=0)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--pause", type=float, default=2.0)
    args = p.parse_args(argv)
    summary = make_chat_input(args.corpus, args.out, args.dialogue, args.turns, args.pause)
    for t in summary["turns"]:
        print(f"question: {t['question']}\n  (reference answer: {t['answer']})")
    print(f"wrote {summary['out']} ({summary['speaker']}, dialogue {summary['dialogue']})")
    return summary


if __name__ == "__main__":
    main()
