"""Write codec tokens into the TTS shards (after stage output_1_codec).

    python -m tools.write_codec_tokens experiment=tiny [key=value ...]

Reads every split of `data.tts` (the assistant voice's shards), encodes each utterance with the
trained codec, and writes new shards to the folders of `data.tts_codes` with the same members
plus `<key>.codes.npy` (int16 tokens [T], 40 Hz) and, in the JSON, `global_tokens`: the
assistant voice's 8 global tokens (the voice vector of the mean voice feature of up to
`--voice-utterances` training utterances, as the release hard-codes one voice) and
`codec_tokens` (T). `data.tts_codes.limit` N > 0 encodes only the first N utterances of each
split (`make demo`); a split whose `data.tts_codes` folder is null is left out. Also writes `<output_1_codec run>/assistant_voice.json` with those tokens.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from datamodules.audio import load_audio, resample
from datamodules.shards.reader import SkipCounter, iter_raw
from datamodules.shards.writer import rewrite_shards
from modules.codec.stage import STAGE, VOICE_FILE, Codec, load_codec
from modules.config import load_config, run_cli, run_dir
from modules.stage import apply_num_threads

log = logging.getLogger(__name__)
SPLITS = ("train", "dev", "test")


def audio_tensor(raw: dict, rate: int) -> torch.Tensor:
    wav, sr = load_audio(raw["flac"])
    return torch.from_numpy(resample(wav, sr, rate))[None, None]


@torch.inference_mode()
def assistant_voice_tokens(codec: Codec, shards: str, n: int) -> list[int]:
    """Global tokens of the mean voice feature over the first `n` utterances of `shards`."""
    feats = []
    for raw in iter_raw(shards):
        _, voice = codec.encoder(codec._pad(audio_tensor(raw, codec.codec_cfg.sample_rate)))
        feats.append(voice)
        if len(feats) >= n:
            break
    if not feats:
        raise ValueError(f"no readable utterance in {shards} to take the assistant voice from")
    return codec.voice_vector_tokens(torch.cat(feats)).tolist()


def write_codec_tokens(cfg: DictConfig, voice_utterances: int = 64, progress: bool = True) -> dict:
    codec = load_codec(cfg)
    rate = codec.codec_cfg.sample_rate
    voice = assistant_voice_tokens(codec, cfg.data.tts.train_shards, voice_utterances)
    (run_dir(cfg, STAGE) / VOICE_FILE).write_text(json.dumps({"global_tokens": voice}) + "\n")
    summary: dict = {"global_tokens": voice}

    @torch.inference_mode()
    def add_codes(raw: dict) -> dict | None:
        try:
            wav = audio_tensor(raw, rate)
        except Exception as exn:  # a corrupt sample is skipped and counted, never fatal
            log.warning("skipping %s: %s", raw.get("__key__"), exn)
            return None
        codes, _ = codec.encode(wav)
        buf = io.BytesIO()
        np.save(buf, codes[0].numpy().astype(np.int16))
        meta = json.loads(raw["json"])
        meta.update(global_tokens=voice, codec_tokens=int(codes.shape[1]))
        return {**raw, "json": json.dumps(meta, ensure_ascii=False).encode(), "codes.npy": buf.getvalue()}

    limit = cfg.data.tts_codes.limit
    for split in SPLITS:
        src = cfg.data.tts[f"{split}_shards"]
        out = cfg.data.tts_codes[f"{split}_shards"]
        if not src or not out:
            continue
        counter = SkipCounter()
        index_file = Path(src) / "index.json"
        total = json.loads(index_file.read_text())["num_samples"] if index_file.is_file() else None
        samples = iter_raw(src, counter)
        if limit:
            samples, total = itertools.islice(samples, limit), min(total or limit, limit)
        index = rewrite_shards(
            samples, out, f"tts-{split}", add_codes, total=total, progress=progress,
            desc=f"codec tokens {split}",
        )  # fmt: skip
        summary[split] = {"utterances": index["num_samples"], "hours": round(index["hours"], 3),
                          "skipped": {**index["parts"][f"tts-{split}"]["skipped"], **counter.pop_delta()}}  # fmt: skip
        log.info("%s: %s -> %s", split, summary[split], out)
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voice-utterances", type=int, default=64)
    p.add_argument("--quiet", action="store_true")
    args, rest = p.parse_known_args(argv)
    cfg = load_config(rest, stage=STAGE)
    apply_num_threads(cfg)
    summary = write_codec_tokens(cfg, args.voice_utterances, not args.quiet)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
