"""Benchmark the ASR training loader against the plain decode + resample + fbank bound.

Usage::

    python -m tools.bench_data --shards data/tiny/shards/asr_train [--workers 0 1 2] [--cmvn cmvn.json]

In one run it first measures the *bound*: a single-process loop that reads the same shards with
``tarfile`` and does only soundfile decode + soxr resample to 16 kHz + fbank per utterance. Then,
for each worker count, one training epoch of :class:`datamodules.asr.ASRDataModule`'s train loader
(shuffling, bucketing, SpecAugment, collation, worker IPC). It prints utterances/s and audio
seconds/s, in total and per worker (0 workers = the main process counts as one), beside the bound
(re-measured right before each loader run, so both share the machine's load) and the ratios
loader/bound. Loader rates cover the whole epoch, worker start-up and buffer filling included.
"""

from __future__ import annotations

import argparse
import json
import logging
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from datamodules.asr import ASRDataConfig, ASRDataModule
from datamodules.audio import INPUT_SAMPLE_RATE, load_audio, resample
from datamodules.features import fbank
from datamodules.shards.reader import resolve_shards


@dataclass
class Rate:
    utts: int
    audio_s: float
    wall_s: float

    @property
    def utts_per_s(self) -> float:
        return self.utts / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def audio_per_s(self) -> float:
        return self.audio_s / self.wall_s if self.wall_s > 0 else float("nan")


def measure_bound(shards: Sequence[str], max_utts: int | None = None) -> Rate:
    """Single process: tar read + soundfile decode + resample to 16 kHz + fbank, nothing else."""
    utts, audio_s = 0, 0.0
    start = time.perf_counter()
    for shard in shards:
        with tarfile.open(shard, mode="r|*") as tar:
            for info in tar:
                if not (info.isreg() and info.name.endswith(".flac")):
                    continue
                f = tar.extractfile(info)
                if f is None:
                    continue
                wav, sr = load_audio(f.read())
                fbank(resample(wav, sr, INPUT_SAMPLE_RATE))
                utts += 1
                audio_s += wav.shape[0] / sr
                if max_utts is not None and utts >= max_utts:
                    return Rate(utts, audio_s, time.perf_counter() - start)
    return Rate(utts, audio_s, time.perf_counter() - start)


def measure_loader(config: ASRDataConfig, max_utts: int | None = None) -> tuple[Rate, float, dict[str, int]]:
    """One training epoch; returns (rate over the epoch, seconds to the first batch, skipped counts).

    The epoch time includes worker start-up and the filling of the shuffle and bucket buffers.
    """
    loader = ASRDataModule(config).train_dataloader()
    utts, audio_s = 0, 0.0
    skipped: dict[str, int] = {}
    first_batch_s = float("nan")
    start = time.perf_counter()
    for batch in loader:
        if utts == 0:
            first_batch_s = time.perf_counter() - start
        utts += len(batch["keys"])
        audio_s += float(batch["durations"].sum())
        for reason, n in batch["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + int(n)
        if max_utts is not None and utts >= max_utts:
            break
    end = time.perf_counter()
    del loader  # shut persistent workers down
    return Rate(utts, audio_s, end - start), first_batch_s, skipped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True, help="ASR shard dir (index.json), brace pattern or glob")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--cmvn", default=None, help="cmvn.json (optional; applied by the loader)")
    parser.add_argument("--max-frames-per-batch", type=int, default=20000)
    parser.add_argument("--max-utts", type=int, default=None, help="stop each measurement after this many")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    shards = resolve_shards(args.shards)
    rows = []
    for workers in args.workers:
        # the bound is re-measured right before each loader run so both see the same machine load
        bound = measure_bound(shards, args.max_utts)
        config = ASRDataConfig(
            train_shards=args.shards,
            cmvn_path=args.cmvn,
            num_workers=workers,
            max_frames_per_batch=args.max_frames_per_batch,
            spec_augment=True,
        )
        total, first_batch_s, skipped = measure_loader(config, args.max_utts)
        per = max(workers, 1)
        rows.append(
            {
                "workers": workers,
                "utts": total.utts,
                "audio_s": total.audio_s,
                "wall_s": total.wall_s,
                "first_batch_s": first_batch_s,
                "utts_per_s": total.utts_per_s,
                "audio_s_per_s": total.audio_per_s,
                "utts_per_s_per_worker": total.utts_per_s / per,
                "audio_s_per_s_per_worker": total.audio_per_s / per,
                "bound_utts_per_s": bound.utts_per_s,
                "bound_audio_s_per_s": bound.audio_per_s,
                "ratio_to_bound": total.audio_per_s / bound.audio_per_s,
                "ratio_to_bound_per_worker": total.audio_per_s / per / bound.audio_per_s,
                "skipped": skipped,
            }
        )
    if args.json:
        print(json.dumps({"shards": len(shards), "rows": rows}, indent=1))
        return 0
    print(f"shards: {len(shards)}; bound = 1 process doing only tar read + soundfile decode + soxr resample + fbank")
    print(
        f"{'workers':>7} {'utts':>5} {'audio s':>8} {'wall s':>7} {'1st batch s':>11} {'utt/s':>7} {'audio s/s':>9} "
        f"{'utt/s/wkr':>9} {'aud s/s/wkr':>11} | {'bound utt/s':>11} {'bound aud s/s':>13} | "
        f"{'loader/bound':>12} {'per-wkr/bound':>13}  skipped"
    )
    for r in rows:
        print(
            f"{r['workers']:>7} {r['utts']:>5} {r['audio_s']:>8.1f} {r['wall_s']:>7.2f} {r['first_batch_s']:>11.2f} "
            f"{r['utts_per_s']:>7.1f} {r['audio_s_per_s']:>9.1f} {r['utts_per_s_per_worker']:>9.1f} "
            f"{r['audio_s_per_s_per_worker']:>11.1f} | {r['bound_utts_per_s']:>11.1f} {r['bound_audio_s_per_s']:>13.1f} | "
            f"{r['ratio_to_bound']:>12.2f} {r['ratio_to_bound_per_worker']:>13.2f}  {r['skipped']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
