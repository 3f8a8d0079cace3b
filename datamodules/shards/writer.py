"""Shard writer: turns manifest records (:mod:`datamodules.shards.manifests`) into WebDataset tar shards.

Shard layout (one tar member per file, keys never contain dots)::

    <key>.flac            ASR sample: FLAC PCM_16 at the source rate (mono)
    <key>.json            metadata: every manifest field except audio paths, plus sample_rate,
                          duration (s) and num_samples of the stored audio
    <key>.t0.flac, ...    spoken-QA sample: question audio of turn i; <key>.json keeps the turns'
                          text/metadata (each turn with sample_rate / duration / num_samples)

``<out_dir>/index.json`` lists the shards: ``{"shards": [{"path", "num_samples", "hours"}],
"num_samples", "hours", "speakers", ...}``.

The shards are read back by :mod:`datamodules.shards.reader`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm.auto import tqdm

from datamodules.audio import AudioDecodeError, audio_info, encode_flac, load_audio
from datamodules.shards.reader import INDEX_NAME, SHARD_DIGITS

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SHARD_SAMPLES = 10_000


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
    """Rolls tar shards ``<prefix>-NNNNNN.tar`` by size and sample count, written into ``stage_dir``."""

    def __init__(self, stage_dir: Path, prefix: str, max_bytes: int, max_samples: int) -> None:
        self.stage_dir, self.prefix = stage_dir, prefix
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self.shards: list[dict] = []
        self._writer: wds.TarWriter | None = None

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):0{SHARD_DIGITS}d}.tar"
        self._writer = wds.TarWriter(str(self.stage_dir / name), encoder=False, mtime=0.0)
        self.shards.append({"path": name, "num_samples": 0, "hours": 0.0, "_bytes": 0})

    def _close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

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

    def abort(self) -> None:
        """Close the open shard after a failure, ignoring errors (its file is discarded anyway)."""
        try:
            self._close()
        except Exception as exn:  # the original error is what matters
            log.debug("closing the partial shard failed: %s", exn)


def _shard_name_re(prefix: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(prefix)}-\d{{{SHARD_DIGITS}}}\.tar$")


def _staging_dir(out_dir: Path, prefix: str) -> Path:
    """Where a write of ``prefix`` puts its shards and index until it commits (hidden, so no ``*.tar`` glob sees it)."""
    return out_dir / f".staging-{prefix}"


def _remove_stray_temporaries(out_dir: Path, prefix: str) -> None:
    """Remove what a crashed (killed) earlier write of ``prefix`` left: its staging dir and ``*.tar.partial`` files."""
    stray: list[Path] = []
    stage = _staging_dir(out_dir, prefix)
    if stage.is_symlink() or stage.is_file():
        stage.unlink()
        stray.append(stage)
    elif stage.is_dir():
        shutil.rmtree(stage)
        stray.append(stage)
    partial_re = re.compile(rf"^{re.escape(prefix)}-\d{{{SHARD_DIGITS}}}\.tar\.partial$")
    for p in out_dir.iterdir():
        if partial_re.match(p.name) and p.is_file():
            p.unlink()
            stray.append(p)
    if stray:
        log.warning(
            "removed temporary files of an interrupted earlier write of %r: %s", prefix, [p.name for p in stray]
        )


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
    """Write ``records`` (from :func:`~datamodules.shards.manifests.read_jsonl_manifest` /
    :func:`~datamodules.shards.manifests.read_kaldi_dir`) as tar shards.

    Audio paths are resolved against ``root`` (absolute paths are kept). Shards are named
    ``<out_dir>/<prefix>-000000.tar``...; earlier shards with the same prefix are replaced. Records
    whose audio cannot be read, or whose id repeats, are skipped with a warning and counted in the
    index (``strict=True`` raises instead). ``<out_dir>/index.json`` is (re)written and also keeps
    the shards of *other* prefixes already listed there, so several writes can share a directory.

    The write is transactional: the new shards go to ``<out_dir>/.staging-<prefix>/`` and replace
    the old ones (then ``index.json``, atomically) only once every record has been written. If it
    fails or is interrupted, the temporary files are removed, the previous shards and index are left
    as they were and the error is re-raised. Temporary files left by a killed earlier write of the
    same prefix are removed when the next one starts.

    Returns the index: ``{"shards": [{"path", "num_samples", "hours"}], "num_samples", "hours",
    "speakers" (count), "speaker_ids", "languages", "kinds", "parts": {prefix: {...}}}``.
    """
    root = Path(root)
    return _transaction(
        out_dir,
        prefix,
        lambda stage: _write_staged(
            records, root, stage, prefix, max_shard_bytes, max_shard_samples, total, progress, strict
        ),
    )


def _transaction(
    out_dir: str | os.PathLike, prefix: str, write_staged: Callable[[Path], tuple[list[dict], dict]]
) -> dict:
    """Run `write_staged(staging dir) -> (shards, part)`, then merge and commit the index (see
    :func:`write_shards`: old shards stay until every sample is written; temporaries are removed)."""
    out_dir = Path(out_dir)
    if not prefix or "/" in prefix or "." in prefix:
        raise ValueError(f"shard prefix must be a non-empty name without '/' or '.', got {prefix!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stray_temporaries(out_dir, prefix)
    stage = _staging_dir(out_dir, prefix)
    stage.mkdir()
    try:
        shards, part = write_staged(stage)
        index = _merge_index(out_dir, prefix, shards, part)
        staged_index = stage / INDEX_NAME
        staged_index.write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
        _commit(out_dir, stage, prefix, [s["path"] for s in shards], staged_index)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return index


def _write_staged(
    records: Iterable[dict],
    root: Path,
    stage: Path,
    prefix: str,
    max_shard_bytes: int,
    max_shard_samples: int,
    total: int | None,
    progress: bool,
    strict: bool,
) -> tuple[list[dict], dict]:
    """Write every record into shards under ``stage``; returns ``(shards, part)`` (the prefix's index entry)."""
    sink = _ShardSink(stage, prefix, int(max_shard_bytes), int(max_shard_samples))
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
        shards = sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        bar.close()

    part = {
        "num_samples": sum(s["num_samples"] for s in shards),
        "hours": sum(s["hours"] for s in shards),
        "speaker_ids": sorted(speakers),
        "languages": sorted(languages),
        "kinds": sorted(kinds),
        "skipped": dict(skipped),
    }
    return shards, part


def _commit(out_dir: Path, stage: Path, prefix: str, names: list[str], staged_index: Path) -> None:
    """Replace the old shards of ``prefix`` by the staged ones, then ``index.json`` (each step an ``os.replace``)."""
    name_re = _shard_name_re(prefix)
    keep = set(names)
    stale = [p for p in out_dir.iterdir() if name_re.match(p.name) and p.name not in keep]
    for p in stale:
        p.unlink()
    replaced = sum((out_dir / n).exists() for n in names)
    for name in names:
        os.replace(stage / name, out_dir / name)
    os.replace(staged_index, out_dir / INDEX_NAME)
    if stale or replaced:
        log.info("replaced %d old shards %s-*.tar in %s", len(stale) + replaced, prefix, out_dir)


def _merge_index(out_dir: Path, prefix: str, shards: list[dict], part: dict) -> dict:
    """The new index: ``prefix``'s ``shards`` / ``part`` plus what the old index lists for other prefixes.

    Old shards whose files no longer exist are dropped, and so are the ``parts`` of prefixes none
    of whose shards exist any more (both with a warning), so the totals only count existing shards.
    """
    old_shards: list[dict] = []
    parts: dict[str, dict] = {}
    index_path = out_dir / INDEX_NAME
    if index_path.is_file():
        try:
            old = json.loads(index_path.read_text())
            name_re = _shard_name_re(prefix)
            listed = [s for s in old.get("shards", []) if not name_re.match(s["path"])]
            old_shards = [s for s in listed if (out_dir / s["path"]).is_file()]
            missing = [s["path"] for s in listed if not (out_dir / s["path"]).is_file()]
            if missing:
                log.warning(
                    "dropping %d shards listed in %s that no longer exist: %s", len(missing), index_path, missing
                )
            for p, v in old.get("parts", {}).items():
                if p == prefix:
                    continue
                p_re = _shard_name_re(p)
                p_listed = [s["path"] for s in listed if p_re.match(s["path"])]
                p_exist = [n for n in p_listed if (out_dir / n).is_file()]
                had_samples = bool(p_listed) or (isinstance(v, dict) and v.get("num_samples", 0) > 0)
                if not p_exist and had_samples:
                    log.warning(
                        "dropping part %r from %s: none of its shards exist any more (%s)",
                        p,
                        index_path,
                        p_listed or f"{p}-*.tar",
                    )
                    continue
                parts[p] = v
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exn:
            log.warning("ignoring unreadable old %s (%s)", index_path, exn)
            parts = {}
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


def rewrite_shards(
    src: Iterable[dict],
    out_dir: str | os.PathLike,
    prefix: str,
    transform: Callable[[dict], dict | None],
    *,
    total: int | None = None,
    progress: bool = True,
    desc: str = "",
) -> dict:
    """Write raw WebDataset samples ``src`` (``{"__key__", "json", "flac", ...}``) into new shards
    ``<out_dir>/<prefix>-NNNNNN.tar``, each passed through ``transform(sample) -> sample | None``
    (``None`` drops it and counts it as ``skipped.transform``); e.g. adding codec tokens.

    Transactional like :func:`write_shards` (staging directory, then commit) and writes the
    same ``index.json`` (hours from each sample's JSON ``duration``).
    """

    def write_staged(stage: Path) -> tuple[list[dict], dict]:
        sink = _ShardSink(stage, prefix, DEFAULT_MAX_SHARD_BYTES, DEFAULT_MAX_SHARD_SAMPLES)
        speakers: set[str] = set()
        languages: set[str] = set()
        skipped: Counter = Counter()
        try:
            for raw in tqdm(src, total=total, unit="utt", desc=desc or f"shards {prefix}", disable=not progress):
                sample = transform(raw)
                if sample is None:
                    skipped["transform"] += 1
                    continue
                meta = json.loads(sample["json"])
                sink.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")},
                           float(meta.get("duration") or 0.0))  # fmt: skip
                if meta.get("speaker") is not None:
                    speakers.add(str(meta["speaker"]))
                if meta.get("language") is not None:
                    languages.add(str(meta["language"]))
            shards = sink.close()
        except BaseException:
            sink.abort()
            raise
        part = {
            "num_samples": sum(sh["num_samples"] for sh in shards),
            "hours": sum(sh["hours"] for sh in shards),
            "speaker_ids": sorted(speakers),
            "languages": sorted(languages),
            "kinds": ["tts"],
            "skipped": dict(skipped),
        }
        return shards, part

    return _transaction(out_dir, prefix, write_staged)
