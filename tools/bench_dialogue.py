"""Dialogue latency benchmarks, measured side by side in one run.

    python -m tools.bench_dialogue [--experiment tiny] [--contexts 100,500,1000,2000] [--repeats 5]
                                   [--threads 2] [key=value ...]

1. LLM step latency: ms per generated token (one forward pass over the KV cache) after 100 and
   after 2,000 tokens of context, and their ratio (the cost of a step grows with the cache it
   attends to; the paper's dialogues stay short).
2. First PCM against context length: a 2 s spoken question after a dialogue history of N
   tokens, answered with a fixed reply, through the duplex pipeline (`DuplexModel.generate`:
   text producer and speech consumer running concurrently); the paper's Table 4 rows per N.
3. The Table 4 breakdown (avg / p50 / p90 over every answer of part 2).

The chain is the experiment's trained one when runs/<exp> holds it (`make demo` trains
experiment=demo, the tiny recipe experiment=tiny); otherwise the same architecture with random
weights (a tokenizer trained here on the QA templates, the paper's adapter without the
lexical path): costs do not depend on the weights, and the fixed reply makes every run speak
the same words. `--paper` measures part 1 with the paper's LLM (Qwen2-7B shape, random weights,
bf16) on a CUDA GPU, and says so when there is none. Prints Markdown tables, writes
runs/<exp>/eval/bench_dialogue.json and a plot of first PCM against context length.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

import numpy as np
import torch
from transformers import DynamicCache

from modules.config import eval_dir, load_config
from server.chat import latency_table
from server.engine import DuplexModel
from server.latency import LATENCY_ROWS, percentiles
from tools.bench_input import test_audio

# A reply of three segments at the tiny experiment's segmenter settings.
REPLY = "Sure. The first train leaves at nine in the morning, and the next one comes an hour later."
# Qwen2-7B-Instruct's shape (the paper's frozen LLM).
QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                rope_theta=1_000_000.0, tie_word_embeddings=False)  # fmt: skip
NO_DECISIONS = ["speech_llm.state_answer_threshold=2", "speech_llm.state_drop_threshold=2", "duplex.vad_threshold=0"]


def random_chain(overrides: list[str]) -> tuple[DuplexModel, str]:
    """The experiment's architecture with random weights (no trained stage needed)."""
    from datamodules.corpus.qa import sample_dialogue
    from datamodules.text_qa import SYSTEM_PROMPT
    from datamodules.tokenizer import train_bpe_tokenizer
    from modules.llm.hf import LLMArchConfig, build_qwen2

    cfg = load_config(overrides, stage="input_4_state")
    rng, texts = random.Random(0), [SYSTEM_PROMPT, REPLY]
    for seed in range(300):
        texts += [x for t in sample_dialogue(rng, seed, heldout=False) for x in (t.question, t.answer)]
    arch = LLMArchConfig(**cfg.llm.arch)
    tokenizer = train_bpe_tokenizer(texts, arch.vocab_size)
    with tempfile.TemporaryDirectory(prefix="bench_llm_") as llm_dir:  # read once by each builder
        build_qwen2(arch, tokenizer).save_pretrained(llm_dir)
        tokenizer.save_pretrained(llm_dir)
        cfg = load_config([*overrides, f"llm.path={llm_dir}", "adapter.lexical=false"], stage="input_4_state")
        model = DuplexModel.untrained(cfg)
    return model, "random weights (no trained chain)"


def load_chain(overrides: list[str]) -> tuple[DuplexModel, str]:
    cfg = load_config(overrides, stage="input_4_state")
    try:
        return DuplexModel.load(cfg), f"trained chain of runs/{cfg.experiment}"
    except FileNotFoundError as exn:
        print(f"no trained chain ({exn}); random weights instead")
        return random_chain(overrides)


@torch.inference_mode()
def step_latency(llm, contexts: list[int], steps: int, repeats: int, device="cpu") -> dict[int, float]:
    """Median seconds per generated token (one token per forward) after each of `contexts` cached
    tokens; the lengths take turns within every repeat, so drifts of the machine hit all alike."""
    vocab, caches = llm.config.vocab_size, {}
    for n in contexts:
        ids = torch.randint(vocab, (1, n + steps), generator=torch.Generator().manual_seed(n)).to(device)
        cache = DynamicCache()
        for i in range(0, n, 512):  # the context, prefilled in pieces
            llm(input_ids=ids[:, i : min(i + 512, n)], past_key_values=cache, use_cache=True)
        caches[n] = (ids, cache)
    times: dict[int, list[float]] = {n: [] for n in contexts}
    for r in range(repeats + 1):  # the first round warms up
        for n, (ids, cache) in caches.items():
            t0 = time.perf_counter()
            for k in range(steps):
                llm(input_ids=ids[:, n + k : n + k + 1], past_key_values=cache, use_cache=True)
            if device != "cpu":
                torch.cuda.synchronize()
            if r:
                times[n].append((time.perf_counter() - t0) / steps)
            cache.crop(-steps)  # back to the context (transformers 5: negative = remove)
    return {n: statistics.median(t) for n, t in times.items()}


