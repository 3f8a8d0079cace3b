"""Pack a JSONL manifest or a Kaldi data dir into WebDataset tar shards (+ index.json).

Usage::

    python -m tools.write_shards --manifest data/tiny/manifests/asr_train.jsonl --out data/tiny/shards/asr_train
    python -m tools.write_shards --kaldi-dir data/train --out shards/train [--audio-root .] [--prefix train]

Audio paths of a JSONL manifest are relative to ``--root`` (default: the corpus root, i.e. the
parent of the ``manifests/`` directory holding the manifest, else the manifest's directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from datamodules.shards.manifests import read_jsonl_manifest, read_kaldi_dir
from datamodules.shards.writer import DEFAULT_MAX_SHARD_SAMPLES, write_shards


def default_root(manifest: Path) -> Path:
    """Corpus root of a manifest: the parent of a ``manifests/`` directory, else the manifest's directory."""
    parent = manifest.resolve().parent
    return parent.parent if parent.name == "manifests" else parent


def _count_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", type=Path, help="JSONL manifest (ASR or spoken-QA)")
    src.add_argument("--kaldi-dir", type=Path, help="Kaldi data dir with wav.scp, text [, utt2spk]")
    parser.add_argument("--out", type=Path, required=True, help="output directory for the shards and index.json")
    parser.add_argument("--prefix", default=None, help="shard name prefix (default: manifest / dir name)")
    parser.add_argument("--root", type=Path, default=None, help="corpus root for relative manifest audio paths")
    parser.add_argument("--audio-root", type=Path, default=None, help="base of relative wav.scp paths (default: cwd)")
    parser.add_argument("--language", default=None, help="language tag for Kaldi records")
    parser.add_argument("--max-shard-mb", type=float, default=64.0, help="maximum shard size in MiB")
    parser.add_argument("--max-shard-samples", type=int, default=DEFAULT_MAX_SHARD_SAMPLES)
    parser.add_argument("--strict", action="store_true", help="fail on unreadable audio instead of skipping it")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.manifest is not None:
        if not args.manifest.is_file():
            parser.error(f"manifest not found: {args.manifest}")
        records = read_jsonl_manifest(args.manifest)
        root = args.root if args.root is not None else default_root(args.manifest)
        total = _count_lines(args.manifest)
        prefix = args.prefix or args.manifest.stem.replace(".", "_")
    else:
        records = read_kaldi_dir(args.kaldi_dir, audio_root=args.audio_root, language=args.language)
        root = Path.cwd()
        total = _count_lines(args.kaldi_dir / "wav.scp") if (args.kaldi_dir / "wav.scp").is_file() else None
        prefix = args.prefix or args.kaldi_dir.resolve().name.replace(".", "_")

    try:
        index = write_shards(
            records,
            root,
            args.out,
            prefix=prefix,
            max_shard_bytes=int(args.max_shard_mb * 1024 * 1024),
            max_shard_samples=args.max_shard_samples,
            total=total,
            progress=not args.quiet,
            strict=args.strict,
        )
    except (ValueError, FileNotFoundError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    part = index["parts"][prefix]
    summary = {
        "out": str(args.out),
        "prefix": prefix,
        "shards_written": sum(1 for s in index["shards"] if s["path"].startswith(prefix + "-")),
        "samples": part["num_samples"],
        "hours": round(part["hours"], 4),
        "speakers": len(part["speaker_ids"]),
        "skipped": part["skipped"],
        "index_total": {
            "shards": len(index["shards"]),
            "samples": index["num_samples"],
            "hours": round(index["hours"], 4),
        },
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
