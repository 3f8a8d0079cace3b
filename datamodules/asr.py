"""ASR data module: streams WebDataset shards into length-bucketed fbank batches.

A training batch (``DataLoader(batch_size=None)`` — batching happens inside the dataset) is::

    {
        "feats":      float32 [B, T, 80]   log-mel fbank (CMVN'd if cmvn_path, SpecAugment'ed in training)
        "feats_lens": int64   [B]          valid frames per utterance
        "texts":      list[str]  (B)       transcripts (not tokenized)
        "keys":       list[str]  (B)
        "speakers":   list[str]  (B)
        "languages":  list[str | None] (B)
        "durations":  float32 [B]          seconds of audio
        "skipped":    dict[str, int]       samples this worker dropped since its previous batch, by reason
    }

``B * max(feats_lens) <= max_frames_per_batch`` always holds. A LightningModule should sum
``batch["skipped"]`` over steps (e.g. ``self.log("data/skipped_<reason>", n, reduce_fx="sum")``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from datamodules.features import GlobalCMVN
from datamodules.shards.reader import ShardDataset, Stage, build_stages, collate_asr, resolve_shards

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")


@dataclass
class ASRDataConfig:
    """Configuration of :class:`ASRDataModule` (and, extended, of the spoken-QA module).

    Shard specs (``*_shards``) accept a directory with ``index.json`` (or ``*.tar``), a brace
    pattern ``dir/train-{000000..000031}.tar``, a glob, or several joined by ``::``.
    """

    train_shards: str | None = None
    dev_shards: str | None = None
    test_shards: str | None = None
    cmvn_path: str | None = None  # Freeze-Omni global_cmvn JSON; None = raw fbank
    num_workers: int = 2
    shuffle_buffer: int = 1000  # samples, training only
    bucket_buffer: int = 500  # samples sorted together for length bucketing
    max_frames_per_batch: int = 20000  # B * max(T) budget (10 ms frames: 20000 = 200 s of audio)
    max_batch_size: int | None = None  # optional cap on B
    min_duration_s: float = 0.1
    max_duration_s: float = 30.0
    duration_tolerance: float = 0.1  # stored vs decoded duration, relative
    spec_augment: bool = True  # training only
    num_freq_masks: int = 2
    freq_width: int = 10
    num_time_masks: int = 2
    time_width: int = 50
    # Feature-domain speed (time stretch) and vocal-tract (mel-axis warp) perturbation, training only.
    warp: bool = False
    max_time_stretch: float = 0.15
    max_freq_warp: float = 0.1
    # Silence appended to every utterance / turn before the fbank, in training and evaluation
    # alike: a spoken turn reaches a streaming system followed by the silence its end-of-turn
    # decision waits for, which tightly cut synthetic audio lacks (datamodules.shards.reader.append_silence).
    tail_silence_s: float = 0.0
    resampled: bool = False  # draw training shards with replacement (needs epoch_batches)
    epoch_batches: int | None = None  # training batches per rank and epoch (set it for multi-GPU)
    cache_samples: bool = False  # keep decoded fbank in memory after the first epoch: small corpora with num_workers=0
    seed: int = 1234
    pin_memory: bool = False
    prefetch_factor: int = 2

    def spec_augment_conf(self) -> dict[str, int]:
        return {
            "num_freq_masks": self.num_freq_masks,
            "freq_width": self.freq_width,
            "num_time_masks": self.num_time_masks,
            "time_width": self.time_width,
        }


class ShardDataModule(L.LightningDataModule):
    """What the shard data modules share: rank/world size (from the attached trainer, else given
    here, else WebDataset's detection) and the loaders over `make_dataset(split)`.

    Subclasses set `self.config` (with `num_workers`, `prefetch_factor`, optionally
    `pin_memory`) and implement `make_dataset`.
    """

    config: Any

    def __init__(self, *, rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        self._rank, self._world_size = rank, world_size
        self._shards: dict[str, list[str]] = {}

    def shards(self, split: str) -> list[str]:
        """Resolved shard list of ``split`` ("train" / "dev" / "test")."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._shards:
            spec = getattr(self.config, f"{split}_shards")
            if not spec:
                raise ValueError(f"{type(self.config).__name__}.{split}_shards is not set")
            self._shards[split] = resolve_shards(spec)
        return self._shards[split]

    def _node(self) -> tuple[int | None, int | None]:
        if self._rank is not None:
            return self._rank, self._world_size
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return None, None

    def make_dataset(self, split: str) -> ShardDataset:
        raise NotImplementedError

    def make_loader(self, split: str) -> DataLoader:
        cfg = self.config
        kwargs: dict[str, Any] = {}
        if cfg.num_workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=cfg.prefetch_factor)
        return DataLoader(
            self.make_dataset(split),
            batch_size=None,
            num_workers=cfg.num_workers,
            pin_memory=getattr(cfg, "pin_memory", False),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        return self.make_loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.make_loader("dev")

    def test_dataloader(self) -> DataLoader:
        return self.make_loader("test")


class ASRDataModule(ShardDataModule):
    """Lightning data module over ASR shards (see the module docstring for the batch layout).

    Train: shard shuffle, node/worker splitting, shuffle buffer, optional resampling, SpecAugment.
    Dev/test: in order, no SpecAugment. Rank and world size come from the attached trainer
    (or ``rank`` / ``world_size`` given here, else WebDataset's environment detection).
    Subclasses change the sample ``kind`` and override :meth:`_collate`.
    """

    kind: ClassVar[str] = "asr"

    def __init__(
        self, config: ASRDataConfig | None = None, *, rank: int | None = None, world_size: int | None = None
    ) -> None:
        super().__init__(rank=rank, world_size=world_size)
        self.config = config if config is not None else ASRDataConfig()
        self.cmvn: GlobalCMVN | None = None

    # ------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.config.cmvn_path and self.cmvn is None:
            self.cmvn = GlobalCMVN.load(self.config.cmvn_path)

    def _collate(self) -> Callable[[list[dict]], dict]:
        return collate_asr

    def _stages_factory(self, train: bool) -> Callable[[np.random.Generator], list[Stage]]:
        cfg = self.config
        return partial(
            build_stages,
            kind=self.kind,
            min_duration_s=cfg.min_duration_s,
            max_duration_s=cfg.max_duration_s,
            duration_tolerance=cfg.duration_tolerance,
            cmvn=self.cmvn,
            spec_augment_conf=cfg.spec_augment_conf() if (train and cfg.spec_augment) else None,
            warp_conf=(
                {"max_time_stretch": cfg.max_time_stretch, "max_freq_warp": cfg.max_freq_warp}
                if (train and cfg.warp)
                else None
            ),
            tail_silence_s=cfg.tail_silence_s,
        )

    def make_dataset(self, split: str) -> ShardDataset:
        """The streaming dataset of ``split``; training settings apply to "train" only."""
        if self.config.cmvn_path and self.cmvn is None:
            self.setup()
        cfg, train = self.config, split == "train"
        rank, world_size = self._node()
        return ShardDataset(
            self.shards(split),
            stages_factory=self._stages_factory(train),
            collate=self._collate(),
            max_frames_per_batch=cfg.max_frames_per_batch,
            bucket_buffer=cfg.bucket_buffer,
            max_batch_size=cfg.max_batch_size,
            shuffle=train,
            shuffle_buffer=cfg.shuffle_buffer,
            resampled=train and cfg.resampled,
            epoch_batches=cfg.epoch_batches if train else None,
            cache_samples=train and cfg.cache_samples,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
        )
