"""WebDataset shards: manifest readers, the shard writer, per-sample processors and the streaming dataset.

Shard layout (one tar member per file, keys never contain dots)::

    <key>.flac            ASR sample: FLAC PCM_16 at the source rate (mono)
    <key>.json            metadata: every manifest field except audio paths, plus sample_rate,
                          duration (s) and num_samples of the stored audio
    <key>.t0.flac, ...    spoken-QA sample: question audio of turn i; <key>.json keeps the turns'
                          text/metadata (each turn with sample_rate / duration / num_samples)

``<out_dir>/index.json`` lists the shards: ``{"shards": [{"path", "num_samples", "hours"}],
"num_samples", "hours", "speakers", ...}``.

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
import json
import logging
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from datamodules.audio import (
    INPUT_SAMPLE_RATE,
    AudioDecodeError,
    TruncatedAudioError,
    audio_info,
    encode_flac,
    load_audio,
    resample,
)
from datamodules.features import GlobalCMVN, fbank, spec_augment

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
SHARD_DIGITS = 6
DEFAULT_MAX_SHARD_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SHARD_SAMPLES = 10_000
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
# Manifest readers
# ================================================================================================


def read_jsonl_manifest(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the records of a JSONL manifest (blank lines ignored).

    ASR lines hold ``{"id", "audio", "text", "speaker", "language", "duration", "sample_rate",
    "split"}``; spoken-QA lines hold ``{"id", "speaker", "language", "split", "turns": [{"question",
    "answer", "gold", "family", "audio", "duration", "sample_rate"}]}``. Audio paths are relative to
    the corpus root given to :func:`write_shards`. Raises ``ValueError`` naming the file and line of
    an invalid record.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exn:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exn})") from exn
            if not isinstance(record, dict) or "id" not in record:
                raise ValueError(f"{path}:{lineno}: a record must be a JSON object with an 'id'")
            if "audio" not in record and "turns" not in record:
                raise ValueError(f"{path}:{lineno}: record {record['id']!r} has neither 'audio' nor 'turns'")
            if "turns" in record and any("audio" not in t for t in record["turns"]):
                raise ValueError(f"{path}:{lineno}: record {record['id']!r} has a turn without 'audio'")
            yield record


def _read_kaldi_table(path: Path) -> dict[str, str]:
    table: dict[str, str] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            parts = line.strip().split(maxsplit=1)
            utt = parts[0]
            if utt in table:
                raise ValueError(f"{path}:{lineno}: duplicate utterance id {utt!r}")
            table[utt] = parts[1].strip() if len(parts) > 1 else ""
    return table


def read_kaldi_dir(
    data_dir: str | os.PathLike, audio_root: str | os.PathLike | None = None, language: str | None = None
) -> Iterator[dict]:
    """Yield ASR records ``{"id", "audio", "text", "speaker", "language", "split"}`` from a Kaldi data dir.

    Reads ``wav.scp`` (``utt path``), ``text`` (``utt transcript``) and, if present, ``utt2spk``
    (otherwise the speaker is the utterance id, as in Kaldi). Relative audio paths are resolved
    against ``audio_root`` (default: the current directory, the Kaldi recipe convention).
    Pipe entries (``cmd |``) and ark offsets are rejected with ``ValueError``; utterances without a
    transcript are reported with a warning and left out.
    """
    data_dir = Path(data_dir)
    wav_scp, text_file, utt2spk_file = data_dir / "wav.scp", data_dir / "text", data_dir / "utt2spk"
    for required in (wav_scp, text_file):
        if not required.is_file():
            raise FileNotFoundError(f"Kaldi data dir {data_dir} has no {required.name}")
    wavs = _read_kaldi_table(wav_scp)
    for utt, rxfile in wavs.items():
        if rxfile.endswith("|") or rxfile.startswith("|"):
            raise ValueError(
                f"{wav_scp}: utterance {utt!r} is a pipe command ({rxfile!r}); pipes are not supported, "
                "write the audio to files first and list their paths in wav.scp"
            )
        if re.search(r"\.ark:\d+$", rxfile):
            raise ValueError(
                f"{wav_scp}: utterance {utt!r} points into an ark ({rxfile!r}); only audio files are supported"
            )
        if not rxfile:
            raise ValueError(f"{wav_scp}: utterance {utt!r} has no path")
    texts = _read_kaldi_table(text_file)
    spk = _read_kaldi_table(utt2spk_file) if utt2spk_file.is_file() else {}
    missing = [u for u in wavs if u not in texts]
    if missing:
        log.warning(
            "%s: %d of %d utterances in wav.scp have no transcript in %s and are left out (first: %s)",
            data_dir,
            len(missing),
            len(wavs),
            text_file.name,
            ", ".join(missing[:10]),
        )
    orphans = [u for u in texts if u not in wavs]
    if orphans:
        log.warning(
            "%s: %d transcripts have no audio in wav.scp (first: %s)", data_dir, len(orphans), ", ".join(orphans[:10])
        )
    root = Path(audio_root) if audio_root is not None else Path.cwd()
    for utt, rxfile in wavs.items():
        if utt not in texts:
            continue
        audio = Path(rxfile)
        if not audio.is_absolute():
            audio = root / audio
        yield {
            "id": utt,
            "audio": str(audio),
            "text": texts[utt],
            "speaker": spk.get(utt, utt),
            "language": language,
            "split": data_dir.name,
        }


# ================================================================================================
# Shard writer
# ================================================================================================


def make_key(record_id: Any) -> str:
    """Tar key for a record id: dots, slashes and whitespace become ``_`` (WebDataset splits keys at dots)."""
    key = re.sub(r"[.\s/\\]", "_", str(record_id))
    if not key:
        raise ValueError(f"record id {record_id!r} gives an empty key")
    return key


def _flac_payload(path: Path) -> tuple[bytes, int, int]:
    """``(flac_bytes, sample_rate, num_samples)``; FLAC files are copied, anything else re-encoded (mono PCM_16)."""
    sr, frames, _channels, fmt = audio_info(path)
    if fmt.upper() == "FLAC" and frames > 0:
        return path.read_bytes(), sr, frames
    wav, sr = load_audio(path)
    return encode_flac(wav, sr), sr, int(wav.shape[0])


def _audio_meta(sr: int, n: int) -> dict:
    return {"sample_rate": int(sr), "duration": round(n / sr, 6), "num_samples": int(n)}


def encode_record(record: dict, root: Path) -> tuple[dict, float]:
    """Turn one manifest record into a tar sample ``{"__key__", "flac" | "t{i}.flac", "json"}``.

    Returns ``(sample, seconds_of_audio)``. Raises ``AudioDecodeError`` for unreadable audio and
    ``ValueError`` for malformed records.
    """
    key = make_key(record["id"])
    meta = {k: v for k, v in record.items() if k != "audio"}
    sample: dict[str, Any] = {"__key__": key}
    if "turns" in record:
        turns, seconds = [], 0.0
        if not record["turns"]:
            raise ValueError(f"record {record['id']!r} has no turns")
        for i, turn in enumerate(record["turns"]):
            payload, sr, n = _flac_payload(root / turn["audio"])
            sample[f"t{i}.flac"] = payload
            turns.append({**{k: v for k, v in turn.items() if k != "audio"}, **_audio_meta(sr, n)})
            seconds += n / sr
        meta["turns"] = turns
        meta["num_turns"] = len(turns)
        meta["duration"] = round(seconds, 6)
    elif "audio" in record:
        payload, sr, n = _flac_payload(root / record["audio"])
        sample["flac"] = payload
        meta.update(_audio_meta(sr, n))
        seconds = n / sr
    else:
        raise ValueError(f"record {record.get('id')!r} has neither 'audio' nor 'turns'")
    sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return sample, seconds


class _ShardSink:
    """Rolls tar shards ``<out_dir>/<prefix>-NNNNNN.tar`` by size and sample count."""

    def __init__(self, out_dir: Path, prefix: str, max_bytes: int, max_samples: int) -> None:
        self.out_dir, self.prefix = out_dir, prefix
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self.shards: list[dict] = []
        self._writer: wds.TarWriter | None = None
        self._tmp: Path | None = None

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):0{SHARD_DIGITS}d}.tar"
        self._tmp = self.out_dir / (name + ".partial")
        self._writer = wds.TarWriter(str(self._tmp), encoder=False, mtime=0.0)
        self.shards.append({"path": name, "num_samples": 0, "hours": 0.0, "_bytes": 0})

    def _close(self) -> None:
        if self._writer is not None and self._tmp is not None:
            self._writer.close()
            os.replace(self._tmp, self.out_dir / self.shards[-1]["path"])
            self._writer, self._tmp = None, None

    def write(self, sample: dict, seconds: float) -> None:
        size = sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        cur = self.shards[-1] if self._writer is not None else None
        if (
            cur is None
            or cur["num_samples"] >= self.max_samples
            or (cur["num_samples"] > 0 and cur["_bytes"] + size > self.max_bytes)
        ):
            self._close()
            self._open()
            cur = self.shards[-1]
        assert self._writer is not None
        self._writer.write(sample)
        cur["num_samples"] += 1
        cur["_bytes"] += size
        cur["hours"] += seconds / 3600.0

    def close(self) -> list[dict]:
        self._close()
        return [{"path": s["path"], "num_samples": s["num_samples"], "hours": s["hours"]} for s in self.shards]


def _shard_name_re(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}-\d{{{SHARD_DIGITS}}}\.tar$")


def write_shards(
    records: Iterable[dict],
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    max_shard_samples: int = DEFAULT_MAX_SHARD_SAMPLES,
    *,
    total: int | None = None,
    progress: bool = True,
    strict: bool = False,
) -> dict:
    """Write ``records`` (from :func:`read_jsonl_manifest` / :func:`read_kaldi_dir`) as tar shards.

    Audio paths are resolved against ``root`` (absolute paths are kept). Shards are named
    ``<out_dir>/<prefix>-000000.tar``...; earlier shards with the same prefix are replaced. Records
    whose audio cannot be read, or whose id repeats, are skipped with a warning and counted in the
    index (``strict=True`` raises instead). ``<out_dir>/index.json`` is (re)written and also keeps
    the shards of *other* prefixes already listed there, so several writes can share a directory.

    Returns the index: ``{"shards": [{"path", "num_samples", "hours"}], "num_samples", "hours",
    "speakers" (count), "speaker_ids", "languages", "kinds", "parts": {prefix: {...}}}``.
    """
    root, out_dir = Path(root), Path(out_dir)
    if not prefix or "/" in prefix or "." in prefix:
        raise ValueError(f"shard prefix must be a non-empty name without '/' or '.', got {prefix!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    name_re = _shard_name_re(prefix)
    stale = [p for p in out_dir.iterdir() if name_re.match(p.name)]
    for p in stale:
        p.unlink()
    if stale:
        log.info("removed %d old shards %s-*.tar from %s", len(stale), prefix, out_dir)

    sink = _ShardSink(out_dir, prefix, int(max_shard_bytes), int(max_shard_samples))
    seen: set[str] = set()
    speakers: set[str] = set()
    languages: set[str] = set()
    kinds: set[str] = set()
    skipped: Counter = Counter()
    bar = tqdm(records, total=total, unit="utt", desc=f"shards {prefix}", disable=not progress)
    try:
        for record in bar:
            rid = record.get("id")
            try:
                key = make_key(rid)
                if key in seen:
                    raise ValueError(f"duplicate id {rid!r} (key {key!r})")
                sample, seconds = encode_record(record, root)
            except (AudioDecodeError, OSError, KeyError, ValueError) as exn:
                if strict:
                    raise
                reason = (
                    "unreadable_audio"
                    if isinstance(exn, (AudioDecodeError, OSError))
                    else "duplicate_id"
                    if "duplicate id" in str(exn)
                    else "bad_record"
                )
                skipped[reason] += 1
                log.warning("write_shards: skipping record %r: %s", rid, exn)
                continue
            seen.add(key)
            sink.write(sample, seconds)
            if record.get("speaker") is not None:
                speakers.add(str(record["speaker"]))
            if record.get("language") is not None:
                languages.add(str(record["language"]))
            kinds.add("spoken_qa" if "turns" in record else "asr")
    finally:
        bar.close()
        shards = sink.close()

    part = {
        "num_samples": sum(s["num_samples"] for s in shards),
        "hours": sum(s["hours"] for s in shards),
        "speaker_ids": sorted(speakers),
        "languages": sorted(languages),
        "kinds": sorted(kinds),
        "skipped": dict(skipped),
    }
    index = _merge_index(out_dir, prefix, shards, part)
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    return index


def _merge_index(out_dir: Path, prefix: str, shards: list[dict], part: dict) -> dict:
    old_shards: list[dict] = []
    parts: dict[str, dict] = {}
    index_path = out_dir / INDEX_NAME
    if index_path.is_file():
        try:
            old = json.loads(index_path.read_text())
            name_re = _shard_name_re(prefix)
            old_shards = [
                s for s in old.get("shards", []) if not name_re.match(s["path"]) and (out_dir / s["path"]).is_file()
            ]
            parts = {p: v for p, v in old.get("parts", {}).items() if p != prefix}
        except (json.JSONDecodeError, KeyError, TypeError) as exn:
            log.warning("ignoring unreadable old %s (%s)", index_path, exn)
    parts[prefix] = part
    all_shards = old_shards + shards
    speaker_ids = sorted({s for p in parts.values() for s in p.get("speaker_ids", [])})
    return {
        "shards": all_shards,
        "num_samples": sum(s["num_samples"] for s in all_shards),
        "hours": sum(s["hours"] for s in all_shards),
        "speakers": len(speaker_ids),
        "speaker_ids": speaker_ids,
        "languages": sorted({x for p in parts.values() for x in p.get("languages", [])}),
        "kinds": sorted({x for p in parts.values() for x in p.get("kinds", [])}),
        "parts": parts,
    }


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


def _decode_audio_entry(data: bytes, name: str, meta: dict, duration_tolerance: float) -> tuple[np.ndarray, float]:
    """Decode one stored audio member to 16 kHz; returns ``(wav [N] float32, seconds)``."""
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
    return resample(wav, sr, INPUT_SAMPLE_RATE), seconds


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


def sample_frames(sample: Sample) -> int:
    """Feature frames of a sample (sum over turns for QA); the bucketing length."""
    return sum(int(unit["feats"].shape[0]) for unit in _units(sample))


def check_frames(sample: Sample, *, max_frames_per_batch: int) -> Sample:
    """Reject samples with no frames or more frames than a whole batch may hold."""
    if any(int(unit["feats"].shape[0]) == 0 for unit in _units(sample)):
        raise SkipSample(SKIP_TOO_SHORT, "audio shorter than one 25 ms frame")
    frames = sample_frames(sample)
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
) -> list[Stage]:
    """The standard processor chain: decode -> filter -> fbank -> [CMVN] -> [SpecAugment].

    ``spec_augment_conf`` (keyword arguments of :func:`apply_spec_augment` without ``rng``) enables
    SpecAugment with ``rng``. Used by both the ASR and the spoken-QA data modules.
    """
    stages: list[Stage] = [
        partial(decode_sample, kind=kind, duration_tolerance=duration_tolerance),
        partial(filter_sample, min_duration_s=min_duration_s, max_duration_s=max_duration_s),
        compute_fbank,
    ]
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
        try:
            for stage in stages:
                sample = stage(sample)
        except SkipSample as skip:
            counter.add(skip.reason, f"{raw.get('__key__', '?')} ({raw.get('__url__', '?')})", skip.detail)
            continue
        yield sample


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
        if world_size * num_workers > len(self.shards) and not self.resampled and rank == 0 and worker == 0:
            log.warning(
                "%d shards for %d ranks x %d workers: some readers get no shard (write more, smaller shards)",
                len(self.shards),
                world_size,
                num_workers,
            )
        counter = SkipCounter()
        self.last_counter = counter
        reader_seed = _mix_seed(self.seed, epoch, rank, worker)
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
        sample_stages = [
            *self.stages_factory(np.random.default_rng(reader_seed)),
            partial(check_frames, max_frames_per_batch=self.max_frames_per_batch),
        ]
        stages.append(partial(_process_stream, stages=sample_stages, counter=counter))
        stages.append(
            partial(
                _batch_stream,
                collate=self.collate,
                counter=counter,
                bucket_buffer=self.bucket_buffer,
                max_frames_per_batch=self.max_frames_per_batch,
                length_fn=self.length_fn,
                max_batch_size=self.max_batch_size,
                rng=random.Random(reader_seed + 1) if self.shuffle else None,
            )
        )
        pipeline = wds.DataPipeline(*stages)
        if self.epoch_batches:
            pipeline = pipeline.with_epoch(math.ceil(self.epoch_batches / num_workers))
        yield from pipeline


def iter_decoded(
    shards: str | os.PathLike | Sequence[str], *, counter: SkipCounter | None = None, duration_tolerance: float = 0.1
) -> Iterator[Sample]:
    """Single-process, in-order iteration of decoded samples (16 kHz, see :func:`decode_sample`); for tools."""
    counter = counter if counter is not None else SkipCounter()
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(resolve_shards(shards)),
        wds.tarfile_to_samples(handler=counter.handle_exception),
        partial(
            _process_stream, stages=[partial(decode_sample, duration_tolerance=duration_tolerance)], counter=counter
        ),
    )
    yield from pipeline
