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
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from datamodules.features import NUM_MEL_BINS, CMVNStats, fbank
from datamodules.shards import SkipCounter, iter_decoded


def compute_cmvn(
    shards: str | Sequence[str], max_utts: int | None = None, progress: bool = True
) -> tuple[CMVNStats, int, dict[str, int]]:
    """Accumulate fbank statistics; returns ``(stats, utterances used, skipped counts)``.

    ``max_utts`` counts audio utterances (QA turns count one each), read in shard order.
    """
    stats = CMVNStats(NUM_MEL_BINS)
    counter = SkipCounter()
    used = 0
    bar = tqdm(total=max_utts, unit="utt", desc="cmvn", disable=not progress)
    try:
        for sample in iter_decoded(shards, counter=counter):
            for unit in sample.get("turns", [sample]):
                stats.add(fbank(unit["wav"], unit["sr"]))
                used += 1
                bar.update(1)
                if max_utts is not None and used >= max_utts:
                    return stats, used, dict(counter.totals)
    finally:
        bar.close()
    return stats, used, dict(counter.totals)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True, help="shard dir (index.json), brace pattern or glob")
    parser.add_argument("--out", type=Path, required=True, help="output cmvn.json")
    parser.add_argument("--max-utts", type=int, default=None, help="use at most this many utterances")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    stats, used, skipped = compute_cmvn(args.shards, args.max_utts, progress=not args.quiet)
    stats.save(args.out)
    print(json.dumps({"out": str(args.out), "utterances": used, "frames": stats.frame_num, "skipped": skipped}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
