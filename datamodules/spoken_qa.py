"""Spoken-QA data module: multi-round dialogues whose questions are speech.

Each shard sample is one dialogue (``<key>.json`` + ``<key>.t0.flac``, ``<key>.t1.flac``...). The
same processors as ASR decode every turn's question audio to 16 kHz and compute its fbank
(:func:`datamodules.shards.reader.build_stages`); dialogues are bucketed by their *total* frames
(``B * max(total frames of a dialogue) <= max_frames_per_batch``). A batch holds the B dialogues'
N = sum(turn_counts) turns flattened in dialogue order::

    {
        "keys":            list[str]            (B)
        "turn_counts":     int64 [B]            turns per dialogue
        "feats":           float32 [N, T, 80]   question fbank per turn (CMVN'd if cmvn_path)
        "feats_lens":      int64 [N]
        "dialogue_index":  int64 [N]            dialogue of each turn (0..B-1)
        "turn_index":      int64 [N]            position of each turn in its dialogue
        "questions":       list[list[str]]      (B x turns) question text
        "answers":         list[list[str]]      (B x turns) reference answer text
        "gold":            list[list[list[str]]] accepted short answers per turn
        "families":        list[list[str | None]] question family per turn
        "speakers":        list[str] (B);  "languages": list[str | None] (B)
        "durations":       float32 [N]          question audio seconds per turn
        "wavs":            list[Tensor [n_i]]   (N) 16 kHz question audio, only with keep_wav
        "skipped":         dict[str, int]       dialogues dropped since the previous batch, by reason
    }
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader

from datamodules.asr import ASRDataConfig, ASRDataModule
from datamodules.shards.reader import Sample, iter_metadata, pad_feats


@dataclass
class SpokenQADataConfig(ASRDataConfig):
    """:class:`ASRDataConfig` for spoken-QA shards; durations filter each turn."""

    spec_augment: bool = False
    keep_wav: bool = False  # also return each turn's 16 kHz waveform (batch["wavs"])


def collate_qa(batch: Sequence[Sample], *, keep_wav: bool = False) -> dict[str, Any]:
    """Collate decoded dialogues (see the module docstring for the layout)."""
    turns = [(d, i, t) for d, sample in enumerate(batch) for i, t in enumerate(sample["turns"])]
    feats, feats_lens = pad_feats([t["feats"] for _, _, t in turns])
    out: dict[str, Any] = {
        "keys": [s["key"] for s in batch],
        "turn_counts": torch.tensor([len(s["turns"]) for s in batch], dtype=torch.long),
        "feats": feats,
        "feats_lens": feats_lens,
        "dialogue_index": torch.tensor([d for d, _, _ in turns], dtype=torch.long),
        "turn_index": torch.tensor([i for _, i, _ in turns], dtype=torch.long),
        "questions": [[t["question"] for t in s["turns"]] for s in batch],
        "answers": [[t["answer"] for t in s["turns"]] for s in batch],
        "gold": [[list(t["gold"]) for t in s["turns"]] for s in batch],
        "families": [[t["family"] for t in s["turns"]] for s in batch],
        "speakers": [s["speaker"] for s in batch],
        "languages": [s["language"] for s in batch],
        "durations": torch.tensor([t["duration"] for _, _, t in turns], dtype=torch.float32),
    }
    if keep_wav:
        out["wavs"] = [torch.from_numpy(t["wav"]) for _, _, t in turns]
    return out


class SpokenQADataModule(ASRDataModule):
    """Data module over spoken-QA shards: the ASR module's pipeline with dialogue samples."""

    kind: ClassVar[str] = "spoken_qa"

    def __init__(
        self, config: SpokenQADataConfig | None = None, *, rank: int | None = None, world_size: int | None = None
    ) -> None:
        super().__init__(config if config is not None else SpokenQADataConfig(), rank=rank, world_size=world_size)

    def _collate(self) -> Callable[[list[Sample]], dict]:
        return partial(collate_qa, keep_wav=bool(getattr(self.config, "keep_wav", False)))


class PairedDataModule(L.LightningDataModule):
    """Two or more shard data modules read side by side: every batch is ``{name: batch}``.

    Training cycles the shorter streams until the longest ends (Lightning's "max_size_cycle");
    validation stops with the shortest ("min_size"), so a validation step sees every part too.
    The parts read the rank and world size of the trainer this module is attached to.
    """

    def __init__(self, **parts: L.LightningDataModule) -> None:
        super().__init__()
        if not parts:
            raise ValueError("PairedDataModule needs at least one named data module")
        self.parts = parts

    def setup(self, stage: str | None = None) -> None:
        for part in self.parts.values():
            part.setup(stage)

    def _combined(self, method: str, mode: str) -> CombinedLoader:
        for part in self.parts.values():  # the parts' loaders split the shards by this trainer's rank
            part.trainer = self.trainer
        return CombinedLoader({name: getattr(part, method)() for name, part in self.parts.items()}, mode=mode)

    def train_dataloader(self) -> CombinedLoader:
        return self._combined("train_dataloader", "max_size_cycle")

    def val_dataloader(self) -> CombinedLoader:
        return self._combined("val_dataloader", "min_size")


def read_dialogues(shards: str) -> list[dict]:
    """{"id", "key", "turns": [{"question", "gold", "family", ...}]} of every dialogue (JSON only)."""
    return [{"id": meta.get("id", key), "key": key, "turns": meta["turns"]} for key, meta in iter_metadata(shards)]
