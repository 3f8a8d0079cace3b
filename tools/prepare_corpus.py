"""Build the tiny corpus in one command: synthesize, write shards, compute CMVN stats.

    python -m tools.prepare_corpus --out data/tiny [--seed 1234] [--n-asr 3000] [--n-tts 1500] [--qa-train 1200] [--workers 2] [--force]

1. `tools.make_corpus` synthesizes the eSpeak NG corpus (audio + JSONL manifests).
2. Every manifest goes through the shard writer used for real corpora
   (`datamodules.shards.writer.write_shards`), so the real-data path runs on every build.
3. Global CMVN stats of the ASR training fbank are written to `<out>/cmvn.json`.

A finished corpus (its `prepared.json` matches the requested settings) is left as it is
unless `--force` is given.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
from pathlib import Path

from datamodules.corpus.layout import CORPUS_VERSION, KINDS, SPLITS, manifest_path, shard_dir
from datamodules.corpus.qa import DEFAULT_SPLIT_SIZES, build_qa_splits
from datamodules.shards.manifests import read_jsonl_manifest
from datamodules.shards.writer import write_shards
from tools.compute_cmvn import compute_cmvn
from tools.make_corpus import TTS_QA_DIALOGUES, make_corpus


def prepare_corpus(
    out: Path,
    seed: int = 1234,
    n_asr: int = 3000,
    workers: int = 2,
    shard_max_mb: int = 64,
    force: bool = False,
    progress: bool = True,
    qa_builder=None,
    n_tts: int = 1500,
    n_turns: int = 2600,
    qa_train: int = DEFAULT_SPLIT_SIZES["train"],
) -> dict:
    """Returns the summary also written to `<out>/prepared.json`."""
    out = Path(out)
    settings = {
        "version": CORPUS_VERSION,
        "seed": seed,
        "n_asr": n_asr,
        "n_tts": n_tts,
        "n_turns": n_turns,
        "shard_max_mb": shard_max_mb,
    }
    if qa_train != DEFAULT_SPLIT_SIZES["train"]:  # the default leaves older corpora's settings as they were
        if qa_builder is not None:
            raise ValueError(
                f"qa_train={qa_train} and qa_builder both set: the builder decides the QA splits, so "
                "qa_train would be recorded but not used; pass one of them"
            )
        settings["qa_train"] = qa_train
        qa_builder = functools.partial(build_qa_splits, sizes={**DEFAULT_SPLIT_SIZES, "train": qa_train})
    done = out / "prepared.json"
    if done.is_file() and not force:
        summary = json.loads(done.read_text())
        if summary.get("settings") == settings:
            print(f"corpus already prepared in {out} (use --force to rebuild)")
            return summary
    t0 = time.perf_counter()
    stats = make_corpus(
        out,
        seed=seed,
        n_asr=n_asr,
        workers=workers,
        n_tts=n_tts,
        n_turns=n_turns,
        progress=progress,
        qa_builder=qa_builder,
    )
    t_synth = time.perf_counter() - t0

    indexes = {}
    for kind in KINDS:
        for split in SPLITS:
            manifest = manifest_path(out, kind, split)
            records = list(read_jsonl_manifest(manifest))
            index = write_shards(
                records, out, shard_dir(out, kind, split), prefix=f"{kind}-{split}",
                max_shard_bytes=shard_max_mb * 2**20, total=len(records), progress=progress,
            )  # fmt: skip
            indexes[f"{kind}/{split}"] = {k: index[k] for k in ("num_samples", "hours")} | {
                "shards": len(index["shards"])
            }
    t_shards = time.perf_counter() - t0 - t_synth

    cmvn, used, skipped = compute_cmvn(str(shard_dir(out, "asr", "train")), progress=progress, workers=workers)
    cmvn.save(out / "cmvn.json")
    summary = {
        "settings": settings,
        "corpus": {k: v for k, v in stats.items() if k != "elapsed_s"},
        "shards": indexes,
        "cmvn": {"utterances": used, "frames": cmvn.frame_num, "skipped": skipped},
        "wall_s": {
            "synthesis": round(t_synth, 1),
            "shards": round(t_shards, 1),
            "cmvn": round(time.perf_counter() - t0 - t_synth - t_shards, 1),
            "total": round(time.perf_counter() - t0, 1),
        },
    }
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("data/tiny"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--n-asr", type=int, default=3000)
    p.add_argument("--n-tts", type=int, default=1500, help="TTS sentences in the assistant voice (+ the QA answers)")
    p.add_argument("--n-turns", type=int, default=2600, help="user turns for the state classifier")
    p.add_argument(
        "--qa-train", type=int, default=DEFAULT_SPLIT_SIZES["train"],
        help="spoken-QA training dialogues (their questions join the ASR training split; the TTS split "
        f"speaks the answers of the first {TTS_QA_DIALOGUES:,})",
    )  # fmt: skip
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shard-max-mb", type=int, default=64)
    p.add_argument("--force", action="store_true", help="rebuild even if the corpus is already prepared")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    s = prepare_corpus(
        args.out,
        args.seed,
        args.n_asr,
        args.workers,
        args.shard_max_mb,
        args.force,
        not args.quiet,
        n_tts=args.n_tts,
        n_turns=args.n_turns,
        qa_train=args.qa_train,
    )
    print(json.dumps({"shards": s["shards"], "wall_s": s["wall_s"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
