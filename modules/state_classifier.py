"""Stage `input_4_state`: the chunk-level state classifier, and its report (`infer.py eval_state`).

A linear head (`SpeechLLM.state_head`, the release's `predictor_head`) reads the frozen LLM's
last hidden state at the end of every 160 ms chunk of a user turn: 0 keep listening, 1 the user
has finished and wants an answer, 2 the user has finished and no answer is due (backchannel,
filler, noise, speech to someone else); a fourth output is never a target and is ignored. At
inference P(drop) > `drop_threshold` drops the turn, else P(answer) > `answer_threshold`
answers it (the release's rule, state 2 checked first).

Everything in front of the head is frozen (encoder, adapter, prompt, LLM), so the stage runs
the speech LLM once over the turns of `data.turns` (`datamodules.turns`; the offline encoder
under the chunk mask, which equals the streaming path) and fits the head on the recorded
states: seconds per epoch instead of a forward pass of the LLM per step.

The report decides every test turn chunk by chunk as the streaming path would and measures:
per-class precision and recall (per chunk and per turn), the endpoint delay (ms from the true
end of a question to the answer decision, on the streaming path's clock), answers before the
end (cut-ins, e.g. during a mid-question pause), and the false-answer rate on state-2 material.
"""

from __future__ import annotations

import json
import logging
import math

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from datamodules.features import StreamingFbank, fbank
from datamodules.shards import SkipCounter, iter_decoded
from datamodules.turns import ANSWER, CHUNK_S, DROP, IGNORE, LISTEN, STATE_NAMES, chunk_labels
from modules.config import eval_dir
from modules.duplex import percentiles
from modules.speech_llm import ALIGN, CHUNK_SAMPLES, PROMPT, STATE, SpeechLLM, build, load_speech_llm
from modules.training import fit, load_stage_outputs, save_stage_output, write_metrics

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


class ChunkStates(L.LightningDataModule):
    """Recorded chunk states and labels of the train and dev turns (IGNORE chunks left out)."""

    def __init__(self, train: list[dict], dev: list[dict], batch_size: int, seed: int):
        super().__init__()
        self.parts = {"train": self._stack(train), "dev": self._stack(dev)}
        self.batch_size, self.seed = batch_size, seed

    @staticmethod
    def _stack(turns: list[dict]) -> torch.utils.data.TensorDataset:
        hidden, labels = torch.cat([t["states"] for t in turns]), torch.cat([t["labels"] for t in turns])
        keep = labels != IGNORE
        return torch.utils.data.TensorDataset(hidden[keep], labels[keep])

    def _loader(self, split: str, shuffle: bool):
        def collate(rows):
            hidden, labels = zip(*rows)
            return {"hidden": torch.stack(hidden), "labels": torch.stack(labels)}

        gen = torch.Generator().manual_seed(self.seed)
        return torch.utils.data.DataLoader(self.parts[split], self.batch_size, shuffle=shuffle, collate_fn=collate,
                                           generator=gen)  # fmt: skip

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("dev", False)


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


@torch.inference_mode()
def decision_times(module: SpeechLLM, seconds: float) -> list[float]:
    """Audio time (s) at which the streaming path has the last embedding of chunk c, for every
    chunk of `seconds` of audio fed in 160 ms pieces (the encoder's look-ahead included; the
    end of the audio flushes the rest)."""
    fb, enc, ad = StreamingFbank(), module.encoder.init_state(), module.adapter.init_state()
    dev = module.state_head.weight.device
    total = round(seconds * 16000)
    have, times, fed = 0, [], 0
    while True:
        n = min(CHUNK_SAMPLES, total - fed)
        final = n <= 0
        feats = fb.finish() if final else fb.accept(np.zeros(n, np.float32))
        fed += max(n, 0)
        x, enc = module.encoder.stream(torch.from_numpy(feats)[None].to(dev), enc, final=final)
        emb, ad = module.adapter.stream(x, ad)
        have += emb.shape[1]
        while 2 * len(times) + 2 <= have or (final and 2 * len(times) < have):
            times.append(fed / 16000)
        if final:
            return times