def answer_after_context(model: DuplexModel, context: int, question: np.ndarray, reply: list[int]) -> dict:
    """Table 4 marks (ms) of one answer to `question` after a history of `context` tokens."""
    s = model.new_session()
    tok = model.llm.tokenizer
    history = tok(" ".join([REPLY] * 200), add_special_tokens=False)["input_ids"]
    need = max(0, context - s.input.positions)
    while len(history) < need:
        history += history
    for i in range(0, need, 256):
        model.extend_context(s, history[i : min(i + 256, need)])
    model.feed(s, question)
    s.mode = "answer"  # decided here: the benchmark times what follows the state-1 decision
    r = model.generate(s, force_ids=reply)
    return {"context": context, "latency_ms": r.latency_ms, "reply_tokens": r.tokens}


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = [r["context"] for r in rows]
    bottom = np.zeros(len(rows))
    for key, label in LATENCY_ROWS[:-1]:
        y = np.array([r["avg_ms"][key] for r in rows])
        ax.bar([str(v) for v in x], y, bottom=bottom, label=label.split("->")[-1].strip())
        bottom += y
    ax.set_xlabel("context before the question (tokens)")
    ax.set_ylabel("state-1 decision -> first PCM (ms)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def paper_llm(device: str) -> torch.nn.Module:
    """Qwen2-7B's shape with random weights in bf16, built on `device` ("meta": shapes only)."""
    from transformers import Qwen2ForCausalLM

    from modules.llm.hf import LLMArchConfig, qwen2_config

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return Qwen2ForCausalLM(qwen2_config(LLMArchConfig(**QWEN2_7B))).eval()
    finally:
        torch.set_default_dtype(default)


def paper_step_latency(contexts: list[int], steps: int, repeats: int) -> dict:
    if not torch.cuda.is_available():
        return {"measured": False, "reason": "no CUDA GPU on this machine"}
    llm = paper_llm("cuda")
    ms = {n: 1000 * t for n, t in step_latency(llm, contexts, steps, repeats, device="cuda").items()}
    return {"measured": True, "device": torch.cuda.get_device_name(), "ms_per_token": ms}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="tiny")
    p.add_argument("--contexts", default="100,500,1000,2000", help="context lengths in tokens")
    p.add_argument("--steps", type=int, default=64, help="generated tokens per LLM step measurement")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--paper", action="store_true", help="also the paper-size LLM step on a CUDA GPU")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    contexts = sorted({int(c) for c in args.contexts.split(",")})
    overrides = [f"experiment={args.experiment}", *NO_DECISIONS, *args.overrides]
    model, weights = load_chain(overrides)
    cfg = model.cfg

    # 1. LLM step latency against context length.
    llm = model.llm.llm
    step_ms = {n: 1000 * t for n, t in step_latency(llm, contexts, args.steps, args.repeats).items()}
    lo, hi = contexts[0], contexts[-1]

    # 2. and 3. First PCM against context length; the breakdown over all answers.
    question = test_audio(cfg, 2.0)
    reply = model.llm.tokenizer(REPLY, add_special_tokens=False)["input_ids"]
    answer_after_context(model, lo, question, reply)  # warm-up
    runs = [answer_after_context(model, n, question, reply) for _ in range(args.repeats) for n in contexts]
    answers, rows = [r for r in runs if r["latency_ms"]], []  # a reply the decoder ends at once has no marks
    for n in contexts:
        spoken = [r["latency_ms"] for r in answers if r["context"] == n]
        if not spoken:
            raise RuntimeError(f"no answer after {n} tokens of context produced speech")
        avg = {k: percentiles([ms[k] for ms in spoken])["avg"] for k, _ in LATENCY_ROWS}
        rows.append({"context": n, "avg_ms": avg})

    result = {
        "experiment": args.experiment,
        "weights": weights,
        "threads": args.threads,
        "llm_params": sum(p.numel() for p in llm.parameters()),
        "llm_ms_per_token": step_ms,
        "llm_step_ratio": step_ms[hi] / step_ms[lo],
        "first_pcm": rows,
        "first_pcm_ratio": rows[-1]["avg_ms"]["total"] / rows[0]["avg_ms"]["total"],
        "paper": (
            paper_step_latency(contexts, args.steps, args.repeats)
            if args.paper
            else {"measured": False, "reason": "not asked (--paper)"}
        ),
    }
    lines = [
        f"### Dialogue latency on this CPU ({args.threads} threads, experiment {args.experiment}, {weights})", "",
        "| context (tokens) | " + " | ".join(str(n) for n in contexts) + " |",
        "|---|" + "---|" * len(contexts),
        "| LLM step (ms per generated token) | " + " | ".join(f"{step_ms[n]:.2f}" for n in contexts) + " |",
    ]  # fmt: skip
    for key, label in LATENCY_ROWS:
        lines.append(f"| {label} (avg ms) | " + " | ".join(f"{r['avg_ms'][key]:.0f}" for r in rows) + " |")
    lines += [
        "",
        f"LLM step at {hi} vs {lo} tokens of context: {result['llm_step_ratio']:.2f}x; "
        f"first PCM: {result['first_pcm_ratio']:.2f}x ({len(reply)}-token reply, {args.repeats} answers per length).",
        "",
        latency_table(answers),
    ]
    paper = result["paper"]
    if paper["measured"]:
        lines.append(f"Paper-size LLM step (Qwen2-7B shape, bf16, {paper['device']}): "
                     + ", ".join(f"{v:.1f} ms at {n}" for n, v in paper["ms_per_token"].items()))  # fmt: skip
    elif args.paper:
        lines.append(f"Paper-size LLM step: not measured ({paper['reason']}).")
    table = "\n".join(lines) + "\n"
    print(table)
    out = eval_dir(cfg)
    plot(rows, out / "bench_dialogue.png")
    (out / "bench_dialogue.json").write_text(json.dumps({**result, "table": table}, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
