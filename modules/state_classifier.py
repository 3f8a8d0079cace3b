"""Stage `input_4_state`: the chunk-level state classifier, and its report (`infer.py eval_state`).

A linear head (`SpeechLLM.state_head`, the release's `predictor_head`) reads the frozen LLM's
last hidden state at the end of every 160 ms chunk of a user turn: 0 keep listening, 1 the user
has finished and wants an answer, 2 the user has finished and no answer is due (backchannel,
filler, noise, speech to someone else); a fourth output is never a target and is ignored. At
inference P(drop) > `drop_threshold` drops the turn, else P(answer) > `answer_threshold`
answers it (the release's rule, state 2 checked first).

Everything in front of the head is frozen (encoder, adapter, prompt, LLM), so the stage runs
the speech LLM once over the turns of `data.turns` (`datamodules.corpus.turns`; the offline encoder
under the chunk mask, which equals the streaming path) and fits the head on the recorded
states: seconds per epoch instead of a forward pass of the LLM per step.

The report decides every test turn chunk by chunk as the streaming path would and measures:
per-class precision and recall (per chunk and per turn), the endpoint delay (ms from the true
end of a question to the answer decision, on the streaming path's clock), answers before the
end (cut-ins, e.g. during a mid-question pause), and the false-answer rate on state-2 material.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from datamodules.corpus.turns import ANSWER, DROP, IGNORE, LISTEN, STATE_NAMES, chunk_labels
from datamodules.features import fbank
from datamodules.shards.reader import SkipCounter, iter_decoded
from datamodules.state import ChunkStates
from modules.speech_llm.model import PROMPT, SpeechLLM, build
from modules.stage import fit, load_stage_outputs, save_stage_output, write_metrics

log = logging.getLogger(__name__)


# --- recording the LLM's states -------------------------------------------------------------------
@torch.no_grad()  # not inference_mode: the head trains on these tensors
def chunk_states(module: SpeechLLM, wavs: list[np.ndarray]) -> list[torch.Tensor]:
    """Per 16 kHz turn: the LLM's last hidden state at the end of each chunk, [C, D] float32.

    The sequence is the streaming path's: system turn, user-turn start (with the prompt), speech.
    Chunk c ends with speech embedding 2c + 1 (the adapter gives two per 160 ms chunk).
    """
    dev = module.state_head.weight.device
    feats = [torch.from_numpy(fbank(w)) for w in wavs]
    lens = torch.tensor([len(f) for f in feats])
    padded = nn.utils.rnn.pad_sequence(feats, batch_first=True).to(dev)
    speech, speech_lens = module.speech_embeddings(padded, lens.to(dev), int(module.cfg.encoder.chunk_frames))
    head = torch.cat([module.embed_ids(module.layout.system), module.user_turn_start(PROMPT)])
    n0 = len(head)
    total = n0 + int(speech_lens.max())
    emb = head.new_zeros(len(wavs), total, head.shape[1])
    mask = torch.zeros(len(wavs), total, dtype=torch.long, device=dev)
    for i, s in enumerate(speech_lens.tolist()):
        emb[i, :n0] = head
        emb[i, n0 : n0 + s] = speech[i, :s].to(head.dtype)
        mask[i, : n0 + s] = 1
    hidden = module.llm(inputs_embeds=emb, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    out = []
    for i, s in enumerate(speech_lens.tolist()):
        ends = [n0 + min(2 * c + 1, s - 1) for c in range(math.ceil(s / 2))]
        out.append(hidden[i, ends].float().cpu())
    return out


def record_turns(module: SpeechLLM, shards: str, limit: int = 0, batch: int = 16, desc: str = "turns") -> dict:
    """{"turns": [{"id", "kind", "label", "end", "duration", "states" [C, D], "labels" [C]}],
    "skipped": {reason: count}} for the turns of `shards` (the first `limit`; 0 = all)."""
    counter = SkipCounter()
    turns, pending = [], []

    def flush():
        for sample, states in zip(pending, chunk_states(module, [p["wav"] for p in pending])):
            m = sample["meta"]
            labels = chunk_labels(len(states), float(m["end"]), int(m["label"]))
            turns.append({"id": str(m.get("id", sample["key"])), "kind": m["kind"], "label": int(m["label"]),
                          "end": float(m["end"]), "duration": float(m["duration"]), "states": states,
                          "labels": torch.from_numpy(labels)})  # fmt: skip
        pending.clear()

    bar = tqdm(desc=desc, unit="turn", total=limit or None)
    for sample in iter_decoded(shards, counter=counter):
        if "kind" not in sample["meta"] or "end" not in sample["meta"]:
            counter.add("not_a_turn", sample["key"], "no 'kind'/'end' in its JSON (not a turns shard?)")
            continue
        pending.append(sample)
        if len(pending) == batch:
            flush()
            bar.update(batch)
        if limit and len(turns) + len(pending) >= limit:
            break
    n = len(pending)
    if pending:
        flush()
    bar.update(n)
    bar.close()
    if not turns:
        raise ValueError(f"no readable turn in {shards} (skipped: {dict(counter.totals)})")
    return {"turns": turns, "skipped": dict(counter.totals)}


def label_counts(turns: list[dict]) -> dict[str, int]:
    labels = torch.cat([t["labels"] for t in turns])
    return {STATE_NAMES.get(k, "ignore"): int((labels == k).sum()) for k in (LISTEN, ANSWER, DROP, IGNORE)}


def run(cfg: DictConfig) -> dict:
    module = build(cfg)
    load_stage_outputs(cfg, module)
    counts = module.apply_freezing(list(cfg.stage.trainable))
    module.eval()
    turns = cfg.data.turns
    recorded = {split: record_turns(module, turns[f"{split}_shards"], turns.limit if split == "train" else 0,
                                    turns.record_batch, f"LLM states, {split} turns") for split in ("train", "dev")}  # fmt: skip
    module.state_head.train()
    data = ChunkStates(recorded["train"]["turns"], recorded["dev"]["turns"], cfg.data.turns.batch_size, cfg.seed)
    trainer = fit(cfg, module, data)
    metrics = {
        "component_params": counts,
        "train_steps": trainer.global_step,
        "turns": {s: len(r["turns"]) for s, r in recorded.items()},
        "chunks": {s: label_counts(r["turns"]) for s, r in recorded.items()},
        "skipped": {s: r["skipped"] for s, r in recorded.items()},
    }
    if trainer.global_rank == 0:
        save_stage_output(cfg, module)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
        write_metrics(cfg, metrics)
    return metrics


# --- decisions and the report ---------------------------------------------------------------------
def decide(probs: torch.Tensor, answer_threshold: float, drop_threshold: float) -> tuple[int, int]:
    """(state, chunk) of the first decision over chunk probabilities [C, 3] (state 2 checked
    first, as the release); (LISTEN, C) if neither fires."""
    for c in range(len(probs)):
        if float(probs[c, DROP]) > drop_threshold:
            return DROP, c
        if float(probs[c, ANSWER]) > answer_threshold:
            return ANSWER, c
    return LISTEN, len(probs)
