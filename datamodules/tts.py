"""TTS data module: the assistant voice's shards, as audio crops (codec) or text + codec tokens (decoder).

TTS shards hold ASR-style samples (``<key>.flac`` + ``<key>.json`` with ``text``), written from
``manifests/tts_<split>.jsonl`` by the corpus tool; ``tools.write_codec_tokens`` adds
``<key>.codes.npy`` (int16 codec tokens [T], 40 Hz) and the voice's ``global_tokens`` to the JSON.

``mode="audio"`` (stage ``output_1_codec``): audio decoded at the codec rate (24 kHz), cut in
training to random crops of ``segment_s`` (shorter clips are zero-padded)::

    {"wav": float32 [B, 1, S], "lens": int64 [B] valid samples, "texts", "keys", "skipped"}

Dev/test batches hold whole utterances, zero-padded to the longest (``segment_s`` is ignored).

``mode="codes"`` (stage ``output_2_decoder``): no audio is decoded::

    {"texts": list[str], "codes": int64 [B, T] (padded with -1), "codes_lens": int64 [B],
     "global_tokens": int64 [B, G] (empty when the shards have none), "keys", "skipped"}

Batches are length-bucketed (``B * max length <= max_*_per_batch``) like the ASR batches.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from datamodules.asr import ShardDataModule
from datamodules.audio import OUTPUT_SAMPLE_RATE
from datamodules.shards.reader import (
    SKIP_BAD_JSON,
    SKIP_EMPTY_TEXT,
    SKIP_TOO_LONG,
    SKIP_TOO_SHORT,
    Sample,
    ShardDataset,
    SkipSample,
    _decode_audio_entry,
    _raw_audio,
    _raw_meta,
)

CODES_MEMBER = "codes.npy"
PAD_CODE = -1


@dataclass
class TTSDataConfig:
    train_shards: str | None = None
    dev_shards: str | None = None
    test_shards: str | None = None
    sample_rate: int = OUTPUT_SAMPLE_RATE  # audio is decoded (resampled if stored otherwise) to this rate
    segment_s: float = 0.5  # training crop of mode "audio"
    max_batch_size: int = 8  # mode "audio": crops per training batch
    max_seconds_per_batch: float = 60.0  # mode "audio", dev/test: B * longest utterance
    max_tokens_per_batch: int = 6000  # mode "codes": B * (longest codes + text allowance)
    min_duration_s: float = 0.1
    max_duration_s: float = 30.0
    duration_tolerance: float = 0.1
    num_workers: int = 0
    shuffle_buffer: int = 1000
    bucket_buffer: int = 300
    resampled: bool = False  # draw training shards with replacement (needs epoch_batches): multi-node
    epoch_batches: int | None = None
    seed: int = 1234
    prefetch_factor: int = 2
    # Only the first N utterances of each split get codec tokens (tools.write_codec_tokens), and
    # output_3_prefix trains on the first N answers of each split; 0 = all. `make demo` cuts here.
    limit: int = 0


def decode_tts_sample(
    raw: dict, *, sample_rate: int = OUTPUT_SAMPLE_RATE, duration_tolerance: float = 0.1, audio: bool = True
) -> Sample:
    """``{"key", "text", "duration", "wav" (at sample_rate, if audio), "codes" int64 [T] and
    "global_tokens" (if stored)}``; :class:`SkipSample` for bad JSON, empty text, bad audio or codes."""
    meta = _raw_meta(raw)
    text = str(meta.get("text") or "").strip()
    if not text:
        raise SkipSample(SKIP_EMPTY_TEXT)
    sample: Sample = {"key": raw.get("__key__", str(meta.get("id", "?"))), "url": raw.get("__url__"), "text": text}
    sample["duration"] = float(meta.get("duration") or 0.0)
    if audio:
        wav, seconds = _decode_audio_entry(_raw_audio(raw, ""), "flac", meta, duration_tolerance, sample_rate)
        sample.update(wav=wav, sr=sample_rate, duration=seconds)
    if CODES_MEMBER in raw:
        try:
            codes = np.load(io.BytesIO(raw[CODES_MEMBER]), allow_pickle=False)
        except (ValueError, OSError) as exn:
            raise SkipSample(SKIP_BAD_JSON, f"{CODES_MEMBER}: {exn}") from exn
        if codes.ndim != 1 or not len(codes):
            raise SkipSample(SKIP_BAD_JSON, f"{CODES_MEMBER} has shape {codes.shape}, expected [T > 0]")
        sample["codes"] = torch.from_numpy(codes.astype(np.int64))
        sample["global_tokens"] = [int(t) for t in meta.get("global_tokens") or []]
    return sample


def filter_tts(sample: Sample, *, min_duration_s: float, max_duration_s: float, need_codes: bool) -> Sample:
    if need_codes and "codes" not in sample:
        raise SkipSample(SKIP_BAD_JSON, f"no {CODES_MEMBER} member (run tools.write_codec_tokens)")
    if sample["duration"] < min_duration_s:
        raise SkipSample(SKIP_TOO_SHORT, f"{sample['duration']:.3f} s < {min_duration_s} s")
    if sample["duration"] > max_duration_s:
        raise SkipSample(SKIP_TOO_LONG, f"{sample['duration']:.3f} s > {max_duration_s} s")
    return sample


def random_crop(sample: Sample, *, rng: np.random.Generator, samples: int) -> Sample:
    """A random window of ``samples`` (zero-padded when the clip is shorter); ``lens`` the valid part."""
    wav = sample["wav"]
    if len(wav) > samples:
        start = int(rng.integers(0, len(wav) - samples + 1))
        wav = wav[start : start + samples]
    return {**sample, "wav": wav}


def audio_length(sample: Sample) -> int:
    return len(sample["wav"])


def codes_length(sample: Sample) -> int:
    # The decoder's sequence is the text conditioning plus the codes: ~1 text position per 2
    # characters is a generous allowance, so that batches of long texts stay within budget.
    return len(sample["codes"]) + len(sample["text"]) // 2


def collate_audio(batch: list[Sample], *, length: int | None = None) -> dict[str, Any]:
    """Zero-pad to ``length`` (or the longest) -> ``wav [B, 1, S]`` and ``lens [B]``."""
    n = length or max(len(s["wav"]) for s in batch)
    wav = torch.zeros(len(batch), 1, n)
    for i, s in enumerate(batch):
        w = torch.from_numpy(np.asarray(s["wav"][:n], dtype=np.float32))
        wav[i, 0, : len(w)] = w
    return {
        "wav": wav,
        "lens": torch.tensor([min(len(s["wav"]), n) for s in batch], dtype=torch.long),
        "texts": [s["text"] for s in batch],
        "keys": [s["key"] for s in batch],
    }


def collate_codes(batch: list[Sample]) -> dict[str, Any]:
    codes = pad_sequence([s["codes"] for s in batch], batch_first=True, padding_value=PAD_CODE)
    g = [s.get("global_tokens") or [] for s in batch]
    return {
        "texts": [s["text"] for s in batch],
        "codes": codes,
        "codes_lens": torch.tensor([len(s["codes"]) for s in batch], dtype=torch.long),
        "global_tokens": torch.tensor(g, dtype=torch.long) if all(len(x) == len(g[0]) for x in g) else None,
        "keys": [s["key"] for s in batch],
    }


class TTSDataModule(ShardDataModule):
    """Streams TTS shards (see the module docstring); node and worker splitting as for ASR."""

    def __init__(
        self,
        config: TTSDataConfig | None = None,
        mode: Literal["audio", "codes"] = "audio",
        *,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(rank=rank, world_size=world_size)
        if mode not in ("audio", "codes"):
            raise ValueError(f"TTSDataModule mode must be 'audio' or 'codes', got {mode!r}")
        self.config = config if config is not None else TTSDataConfig()
        self.mode = mode

    def _stages(self, train: bool, rng: np.random.Generator) -> list:
        cfg, audio = self.config, self.mode == "audio"
        stages = [
            partial(decode_tts_sample, sample_rate=cfg.sample_rate, duration_tolerance=cfg.duration_tolerance,
                    audio=audio),
            partial(filter_tts, min_duration_s=cfg.min_duration_s, max_duration_s=cfg.max_duration_s,
                    need_codes=not audio),
        ]  # fmt: skip
        if audio and train:
            stages.append(partial(random_crop, rng=rng, samples=self.segment_samples))
        return stages

    @property
    def segment_samples(self) -> int:
        return round(self.config.segment_s * self.config.sample_rate)

    def make_dataset(self, split: str) -> ShardDataset:
        cfg, train = self.config, split == "train"
        rank, world_size = self._node()
        if self.mode == "audio":
            length_fn, collate = audio_length, collate_audio
            if train:
                collate = partial(collate_audio, length=self.segment_samples)
                budget, cap = cfg.max_batch_size * self.segment_samples, cfg.max_batch_size
            else:
                budget, cap = int(cfg.max_seconds_per_batch * cfg.sample_rate), None
        else:
            length_fn, collate, budget, cap = codes_length, collate_codes, cfg.max_tokens_per_batch, None
        return ShardDataset(
            self.shards(split),
            stages_factory=partial(self._stages, train),
            collate=collate,
            max_frames_per_batch=budget,
            bucket_buffer=cfg.bucket_buffer,
            max_batch_size=cap,
            shuffle=train,
            shuffle_buffer=cfg.shuffle_buffer,
            resampled=train and cfg.resampled,
            epoch_batches=cfg.epoch_batches if train else None,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
            length_fn=length_fn,
        )
