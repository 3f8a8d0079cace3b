"""Streaming input path benchmarks, measured side by side in one run.

    python -m tools.bench_input [--experiment tiny] [--seconds 60] [--repeats 5] [--threads 2]

1. Encoder + adapter cost per 160 ms chunk at 1 s and at 60 s into an utterance: the cache is
   bounded by the left context, so the ratio should stay near 1 (target <= 1.3).
2. Streaming vs recomputing: at 60 s, one streaming step vs running the offline encoder +
   adapter over the whole 60 s prefix under the same chunk mask (what a cache-less streaming
   system must do every chunk); target >= 10x.
3. Real-time factor of the whole input path per chunk (fbank -> encoder -> adapter -> LLM
   prefill of the chunk's speech embeddings): time per chunk / 160 ms.

Builds the experiment's encoder and adapter from the config (random weights: the cost does
not depend on them) and the LLM from `llm.path` when it exists, else from `llm.arch`.
Audio: concatenated utterances of the corpus when present, else noise. Prints a Markdown
table and writes runs/<exp>/eval/bench_input.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from transformers import DynamicCache, Qwen2ForCausalLM

from datamodules.features import StreamingFbank, fbank
from datamodules.shards.reader import iter_decoded
from modules.adapter import SpeechAdapter
from modules.config import eval_dir, load_config
from modules.encoder.ctc import units_from_json
from modules.encoder.network import SpeechEncoder
from modules.llm.hf import load_llm, qwen2_config
from modules.speech_llm.model import CHUNK_SAMPLES
from modules.stage import read_stage_output


def test_audio(cfg, seconds: float) -> np.ndarray:
    """`seconds` of 16 kHz speech from the ASR test shards (noise if there are none)."""
    need = int(seconds * 16000) + CHUNK_SAMPLES
    pieces, total = [], 0
    try:
        for sample in iter_decoded(cfg.data.asr.test_shards):
            pieces.append(sample["wav"])
            total += len(sample["wav"])
            if total >= need:
                break
    except (FileNotFoundError, ValueError, TypeError):
        pieces = []
    if sum(len(p) for p in pieces) < need:
        return (np.random.default_rng(0).standard_normal(need) * 0.05).astype(np.float32)
    return np.concatenate(pieces)[:need].astype(np.float32)


def build_llm(cfg):
    if (Path(cfg.llm.path) / "config.json").is_file():
        return load_llm(cfg.llm)[0].eval(), "trained stand-in"
    return Qwen2ForCausalLM(qwen2_config(cfg.llm.arch)).eval(), "random weights (llm.path not found)"


def stream_once(wav, n_chunks, encoder, adapter, llm) -> tuple[list[float], list[float], list[float]]:
    """Stream `wav` 160 ms at a time through the input path; seconds per chunk of each stage."""
    fb = StreamingFbank()
    enc_state, ad_state = encoder.init_state(), adapter.init_state()
    cache, positions = DynamicCache(), 0
    t_fbank, t_enc, t_llm = [], [], []
    for i in range(n_chunks):
        t0 = time.perf_counter()
        feats = torch.from_numpy(fb.accept(wav[i * CHUNK_SAMPLES : (i + 1) * CHUNK_SAMPLES]))[None]
        t1 = time.perf_counter()
        enc, enc_state = encoder.stream(feats, enc_state)
        emb, ad_state = adapter.stream(enc, ad_state)
        t2 = time.perf_counter()
        if emb.shape[1]:
            pos = torch.arange(positions, positions + emb.shape[1])[None]
            llm(inputs_embeds=emb, position_ids=pos, past_key_values=cache, use_cache=True)
            positions += emb.shape[1]
        t3 = time.perf_counter()
        t_fbank.append(t1 - t0)
        t_enc.append(t2 - t1)
        t_llm.append(t3 - t2)
    return t_fbank, t_enc, t_llm


def lexical_units(cfg) -> int:
    """CTC units of the adapter's lexical path: the stage-1 output's when there is one, else the BPE bound."""
    if not cfg.adapter.lexical:
        return 0
    try:
        return len(units_from_json(read_stage_output(cfg, "input_1_ctc").get("ctc_units")))
    except FileNotFoundError:
        return cfg.ctc.bpe_vocab_size + 1


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="tiny")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--repeats", type=int, default=20, help="timed chunks per measurement point")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config([f"experiment={args.experiment}", "stage=input_3_prompt", *args.overrides])
    encoder = SpeechEncoder(OmegaConf.to_object(cfg.encoder)).eval()
    llm, llm_kind = build_llm(cfg)
    width = llm.get_input_embeddings().weight.shape[1]
    units = lexical_units(cfg)
    adapter = SpeechAdapter(OmegaConf.to_object(cfg.adapter), encoder.output_dim, width, units).eval()
    wav = test_audio(cfg, args.seconds)
    n_chunks = len(wav) // CHUNK_SAMPLES
    early = range(int(1.0 / 0.16), int(1.0 / 0.16) + args.repeats)  # from 1 s on (20 chunks: 1.0-4.2 s)
    late = range(n_chunks - args.repeats, n_chunks)  # the last chunks, ~60 s in

    # Two passes over the whole stream (the first warms up allocators and kernels); the second
    # times every chunk of each stage of the input path.
    for _warm_up in (True, False):
        t_fbank, t_enc, t_llm = stream_once(wav, n_chunks, encoder, adapter, llm)

    # Recompute: the offline encoder + adapter over the whole prefix, at the late chunks.
    all_feats = torch.from_numpy(fbank(wav))[None]
    t_recompute = []
    for i in late:
        frames = min(all_feats.shape[1], (i + 1) * 16)
        t0 = time.perf_counter()
        enc, lens = encoder(all_feats[:, :frames], torch.tensor([frames]))
        adapter(enc, lens)
        t_recompute.append(time.perf_counter() - t0)

    def ms(values, idx) -> float:
        return statistics.median(values[i] for i in idx) * 1000

    enc_early, enc_late = ms(t_enc, early), ms(t_enc, late)
    recompute = statistics.median(t_recompute) * 1000
    path_ms = [(a + b + c) * 1000 for a, b, c in zip(t_fbank, t_enc, t_llm)]
    rtf = statistics.median(path_ms[2:]) / 160.0
    result = {
        "experiment": args.experiment,
        "threads": args.threads,
        "stream_seconds": round(n_chunks * 0.16, 2),
        "llm": llm_kind,
        "lexical_units": units,
        "encoder_params": sum(q.numel() for q in encoder.parameters()),
        "encoder_adapter_ms_per_chunk_at_1s": round(enc_early, 3),
        "encoder_adapter_ms_per_chunk_at_60s": round(enc_late, 3),
        "late_over_early_ratio": round(enc_late / enc_early, 3),
        "recompute_prefix_ms_at_60s": round(recompute, 2),
        "streaming_speedup_vs_recompute": round(recompute / enc_late, 1),
        "input_path_ms_per_chunk": {
            "fbank": round(statistics.median(t_fbank[2:]) * 1000, 3),
            "encoder_adapter": round(statistics.median(t_enc[2:]) * 1000, 3),
            "llm_prefill": round(statistics.median(t_llm[2:]) * 1000, 3),
            "total": round(statistics.median(path_ms[2:]), 3),
        },
        "input_path_rtf": round(rtf, 4),
    }
    print(
        f"streaming input path ({args.experiment}, {args.threads} threads, {result['stream_seconds']} s of audio, LLM: {llm_kind}, lexical units: {units})"
    )
    print("| measurement | value | target |")
    print("|---|---|---|")
    print(f"| encoder + adapter per 160 ms chunk at 1 s | {enc_early:.2f} ms | |")
    print(f"| encoder + adapter per 160 ms chunk at {result['stream_seconds']:.0f} s | {enc_late:.2f} ms | |")
    print(f"| ratio late / early | {enc_late / enc_early:.2f} | <= 1.3 |")
    print(f"| recompute the whole prefix at {result['stream_seconds']:.0f} s | {recompute:.1f} ms | |")
    print(f"| streaming speed-up vs recompute | {recompute / enc_late:.1f}x | >= 10x |")
    ip = result["input_path_ms_per_chunk"]
    print(
        f"| input path per chunk (fbank {ip['fbank']:.2f} + encoder/adapter {ip['encoder_adapter']:.2f}"
        f" + LLM prefill {ip['llm_prefill']:.2f} ms) | {ip['total']:.2f} ms | |"
    )
    print(f"| real-time factor of the input path | {rtf:.3f} | < 1 |")
    out = eval_dir(cfg) / "bench_input.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