def _precision_recall(pred: list[int], gold: list[int], classes: tuple[int, ...]) -> dict:
    out = {}
    for k in classes:
        tp = sum(p == k and g == k for p, g in zip(pred, gold))
        npred, ngold = sum(p == k for p in pred), sum(g == k for g in gold)
        out[STATE_NAMES[k]] = {"precision": tp / npred if npred else float("nan"),
                               "recall": tp / ngold if ngold else float("nan"), "support": ngold}  # fmt: skip
    return out


@torch.inference_mode()
def state_report(
    module: SpeechLLM,
    turns: list[dict],
    answer_threshold: float,
    drop_threshold: float,
    times: list[float] | None = None,
) -> dict:
    """The measures of the module docstring over recorded turns (`times`: `decision_times` long
    enough for every turn, computed here when not given)."""
    times = times or decision_times(module, max(t["duration"] for t in turns) + 1.0)
    chunk_pred, chunk_gold, turn_pred, turn_gold = [], [], [], []
    delays, cut_ins, per_kind = [], 0, {}
    records = []
    for t in turns:
        probs = module.state_probs(t["states"].to(module.state_head.weight.device)).cpu()
        keep = t["labels"] != IGNORE
        chunk_pred += probs.argmax(-1)[keep].tolist()
        chunk_gold += t["labels"][keep].tolist()
        state, c = decide(probs, answer_threshold, drop_threshold)
        at = times[min(c, len(times) - 1)] if c < len(probs) else None
        early = at is not None and at <= t["end"]
        turn_pred.append(state)
        turn_gold.append(t["label"])
        k = per_kind.setdefault(t["kind"], {"turns": 0, "answer": 0, "drop": 0, "none": 0, "early": 0})
        k["turns"] += 1
        k[{ANSWER: "answer", DROP: "drop", LISTEN: "none"}[state]] += 1
        k["early"] += int(early)
        if t["label"] == ANSWER and state == ANSWER:
            if early:
                cut_ins += 1
            else:
                delays.append(at - t["end"])
        records.append({"id": t["id"], "kind": t["kind"], "label": t["label"], "decision": state,
                        "at_s": at, "end_s": t["end"], "p_answer": probs[:, ANSWER].round(decimals=3).tolist()})  # fmt: skip
    questions = sum(g == ANSWER for g in turn_gold)
    state2 = [p for p, g in zip(turn_pred, turn_gold) if g == DROP]
    return {
        "turns": len(turns),
        "thresholds": {"answer": answer_threshold, "drop": drop_threshold},
        "chunk": _precision_recall(chunk_pred, chunk_gold, (LISTEN, ANSWER, DROP)),
        "chunk_accuracy": float(np.mean([p == g for p, g in zip(chunk_pred, chunk_gold)])),
        "turn": _precision_recall(turn_pred, turn_gold, (ANSWER, DROP)),
        "endpoint_delay_ms": percentiles([1000 * d for d in delays]),
        "answered_questions": len(delays) / max(questions, 1),
        "cut_in_rate": cut_ins / max(questions, 1),
        "false_answer_rate": sum(p == ANSWER for p in state2) / max(len(state2), 1),
        "per_kind": per_kind,
        "records": records,
    }


