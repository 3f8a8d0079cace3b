"""WebDataset shards, reading side: shard lists, per-sample processors, batching and the streaming dataset.

Shards are written by :mod:`datamodules.shards.writer` (which documents the layout) from records
read by :mod:`datamodules.shards.manifests`.

Reading is a chain of small per-sample functions in the style of WeNet's ``processor.py``, each
usable alone: :func:`decode_sample` -> :func:`filter_sample` -> :func:`compute_fbank` ->
:func:`apply_cmvn` -> :func:`apply_spec_augment` -> :func:`check_frames`, then
:func:`bucket_batches` and a collate function (:func:`collate_asr` here, ``collate_qa`` in
:mod:`datamodules.spoken_qa`). A processor rejects a sample by raising :class:`SkipSample`; the
streaming :class:`ShardDataset` counts these in a :class:`SkipCounter` and attaches the counts
since the previous batch to each batch as ``batch["skipped"] = {reason: count}``.
"""

from __future__ import annotations

import glob
import inspect
import json
import logging
import math
import os
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.nn.utils.rnn import pad_sequence

from datamodules.audio import (
    INPUT_SAMPLE_RATE,
    AudioDecodeError,
    TruncatedAudioError,
    load_audio,
    resample,
)
from datamodules.features import GlobalCMVN, fbank, spec_augment, warp_augment

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
SHARD_DIGITS = 6
AUDIO_EXTENSIONS = ("flac", "wav")

# Skip reasons (keys of SkipCounter / batch["skipped"]).
SKIP_BAD_JSON = "bad_json"
SKIP_MISSING_AUDIO = "missing_audio"
SKIP_DECODE_ERROR = "decode_error"
SKIP_TRUNCATED = "truncated"
SKIP_DURATION_MISMATCH = "duration_mismatch"
SKIP_EMPTY_TEXT = "empty_text"
SKIP_TOO_SHORT = "too_short"
SKIP_TOO_LONG = "too_long"
SKIP_TOO_MANY_FRAMES = "too_many_frames"
SKIP_TAR_ERROR = "tar_error"

Sample = dict[str, Any]
Stage = Callable[[Sample], Sample]


# ================================================================================================
# Shard lists
# ================================================================================================


