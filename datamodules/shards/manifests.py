"""Manifest readers: JSONL manifests and Kaldi data directories.

Both yield plain record dicts (see :func:`read_jsonl_manifest` for the fields) that
:func:`datamodules.shards.writer.write_shards` turns into WebDataset shards.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def read_jsonl_manifest(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the records of a JSONL manifest (blank lines ignored).

    ASR lines hold ``{"id", "audio", "text", "speaker", "language", "duration", "sample_rate",
    "split"}``; spoken-QA lines hold ``{"id", "speaker", "language", "split", "turns": [{"question",
    "answer", "gold", "family", "audio", "duration", "sample_rate"}]}``. Audio paths are relative to
    the corpus root given to :func:`datamodules.shards.writer.write_shards`. Raises ``ValueError`` naming the file and line of
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