def report_table(r: dict) -> str:
    def pct(x):
        return "n/a" if x != x else f"{100 * x:.1f}%"

    d = r["endpoint_delay_ms"]
    delay = f"avg {d['avg']:.0f} / p50 {d['p50']:.0f} / p90 {d['p90']:.0f} ms (n={d['n']})" if d["n"] else "n/a"
    lines = [
        f"### State classifier on {r['turns']} test turns (unseen voices), decided every {int(CHUNK_S * 1000)} ms",
        "",
        f"Endpoint delay (true end of a question -> answer decision): {delay}; questions answered after "
        f"their end {pct(r['answered_questions'])}, cut in before it {pct(r['cut_in_rate'])}; "
        f"false answers on state-2 material {pct(r['false_answer_rate'])}; chunk accuracy {pct(r['chunk_accuracy'])}.",
        "",
        "| level | class | precision | recall | support |",
        "|---|---|---|---|---|",
    ]
    for level in ("chunk", "turn"):
        for name, m in r[level].items():
            lines.append(f"| {level} | {name} | {pct(m['precision'])} | {pct(m['recall'])} | {m['support']} |")
    lines += [
        "",
        "| kind | turns | answered | dropped | no decision | decided before the end |",
        "|---|---|---|---|---|---|",
    ]
    for kind, k in sorted(r["per_kind"].items()):
        lines.append(f"| {kind} | {k['turns']} | {k['answer']} | {k['drop']} | {k['none']} | {k['early']} |")
    return "\n".join(lines) + "\n"


SWEEP = (0.5, 0.6, 0.7, 0.8, 0.9)  # answer thresholds
DROP_SWEEP = (0.5, 0.7, 0.9)


def threshold_sweep(module: SpeechLLM, turns: list[dict]) -> tuple[list[dict], str]:
    """The trade-off of the two thresholds (cut-ins vs delay vs missed answers vs false answers)
    on `turns` (dev)."""
    rows, times = [], decision_times(module, max(t["duration"] for t in turns) + 1.0)
    for drop in DROP_SWEEP:
        for thr in SWEEP:
            r = state_report(module, turns, thr, drop, times)
            d = r["endpoint_delay_ms"]
            rows.append({"answer_threshold": thr, "drop_threshold": drop, "answered": r["answered_questions"],
                         "cut_in": r["cut_in_rate"], "false_answer": r["false_answer_rate"],
                         "delay_avg_ms": d.get("avg"), "delay_p90_ms": d.get("p90")})  # fmt: skip
    lines = ["| drop threshold | answer threshold | answered after the end | cut in before it | false answers | "
             "delay avg / p90 (ms) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        delay = f"{r['delay_avg_ms']:.0f} / {r['delay_p90_ms']:.0f}" if r["delay_avg_ms"] is not None else "n/a"
        lines.append(f"| {r['drop_threshold']} | {r['answer_threshold']} | {100 * r['answered']:.1f}% | "
                     f"{100 * r['cut_in']:.1f}% | {100 * r['false_answer']:.1f}% | {delay} |")  # fmt: skip
    return rows, "\n".join(lines) + "\n"


def evaluate_state(cfg: DictConfig, module: SpeechLLM | None = None) -> dict:
    """The report on the test turns (plus the dev sweep); `module`: the trained speech LLM when
    the caller has it loaded already."""
    module = module or load_speech_llm(cfg, [ALIGN, PROMPT, STATE])
    turns = cfg.data.turns
    s = cfg.speech_llm
    dev = record_turns(module, turns.dev_shards, cfg.eval.limit, turns.record_batch, "LLM states, dev turns")
    sweep, sweep_table = threshold_sweep(module, dev["turns"])
    recorded = record_turns(module, turns.test_shards, cfg.eval.limit, turns.record_batch, "LLM states, test turns")
    result = state_report(module, recorded["turns"], s.state_answer_threshold, s.state_drop_threshold)
    result["skipped"] = recorded["skipped"]
    result["dev_threshold_sweep"] = sweep
    result["table"] = (report_table(result) + "\nThe thresholds on the dev turns (pick them here, set "
                       "`speech_llm.state_drop_threshold` and `speech_llm.state_answer_threshold`):\n\n"
                       + sweep_table)  # fmt: skip
    out = eval_dir(cfg)
    (out / "state.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "state.md").write_text(result["table"])
    print(result["table"])
    return result