def resolve_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand a shard specification into a list of tar paths / URLs.

    ``spec`` may be a directory (its ``index.json`` if present, else its ``*.tar`` sorted), a brace
    pattern (``dir/train-{000000..000009}.tar``, ``::`` joins several), a glob (``dir/*.tar``), a
    single tar file, a ``pipe:``/URL spec (kept as is), or a list of any of these.
    """
    if isinstance(spec, (list, tuple)):
        return [s for item in spec for s in resolve_shards(item)]
    text = str(spec)
    if "::" in text:
        return [s for item in text.split("::") for s in resolve_shards(item)]
    if text.startswith("pipe:") or "://" in text:
        return list(wds.shardlists.expand_urls(text))
    path = Path(text)
    if path.is_dir():
        index = path / INDEX_NAME
        if index.is_file():
            shards = [str(path / s["path"]) for s in json.loads(index.read_text())["shards"]]
            missing = [s for s in shards if not Path(s).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} of {len(shards)} shards listed in {index} do not exist: "
                    f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} "
                    "(the index is stale: rewrite the shards, e.g. with tools/write_shards.py)"
                )
        else:
            shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"no shards in directory {path}")
        return shards
    if "{" in text:
        shards = list(wds.shardlists.expand_urls(text))
    elif any(c in text for c in "*?["):
        shards = sorted(glob.glob(text))
    else:
        shards = [text]
    if not shards:
        raise FileNotFoundError(f"no shards match {text!r}")
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(shards)} shards of {text!r} do not exist (first: {missing[0]})"
        )
    return shards


# ================================================================================================
# Skipping
# ================================================================================================


class SkipSample(Exception):
    """Raised by a per-sample processor to drop the sample; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Counts skipped samples by reason and logs them at WARNING (rate-limited per reason).

    The first ``log_first`` skips of each reason are logged, then every ``log_every``-th.
    :meth:`pop_delta` returns the counts since its previous call (what a batch carries).
    """

    def __init__(self, log_first: int = 10, log_every: int = 1000) -> None:
        self.log_first, self.log_every = log_first, log_every
        self.totals: Counter = Counter()
        self._pending: Counter = Counter()

    def add(self, reason: str, key: str = "?", detail: str = "") -> None:
        self.totals[reason] += 1
        self._pending[reason] += 1
        n = self.totals[reason]
        if n <= self.log_first or n % self.log_every == 0:
            log.warning(
                "skipping sample %s: %s%s (%d '%s' skips so far in this worker)",
                key,
                reason,
                f" ({detail})" if detail else "",
                n,
                reason,
            )

    def pop_delta(self) -> dict[str, int]:
        delta = dict(self._pending)
        self._pending.clear()
        return delta

    def handle_exception(self, exn: Exception) -> bool:
        """WebDataset ``handler``: count a tar-level error as ``tar_error`` and continue."""
        self.add(SKIP_TAR_ERROR, "?", repr(exn)[:300])
        return True


# ================================================================================================
# Per-sample processors
# ================================================================================================


def _decode_audio_entry(
    data: bytes, name: str, meta: dict, duration_tolerance: float, rate: int = INPUT_SAMPLE_RATE
) -> tuple[np.ndarray, float]:
    """Decode one stored audio member to ``rate`` (16 kHz); returns ``(wav [N] float32, seconds)``."""
    try:
        wav, sr = load_audio(data)
    except TruncatedAudioError as exn:
        raise SkipSample(SKIP_TRUNCATED, f"{name}: {exn}") from exn
    except AudioDecodeError as exn:
        raise SkipSample(SKIP_DECODE_ERROR, f"{name}: {exn}") from exn
    seconds = wav.shape[0] / sr
    expected = meta.get("duration")
    if expected is not None:
        try:
            expected = float(expected)
        except (TypeError, ValueError) as exn:
            raise SkipSample(SKIP_BAD_JSON, f"{name}: duration {expected!r} is not a number") from exn
        if not math.isfinite(expected) or abs(seconds - expected) > duration_tolerance * max(expected, 1e-3):
            raise SkipSample(SKIP_DURATION_MISMATCH, f"{name}: metadata says {expected} s, audio has {seconds:.3f} s")
    return resample(wav, sr, rate), seconds


def _raw_meta(raw: dict) -> dict:
    if "json" not in raw:
        raise SkipSample(SKIP_BAD_JSON, "no .json member")
    try:
        meta = json.loads(raw["json"])
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exn:
        raise SkipSample(SKIP_BAD_JSON, str(exn)) from exn
    if not isinstance(meta, dict):
        raise SkipSample(SKIP_BAD_JSON, "metadata is not a JSON object")
    return meta


def _raw_audio(raw: dict, stem: str) -> bytes:
    for ext in AUDIO_EXTENSIONS:
        name = f"{stem}.{ext}" if stem else ext
        if name in raw:
            return raw[name]
    raise SkipSample(SKIP_MISSING_AUDIO, f"no {stem or ''}.flac member")


def decode_sample(raw: dict, *, kind: str | None = None, duration_tolerance: float = 0.1) -> Sample:
    """Decode a raw WebDataset sample (``{"__key__", "json", "flac" | "t0.flac"...}``) to 16 kHz.

    ASR result: ``{"key", "url", "wav" [N] float32 16 kHz, "sr", "text", "speaker", "language",
    "duration" (s), "meta"}``. Spoken-QA result: ``{"key", "url", "speaker", "language",
    "duration" (total s), "meta", "turns": [{"wav", "sr", "question", "answer", "gold", "family",
    "duration"}]}``. ``kind`` ("asr" / "spoken_qa") makes a sample of the other kind a
    ``ValueError`` (wrong shards for the data module). Raises :class:`SkipSample` for a missing or
    bad JSON, missing / corrupt / truncated audio, or a stored duration off by more than
    ``duration_tolerance`` (relative) from the decoded audio.
    """
    meta = _raw_meta(raw)
    is_qa = "turns" in meta
    if kind is not None and kind != ("spoken_qa" if is_qa else "asr"):
        raise ValueError(
            f"sample {raw.get('__key__')} in {raw.get('__url__')} is a {'spoken_qa' if is_qa else 'asr'} "
            f"sample but this pipeline reads {kind} shards"
        )
    common = {
        "key": raw.get("__key__", str(meta.get("id", "?"))),
        "url": raw.get("__url__"),
        "speaker": str(meta.get("speaker", "")),
        "language": meta.get("language"),
        "meta": meta,
    }
    if not is_qa:
        wav, seconds = _decode_audio_entry(_raw_audio(raw, ""), "flac", meta, duration_tolerance)
        return {**common, "wav": wav, "sr": INPUT_SAMPLE_RATE, "text": str(meta.get("text") or ""), "duration": seconds}
    turns_meta = meta["turns"]
    if not isinstance(turns_meta, list) or not turns_meta:
        raise SkipSample(SKIP_BAD_JSON, "'turns' is empty or not a list")
    turns = []
    for i, tmeta in enumerate(turns_meta):
        wav, seconds = _decode_audio_entry(_raw_audio(raw, f"t{i}"), f"t{i}.flac", tmeta, duration_tolerance)
        gold = tmeta.get("gold") or []
        turns.append(
            {
                "wav": wav,
                "sr": INPUT_SAMPLE_RATE,
                "question": str(tmeta.get("question") or ""),
                "answer": str(tmeta.get("answer") or ""),
                "gold": [str(g) for g in (gold if isinstance(gold, list) else [gold])],
                "family": tmeta.get("family"),
                "duration": seconds,
            }
        )
    return {**common, "turns": turns, "duration": sum(t["duration"] for t in turns)}


def _units(sample: Sample) -> list[dict]:
    """The dicts holding audio/features: the turns of a QA sample, else the sample itself."""
    return sample.get("turns", [sample])


def filter_sample(sample: Sample, *, min_duration_s: float = 0.1, max_duration_s: float = 30.0) -> Sample:
    """Reject empty transcripts (ASR text, QA question or answer) and audio outside [min, max] seconds
    (per turn for QA) with :class:`SkipSample`."""
    for unit in _units(sample):
        texts = [unit["question"], unit["answer"]] if "question" in unit else [unit["text"]]
        if any(not t.strip() for t in texts):
            raise SkipSample(SKIP_EMPTY_TEXT)
        if unit["duration"] < min_duration_s:
            raise SkipSample(SKIP_TOO_SHORT, f"{unit['duration']:.3f} s < {min_duration_s} s")
        if unit["duration"] > max_duration_s:
            raise SkipSample(SKIP_TOO_LONG, f"{unit['duration']:.3f} s > {max_duration_s} s")
    return sample


def append_silence(sample: Sample, *, seconds: float) -> Sample:
    """Append ``seconds`` of digital silence to every 16 kHz ``wav`` (each turn of a QA sample).

    A spoken turn reaches a streaming system followed by the silence its end-of-turn decision
    waits for; a synthetic or tightly cut recording has none, and a chunk-streaming encoder with
    no look-ahead then loses the last word. ``duration`` stays the speech's."""
    for unit in _units(sample):
        pad = np.zeros(round(seconds * unit["sr"]), dtype=unit["wav"].dtype)
        unit["wav"] = np.concatenate([unit["wav"], pad])
    return sample


def compute_fbank(sample: Sample) -> Sample:
    """Add ``feats`` (torch float32 ``[T, 80]``) next to every 16 kHz ``wav``."""
    for unit in _units(sample):
        unit["feats"] = torch.from_numpy(fbank(unit["wav"], unit["sr"]))
    return sample


def apply_cmvn(sample: Sample, *, cmvn: GlobalCMVN) -> Sample:
    """Normalise every ``feats [T, 80]`` with global CMVN."""
    for unit in _units(sample):
        unit["feats"] = cmvn(unit["feats"])
    return sample


def apply_spec_augment(
    sample: Sample,
    *,
    rng: np.random.Generator,
    num_freq_masks: int = 2,
    freq_width: int = 10,
    num_time_masks: int = 2,
    time_width: int = 50,
) -> Sample:
    """SpecAugment every ``feats [T, 80]`` (see :func:`datamodules.features.spec_augment`)."""
    for unit in _units(sample):
        unit["feats"] = spec_augment(unit["feats"], rng, num_freq_masks, freq_width, num_time_masks, time_width)
    return sample


def apply_warp(sample: Sample, *, rng: np.random.Generator, max_time_stretch: float, max_freq_warp: float) -> Sample:
    """Feature-domain speed + vocal-tract perturbation of every ``feats`` (see :func:`warp_augment`)."""
    for unit in _units(sample):
        unit["feats"] = warp_augment(unit["feats"], rng, max_time_stretch, max_freq_warp)
    return sample


def sample_frames(sample: Sample) -> int:
    """Feature frames of a sample (sum over turns for QA); the bucketing length."""
    return sum(int(unit["feats"].shape[0]) for unit in _units(sample))


def check_frames(
    sample: Sample, *, max_frames_per_batch: int, length_fn: Callable[[Sample], int] = sample_frames
) -> Sample:
    """Reject samples with no frames or more frames (``length_fn``) than a whole batch may hold."""
    if length_fn is sample_frames and any(int(unit["feats"].shape[0]) == 0 for unit in _units(sample)):
        raise SkipSample(SKIP_TOO_SHORT, "audio shorter than one 25 ms frame")
    frames = length_fn(sample)
    if frames > max_frames_per_batch:
        raise SkipSample(SKIP_TOO_MANY_FRAMES, f"{frames} frames > max_frames_per_batch={max_frames_per_batch}")
    return sample


def build_stages(
    rng: np.random.Generator,
    *,
    kind: str | None,
    min_duration_s: float,
    max_duration_s: float,
    duration_tolerance: float = 0.1,
    cmvn: GlobalCMVN | None = None,
    spec_augment_conf: dict | None = None,
    warp_conf: dict | None = None,
    tail_silence_s: float = 0.0,
) -> list[Stage]:
    """The standard processor chain: decode -> filter -> [tail silence] -> fbank -> [warp] -> [CMVN]
    -> [SpecAugment].

    ``spec_augment_conf`` (keyword arguments of :func:`apply_spec_augment` without ``rng``) enables
    SpecAugment with ``rng``; ``warp_conf`` (keyword arguments of :func:`apply_warp`) enables the
    feature-domain speed / vocal-tract perturbation before CMVN; ``tail_silence_s`` > 0 appends
    that much silence to every utterance or turn (:func:`append_silence`; the duration filter
    sees the speech alone). Used by both the ASR and the spoken-QA data modules.
    """
    if tail_silence_s < 0:
        raise ValueError(f"tail_silence_s must be >= 0, got {tail_silence_s}")
    stages: list[Stage] = [
        partial(decode_sample, kind=kind, duration_tolerance=duration_tolerance),
        partial(filter_sample, min_duration_s=min_duration_s, max_duration_s=max_duration_s),
    ]
    if tail_silence_s > 0:
        stages.append(partial(append_silence, seconds=tail_silence_s))
    stages.append(compute_fbank)
    if warp_conf is not None:
        stages.append(partial(apply_warp, rng=rng, **warp_conf))
    if cmvn is not None:
        stages.append(partial(apply_cmvn, cmvn=cmvn))
    if spec_augment_conf is not None:
        stages.append(partial(apply_spec_augment, rng=rng, **spec_augment_conf))
    return stages


# ================================================================================================
# Batching and collation
# ================================================================================================


def _split_sorted(
    buf: list[Sample], max_frames_per_batch: int, length_fn: Callable[[Sample], int], max_batch_size: int | None
) -> list[list[Sample]]:
    batches: list[list[Sample]] = []
    cur: list[Sample] = []
    cur_max = 0
    for sample in sorted(buf, key=length_fn):
        n = length_fn(sample)
        new_max = max(cur_max, n)
        full = max_batch_size is not None and len(cur) >= max_batch_size
        if cur and (full or (len(cur) + 1) * new_max > max_frames_per_batch):
            batches.append(cur)
            cur, new_max = [], n
        cur.append(sample)
        cur_max = new_max
    if cur:
        batches.append(cur)
    return batches


def bucket_batches(
    samples: Iterable[Sample],
    *,
    bucket_buffer: int,
    max_frames_per_batch: int,
    length_fn: Callable[[Sample], int] = sample_frames,
    max_batch_size: int | None = None,
    rng: random.Random | None = None,
) -> Iterator[list[Sample]]:
    """Length-bucketed batching.

    Buffers ``bucket_buffer`` samples, sorts them by ``length_fn`` (frames) and cuts batches so
    that ``len(batch) * max(length in batch) <= max_frames_per_batch`` (and ``len(batch) <=
    max_batch_size``). The last, incomplete batch of a buffer is carried over into the next buffer.
    With ``rng`` the batches of each buffer are yielded in random order. A sample longer than the
    budget forms a batch alone (:func:`check_frames` drops those earlier in the pipeline).
    """
    if bucket_buffer < 1 or max_frames_per_batch < 1:
        raise ValueError("bucket_buffer and max_frames_per_batch must be positive")
    buf: list[Sample] = []
    for sample in samples:
        buf.append(sample)
        if len(buf) >= bucket_buffer:
            batches = _split_sorted(buf, max_frames_per_batch, length_fn, max_batch_size)
            buf = batches.pop() if len(batches) > 1 else []
            if rng is not None:
                rng.shuffle(batches)
            yield from batches
    if buf:
        batches = _split_sorted(buf, max_frames_per_batch, length_fn, max_batch_size)
        if rng is not None:
            rng.shuffle(batches)
        yield from batches


def pad_feats(feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad a list of ``[T_i, D]`` tensors to ``feats [B, T, D]``; also returns ``feats_lens [B]`` (int64)."""
    lens = torch.tensor([int(f.shape[0]) for f in feats], dtype=torch.long)
    return pad_sequence(list(feats), batch_first=True), lens


def collate_asr(batch: Sequence[Sample]) -> dict[str, Any]:
    """Collate ASR samples into ``{"feats" [B, T, 80] float32, "feats_lens" [B] int64, "texts" list[str],
    "keys" list[str], "speakers" list[str], "languages" list[str | None], "durations" [B] float32 (s)}``."""
    feats, feats_lens = pad_feats([s["feats"] for s in batch])
    return {
        "feats": feats,
        "feats_lens": feats_lens,
        "texts": [s["text"] for s in batch],
        "keys": [s["key"] for s in batch],
        "speakers": [s["speaker"] for s in batch],
        "languages": [s["language"] for s in batch],
        "durations": torch.tensor([s["duration"] for s in batch], dtype=torch.float32),
    }


# ================================================================================================
# Streaming dataset
# ================================================================================================


def _process_stream(src: Iterable[dict], *, stages: Sequence[Stage], counter: SkipCounter) -> Iterator[Sample]:
    for raw in src:
        sample: Sample = raw
        key, url = raw.get("__key__", raw.get("key", "?")), raw.get("__url__", raw.get("url", "?"))
        try:
            for stage in stages:
                sample = stage(sample)
        except SkipSample as skip:
            counter.add(skip.reason, f"{key} ({url})", skip.detail)
            continue
        yield sample


def _is_stage(stage: Callable, fn: Callable) -> bool:
    """Whether ``stage`` is ``fn``, possibly wrapped in (nested) ``functools.partial`` / ``functools.wraps``."""
    while isinstance(stage, partial):
        stage = stage.func
    return stage is fn or inspect.unwrap(stage) is fn


def split_at_fbank(stages: Sequence[Stage]) -> tuple[list[Stage], list[Stage]]:
    """Split a processor chain after its :func:`compute_fbank` stage: ``(decode..fbank, CMVN/SpecAugment...)``."""
    stages = list(stages)
    for i, stage in enumerate(stages):
        if _is_stage(stage, compute_fbank):
            return stages[: i + 1], stages[i + 1 :]
    raise ValueError(
        "cache_samples=True needs a compute_fbank stage in stages_factory(rng) (the cache keeps the samples "
        f"right after it); got stages {stages!r}"
    )


def copy_sample(sample: Sample) -> Sample:
    """A copy of the sample dict (and of a QA sample's ``turns`` list and turn dicts) sharing the arrays."""
    out = dict(sample)
    if isinstance(out.get("turns"), list):
        out["turns"] = [dict(turn) for turn in out["turns"]]
    return out


def _cache_stream(src: Iterable[Sample], *, store: list[Sample], on_complete: Callable[[], None]) -> Iterator[Sample]:
    """Pass samples through, keeping a copy of each in ``store``; ``on_complete()`` once ``src`` is exhausted."""
    for sample in src:
        store.append(copy_sample(sample))
        yield sample
    on_complete()


def _batch_stream(
    src: Iterable[Sample], *, collate: Callable[[list[Sample]], dict], counter: SkipCounter, **bucket_kwargs: Any
) -> Iterator[dict]:
    for batch in bucket_batches(src, **bucket_kwargs):
        out = collate(batch)
        out["skipped"] = counter.pop_delta()
        yield out


def _split_by_rank(src: Iterable, *, rank: int, world_size: int) -> Iterator:
    yield from (item for i, item in enumerate(src) if i % world_size == rank)


def _mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class ShardDataset(torch.utils.data.IterableDataset):
    """Streams batches from WebDataset shards (use with ``DataLoader(batch_size=None)``).

    Pipeline per epoch: shard list (shuffled with ``seed + epoch`` identically on every rank, or
    resampled with replacement per rank/worker when ``resampled``) -> split by node (rank) -> split
    by DataLoader worker -> tar samples -> sample shuffle buffer -> ``stages_factory(rng)`` processors
    -> :func:`check_frames` -> :func:`bucket_batches` -> ``collate``. Every yielded batch also holds
    ``"skipped": {reason: count}`` for the samples this worker dropped since its previous batch.

    ``rank`` / ``world_size`` default to WebDataset's detection (``RANK``/``WORLD_SIZE`` env or
    ``torch.distributed``); pass them explicitly when known (the data modules take them from the
    trainer). ``epoch_batches`` (batches per rank and epoch) makes every rank yield the same number
    of batches, repeating the data if needed: set it for multi-GPU training, and always with
    ``resampled`` (otherwise an epoch never ends). The epoch advances at each ``__iter__`` (use
    ``persistent_workers=True`` so worker copies keep counting) or via :meth:`set_epoch`.

    ``cache_samples`` (for small corpora read with ``num_workers=0``) keeps every sample as it is
    right after the :func:`compute_fbank` stage (decoded, filtered, fbank; before CMVN / SpecAugment)
    during the first epoch that reads its shards to the end; later epochs read no tar at all and
    iterate over copies of the cached samples (a permutation seeded from ``seed`` and the epoch when
    ``shuffle``, else in stored order) through the remaining stages, :func:`check_frames`, bucketing
    and ``collate``. An epoch stopped before its shards were exhausted leaves no cache (the next one
    fills it again). Skips of the cached stages are counted only in the filling epoch. Stages after
    ``compute_fbank`` must not modify the cached tensors in place (the standard ones return new
    tensors). Needs a finite fixed epoch (no ``resampled`` / ``epoch_batches``); in DataLoader
    workers the cache is off (a warning says so), since every worker copy would cache its own part.
    """

    def __init__(
        self,
        shards: Sequence[str],
        *,
        stages_factory: Callable[[np.random.Generator], Sequence[Stage]],
        collate: Callable[[list[Sample]], dict] = collate_asr,
        max_frames_per_batch: int,
        bucket_buffer: int = 500,
        max_batch_size: int | None = None,
        shuffle: bool = False,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_batches: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        length_fn: Callable[[Sample], int] = sample_frames,
        cache_samples: bool = False,
    ) -> None:
        super().__init__()
        self.shards = list(shards)
        if not self.shards:
            raise ValueError("ShardDataset needs at least one shard")
        if resampled and not epoch_batches:
            raise ValueError("resampled=True needs epoch_batches (an epoch would never end)")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:  # type: ignore[operator]
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if cache_samples and (resampled or epoch_batches):
            raise ValueError(
                f"cache_samples=True conflicts with resampled={resampled} / epoch_batches={epoch_batches}: "
                "the sample cache needs a fixed, finite epoch over the shards (turn one of them off)"
            )
        self.stages_factory = stages_factory
        self.collate = collate
        self.max_frames_per_batch = int(max_frames_per_batch)
        self.bucket_buffer = int(bucket_buffer)
        self.max_batch_size = max_batch_size
        self.shuffle = shuffle
        self.shuffle_buffer = int(shuffle_buffer)
        self.resampled = resampled
        self.epoch_batches = epoch_batches
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.length_fn = length_fn
        self.epoch = 0
        self.last_counter: SkipCounter | None = None
        self.cache_samples = bool(cache_samples)
        self._cache: list[Sample] | None = None  # set only once complete
        self._warned_workers = False

    def __getstate__(self) -> dict:
        # DataLoader workers (and copies) run uncached: never ship the cache to them.
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    @property
    def cached_samples(self) -> list[Sample] | None:
        """The complete sample cache (samples right after ``compute_fbank``), or None while not filled."""
        return self._cache

    @property
    def cache_complete(self) -> bool:
        return self._cache is not None

    def _set_cache(self, samples: list[Sample]) -> None:
        self._cache = samples
        log.info("cached %d decoded samples (fbank); later epochs read no shards", len(samples))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _node_info(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        rank, world_size, _, _ = wds.utils.pytorch_worker_info()
        return rank, world_size

    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch
        self.epoch += 1
        rank, world_size = self._node_info()
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        use_cache = self.cache_samples
        if use_cache and info is not None:
            use_cache = False
            if worker == 0 and not self._warned_workers:
                log.warning(
                    "cache_samples=True has no effect in DataLoader workers (num_workers=%d): every worker would "
                    "cache its own part; reading the shards every epoch (use num_workers=0 to cache)",
                    num_workers,
                )
            self._warned_workers = True
        counter = SkipCounter()
        self.last_counter = counter
        reader_seed = _mix_seed(self.seed, epoch, rank, worker)
        sample_stages = list(self.stages_factory(np.random.default_rng(reader_seed)))
        check = partial(check_frames, max_frames_per_batch=self.max_frames_per_batch, length_fn=self.length_fn)
        batch_stage = partial(
            _batch_stream,
            collate=self.collate,
            counter=counter,
            bucket_buffer=self.bucket_buffer,
            max_frames_per_batch=self.max_frames_per_batch,
            length_fn=self.length_fn,
            max_batch_size=self.max_batch_size,
            rng=random.Random(reader_seed + 1) if self.shuffle else None,
        )
        if use_cache:
            head, tail = split_at_fbank(sample_stages)
            cache = self._cache
            if cache is not None:
                if self.shuffle:
                    order = np.random.default_rng(_mix_seed(self.seed, epoch, rank, 2)).permutation(len(cache))
                else:
                    order = np.arange(len(cache))
                copies = (copy_sample(cache[i]) for i in order)
                yield from batch_stage(_process_stream(copies, stages=[*tail, check], counter=counter))
                return

        if world_size * num_workers > len(self.shards) and not self.resampled and rank == 0 and worker == 0:
            log.warning(
                "%d shards for %d ranks x %d workers: some readers get no shard (write more, smaller shards)",
                len(self.shards),
                world_size,
                num_workers,
            )
        stages: list[Any] = []
        if self.resampled:
            stages.append(
                wds.ResampledShards(
                    self.shards,
                    seed=_mix_seed(self.seed, epoch),
                    worker_seed=lambda: _mix_seed(rank, worker),
                    deterministic=True,
                )
            )
        else:
            stages.append(wds.SimpleShardList(self.shards, seed=_mix_seed(self.seed, epoch) if self.shuffle else None))
            if self.rank is None:
                stages.append(wds.split_by_node)
            else:
                stages.append(partial(_split_by_rank, rank=rank, world_size=world_size))
            stages.append(wds.split_by_worker)
        stages.append(wds.tarfile_to_samples(handler=counter.handle_exception))
        if self.shuffle:
            stages.append(
                wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=random.Random(reader_seed))
            )
        if use_cache:
            # Filling epoch: the cache becomes visible only once the shards were read to the end.
            filling: list[Sample] = []
            stages.append(partial(_process_stream, stages=head, counter=counter))
            stages.append(partial(_cache_stream, store=filling, on_complete=partial(self._set_cache, filling)))
            stages.append(partial(_process_stream, stages=[*tail, check], counter=counter))
        else:
            stages.append(partial(_process_stream, stages=[*sample_stages, check], counter=counter))
        stages.append(batch_stage)
        pipeline = wds.DataPipeline(*stages)
        if self.epoch_batches:
            pipeline = pipeline.with_epoch(math.ceil(self.epoch_batches / num_workers))
        yield from pipeline


def iter_raw(shards: str | os.PathLike | Sequence[str], counter: SkipCounter | None = None) -> Iterator[dict]:
    """Single-process, in-order iteration of the raw tar samples (``{"__key__", "json", "flac", ...}``
    as bytes); unreadable tar members are counted in ``counter``, not raised."""
    counter = counter if counter is not None else SkipCounter()
    yield from wds.DataPipeline(
        wds.SimpleShardList(resolve_shards(shards)), wds.tarfile_to_samples(handler=counter.handle_exception)
    )


def iter_decoded(
    shards: str | os.PathLike | Sequence[str], *, counter: SkipCounter | None = None, duration_tolerance: float = 0.1
) -> Iterator[Sample]:
    """Single-process, in-order iteration of decoded samples (16 kHz, see :func:`decode_sample`); for tools."""
    counter = counter if counter is not None else SkipCounter()
    stages = [partial(decode_sample, duration_tolerance=duration_tolerance)]
    yield from _process_stream(iter_raw(shards, counter), stages=stages, counter=counter)


def iter_metadata(shards: str | os.PathLike | Sequence[str]) -> Iterator[tuple[str, dict]]:
    """(key, metadata) of every sample, reading only the ``.json`` members (no audio is decoded)."""
    for shard in resolve_shards(shards):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    key = member.name[: -len(".json")]
                    try:
                        meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
                        log.warning("bad JSON for %s in %s: %s", key, shard, exn)
                        continue
                    yield key, meta
