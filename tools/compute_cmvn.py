"""Compute global CMVN statistics of 80-bin fbank (16 kHz) over shards.

Usage::

    python -m tools.compute_cmvn --shards data/tiny/shards/asr_train --out data/tiny/cmvn.json [--max-utts 5000]

Writes the Freeze-Omni / WeNet ``global_cmvn`` JSON: ``{"mean_stat": [80], "var_stat": [80],
"frame_num": n}`` (per-dimension sum and sum of squares). Spoken-QA shards contribute every turn.
Samples that fail to decode are skipped and counted.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

from datamodules.features import NUM_MEL_BINS, CMVNStats, fbank
from datamodules.shards.reader import SkipCounter, iter_decoded, resolve_shards


def compute_cmvn(
    shards: str | Sequence[str], max_utts: int | None = None, progress: bool = True, workers: int = 1
) -> tuple[CMVNStats, int, dict[str, int]]:
    """Accumulate fbank statistics; returns ``(stats, utterances used, skipped counts)``.

    ``max_utts`` counts audio utterances (QA turns count one each), read in shard order.
    With ``workers > 1`` (and no ``max_utts``) the shards are shared out over that many
    processes and their sums merged: the same statistics up to float64 summation order.
    """
    paths = resolve_shards(shards)
    workers = min(workers, len(paths))
    if workers > 1 and max_utts is None:
        return _compute_parallel(paths, workers, progress)
    stats = CMVNStats(NUM_MEL_BINS)
    counter = SkipCounter()
    used = 0
    bar = tqdm(total=max_utts, unit="utt", desc="cmvn", disable=not progress)
    try:
        for sample in iter_decoded(paths, counter=counter):
            for unit in sample.get("turns", [sample]):
                stats.add(fbank(unit["wav"], unit["sr"]))
                used += 1
                bar.update(1)
                if max_utts is not None and used >= max_utts:
                    return stats, used, dict(counter.totals)
    finally:
        bar.close()
    return stats, used, dict(counter.totals)


def _shard_stats(path: str) -> tuple[CMVNStats, int, dict[str, int]]:
    return compute_cmvn([path], progress=False)


def _compute_parallel(paths: list[str], workers: int, progress: bool) -> tuple[CMVNStats, int, dict[str, int]]:
    stats, used, skipped = CMVNStats(NUM_MEL_BINS), 0, Counter()
    # spawn: the parent may hold torch / OpenMP threads, which fork does not carry safely.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(_shard_stats, p) for p in paths]
        for job in tqdm(as_completed(jobs), total=len(jobs), unit="shard", desc="cmvn", disable=not progress):
            part, n, skips = job.result()
            stats.merge(part)
            used += n
            skipped.update(skips)
    return stats, used, dict(skipped)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True, help="shard dir (index.json), brace pattern or glob")
    parser.add_argument("--out", type=Path, required=True, help="output cmvn.json")
    parser.add_argument("--max-utts", type=int, default=None, help="use at most this many utterances")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the shards (without --max-utts)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    stats, used, skipped = compute_cmvn(args.shards, args.max_utts, progress=not args.quiet, workers=args.workers)
    stats.save(args.out)
    print(json.dumps({"out": str(args.out), "utterances": used, "frames": stats.frame_num, "skipped": skipped}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
