"""Where the synthetic corpus lives and how big it is (the `corpus:` config block).

Layout under `root` (made by `python -m tools.prepare_corpus`):
    audio/{asr,qa,turns}/<split>/*.flac   source-rate audio (22.05 kHz eSpeak NG)
    audio/tts/<split>/*.flac              the assistant voice at the codec's 24 kHz
    manifests/{asr,qa,tts,turns}_<split>.jsonl  one line per utterance / dialogue / user turn
    shards/{asr,qa,tts,turns}/<split>/*.tar + index.json   WebDataset shards written from the manifests
    cmvn.json                             global CMVN of the ASR training fbank
    corpus_stats.json                     utterances, hours and voices per split
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datamodules.corpus.qa import DEFAULT_SPLIT_SIZES

# Bump when the corpus content changes for the same seed (templates, answers, voices), so
# `tools.prepare_corpus` rebuilds corpora made by older code.
CORPUS_VERSION = 10  # 8: the TTS split (assistant voice, 24 kHz); 9: the turns split (state classifier); 10: ASR sentences with the fact vocabulary
SPLITS = ("train", "dev", "test")
KINDS = ("asr", "qa", "tts", "turns")


@dataclass
class CorpusConfig:
    root: str = "data/tiny"
    # Decides the voices, the sentences and which QA combinations are held out: every
    # stage and evaluation reads held-out membership from this seed.
    seed: int = 1234
    n_asr: int = 3000  # ASR utterances over all splits
    n_tts: int = 1500  # TTS sentences over all splits (the QA answers come on top)
    n_turns: int = 2600  # user turns for the state classifier over all splits
    qa_dialogues: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SPLIT_SIZES))
    workers: int = 2
    shard_max_mb: int = 64


def manifest_path(root: str | Path, kind: str, split: str) -> Path:
    return Path(root) / "manifests" / f"{kind}_{split}.jsonl"


def shard_dir(root: str | Path, kind: str, split: str) -> Path:
    return Path(root) / "shards" / kind / split
