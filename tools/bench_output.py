"""Speech output benchmarks, measured side by side in one run.

    python -m tools.bench_output [--experiment tiny] [--tokens 200] [--repeats 3] [--threads 2]

1. AR generation speed of the speech decoder: codec tokens per second and the real-time factor
   of speech generation (decoder + codec decoding the windows of the token FIFO) per second of
   audio (40 tokens).
2. Time from the first text segment to the first PCM chunk: conditioning + NAR prefill, the 30
   AR steps of the first window (20 + 10 tokens of look-ahead) and the codec call on it.
3. The AR loop with vs without its KV cache for `--tokens` tokens (ratio).

The decoder and codec are built from the experiment's config (random weights: the cost does not
depend on them; decoding runs a fixed number of steps, EOS is ignored), the text conditioning is
an answer-length sequence of random LLM-width vectors. Prints a Markdown table and writes
runs/<exp>/eval/bench_output.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from omegaconf import OmegaConf

from modules.codec.stage import Codec
from modules.config import eval_dir, load_config
from modules.speech_decoder.alignment import NUM_PHONEME_IDS
from modules.speech_decoder.network import SpeechDecoderNet
from server.fifo import TokenFIFO


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _NoEOS:
    """Generation for a fixed number of steps: EOS logits forced down."""

    def __init__(self, net: SpeechDecoderNet):
        self.net, self.eos = net, net.ids["eos"]
        self._sample = net._sample

    def __enter__(self):
        def sample(logits, top_k, generator):
            logits = logits.clone()
            logits[:, self.eos] = float("-inf")
            return self._sample(logits, top_k, generator)

        self.net._sample = sample
        return self

    def __exit__(self, *exc):
        self.net._sample = self._sample


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="tiny")
    p.add_argument("--tokens", type=int, default=200, help="AR steps for speed and cache ratio")
    p.add_argument("--text-tokens", type=int, default=16, help="answer length in LLM tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config([f"experiment={args.experiment}"], stage="output_3_prefix")
    dcfg = OmegaConf.to_object(cfg.speech_decoder)
    dcfg.dropout = 0.0
    llm_width = cfg.llm.arch.hidden_size
    net = SpeechDecoderNet(dcfg, llm_width).eval()
    codec = Codec(cfg).eval()
    hop, rate = codec.hop, codec.codec_cfg.sample_rate
    text = torch.randn(1, args.text_tokens, llm_width)
    valid = torch.ones(1, args.text_tokens, dtype=torch.bool)
    hidden = torch.randn(1, args.text_tokens, llm_width)
    voice = torch.zeros(codec.codec_cfg.global_groups, dtype=torch.long)
    # The text spread evenly over the n tokens (a windowed decoder also stops at 1.3 x their sum)
    spread = torch.full((1, args.text_tokens), args.tokens / args.text_tokens) if dcfg.duration_positions else None
    sounds = None  # random phonemes per text token where the decoder speaks from them
    if dcfg.aligned_phonemes:
        sounds = torch.randint(3, NUM_PHONEME_IDS, (1, args.text_tokens, dcfg.aligned_phonemes))

    def decode(tokens):
        return codec.decode(torch.tensor(tokens)[None], voice)[0, 0].numpy()

    def generate(**kw):  # the same answer every time: n steps over the same text and prefix
        return net.generate(text, valid, hidden, valid, top_k=2, max_tokens=args.tokens, phonemes=sounds,
                            durations=spread, **kw)  # fmt: skip

    with _NoEOS(net), torch.inference_mode():
        n = args.tokens
        t_cache = _time(generate, args.repeats)
        t_plain = _time(lambda: generate(use_cache=False), args.repeats)

        def synthesize():
            fifo = TokenFIFO(decode, hop=hop)
            generate(on_token=lambda step, tok: list(fifo.push(int(tok[0]))))
            fifo.flush()

        t_synth = _time(synthesize, args.repeats)

        def first_pcm():
            fifo, got = TokenFIFO(decode, hop=hop), []

            def on_token(step, tok):
                got.extend(fifo.push(int(tok[0])))
                if got:
                    raise StopIteration

            with contextlib.suppress(StopIteration):  # stop at the first PCM chunk
                generate(on_token=on_token)

        t_first = _time(first_pcm, args.repeats)
    audio_s = n * hop / rate
    result = {
        "experiment": args.experiment,
        "threads": args.threads,
        "decoder_params": sum(p.numel() for p in net.parameters()),
        "tokens": n,
        "tokens_per_s_cached": n / t_cache,
        "tokens_per_s_uncached": n / t_plain,
        "kv_cache_speedup": t_plain / t_cache,
        "synthesis_rtf": t_synth / audio_s,
        "first_segment_to_first_pcm_ms": 1000 * t_first,
    }
    lines = [
        f"### Speech output on this CPU ({args.threads} threads, experiment {args.experiment}, random weights)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| AR codec tokens/s (KV cache) | {result['tokens_per_s_cached']:.0f} (real time needs 40) |",
        f"| AR codec tokens/s (no cache, {n} tokens) | {result['tokens_per_s_uncached']:.0f} |",
        f"| KV cache speed-up over {n} tokens | {result['kv_cache_speedup']:.1f}x |",
        f"| real-time factor of synthesis (decoder + codec windows) | {result['synthesis_rtf']:.3f} |",
        f"| first text segment -> first PCM chunk (prefill + 30 AR steps + codec) | "
        f"{result['first_segment_to_first_pcm_ms']:.0f} ms |",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    (eval_dir(cfg) / "bench_output.json").write_text(json.dumps({**result, "table": table}, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
