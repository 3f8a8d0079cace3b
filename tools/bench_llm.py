"""Training-step time of the stand-in LLM in fp32 and in bf16 autocast, side by side; and
the frozen LLM's forward + backward of stages 2-3 with the output layer on every position
against the labelled ones only (`modules.llm.hf.next_token_loss`).

    python -m tools.bench_llm [--experiment tiny] [--tokens 4096] [--steps 8] [--labelled 0.2]

Builds the experiment's LLM architecture (random weights), and times forward + backward +
AdamW on batches of about `--tokens` tokens in both precisions in one run, alternating
them so both see the same machine load. bf16 pays off only where the CPU has AMX or
AVX512-BF16; elsewhere torch emulates it. `trainer.precision=auto` (the tiny experiment's
choice) picks bf16-mixed on such CPUs only; the last line says what it picks here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen2ForCausalLM

from datamodules.text_qa import IGNORE_INDEX
from modules.config import load_config
from modules.llm.hf import next_token_loss, qwen2_config
from modules.stage import native_bf16, resolve_precision


def step_ms(model: torch.nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) * 1000


def frozen_step_ms(model: torch.nn.Module, emb: torch.Tensor, labels: torch.Tensor, labelled_only: bool) -> float:
    """Forward + backward to the input vectors of a frozen LM (what stages 2 and 3 pay per step)."""
    start = time.perf_counter()
    x = emb.clone().requires_grad_(True)
    mask = torch.ones(labels.shape, dtype=torch.long)
    if labelled_only:
        loss, _ = next_token_loss(model, labels, mask, inputs_embeds=x, ignore_index=IGNORE_INDEX)
    else:
        logits = model(inputs_embeds=x, attention_mask=mask).logits[:, :-1]
        targets = labels[:, 1:].flatten()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX)
    loss.backward()
    return (time.perf_counter() - start) * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", default="tiny")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=85)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--labelled", type=float, default=0.2, help="share of positions with a label (the answers)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    arch = load_config(["stage=llm_text", f"experiment={args.experiment}"]).llm.arch
    model = Qwen2ForCausalLM(qwen2_config(arch))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, arch.vocab_size, (max(1, args.tokens // args.seq_len), args.seq_len))
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(args.steps + 1):  # the first round warms up
        for name in times:
            t = step_ms(model, opt, ids, bf16=name == "bf16")
            if i:
                times[name].append(t)
    n_params = sum(q.numel() for q in model.parameters())
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    print(
        f"stand-in LLM ({args.experiment}): {n_params:,} parameters, batch {tuple(ids.shape)}, {args.threads} threads"
    )
    print(f"| precision | ms / training step (median of {args.steps}) | tokens / s |")
    print("|---|---|---|")
    for name, ms in (("fp32", fp32), ("bf16 autocast", bf16)):
        print(f"| {name} | {ms:.0f} | {ids.numel() / ms * 1000:.0f} |")
    print(f"bf16 speed-up: {fp32 / bf16:.2f}x")

    # Stages 2-3: the LLM frozen, labels on the answers only (about a fifth of a spoken-QA sequence).
    for q in model.parameters():
        q.requires_grad_(False)
    emb = model.get_input_embeddings()(ids).detach()
    labels = ids.masked_fill(torch.rand(ids.shape) >= args.labelled, IGNORE_INDEX)
    frozen: dict[str, list[float]] = {"every position": [], "labelled only": []}
    for i in range(args.steps + 1):
        for name in frozen:
            t = frozen_step_ms(model, emb, labels, labelled_only=name == "labelled only")
            if i:
                frozen[name].append(t)
    every, only = statistics.median(frozen["every position"]), statistics.median(frozen["labelled only"])
    print(
        f"\nfrozen LLM, forward + backward to the inputs (stages 2-3), fp32, {args.labelled:.0%} of positions labelled:"
    )
    print(f"| output layer on | ms / step (median of {args.steps}) |")
    print("|---|---|")
    print(f"| every position (llm(...).logits) | {every:.0f} |")
    print(f"| labelled positions only (next_token_loss) | {only:.0f} |")
    print(f"labelled-only speed-up: {every / only:.2f}x")
    native = native_bf16("cpu")
    print(
        f"this CPU {'has' if native else 'lacks'} native bf16 (AMX / AVX512-BF16): "
        f"trainer.precision=auto trains in {resolve_precision('auto', 'cpu')}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
