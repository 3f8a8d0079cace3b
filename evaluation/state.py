"""The state classifier's report (`python infer.py eval_state`): per-chunk precision and recall,
endpoint delay, answers after the end of a turn, cut-ins and false answers, and a threshold
sweep -> runs/<exp>/eval/state.{json,md}.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from omegaconf import DictConfig

from datamodules.corpus.turns import ANSWER, CHUNK_S, DROP, IGNORE, LISTEN, STATE_NAMES
from datamodules.features import StreamingFbank
from modules.config import eval_dir
from modules.speech_llm.model import ALIGN, CHUNK_SAMPLES, PROMPT, STATE, SpeechLLM, load_speech_llm
from modules.state_classifier import decide, record_turns
from server.latency import percentiles


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


def context_table(by_context: dict) -> str:
    """The turns that open a conversation against those after an earlier exchange
    (`data.turns.context_prob`); empty when all are of one sort."""
    if len(by_context) < 2:
        return ""
    lines = ["", "| turn | turns | questions answered after the end | cut in before it | false answers |",
             "|---|---|---|---|---|"]  # fmt: skip
    names = {"first_turn": "opens the conversation", "after_exchange": "after a question and its answer"}
    for key, r in by_context.items():
        lines.append(f"| {names[key]} | {r['turns']} | {100 * r['answered_questions']:.1f}% | "
                     f"{100 * r['cut_in_rate']:.1f}% | {100 * r['false_answer_rate']:.1f}% |")  # fmt: skip
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
    dev = record_turns(module, turns.dev_shards, cfg.eval.limit, turns.record_batch, "LLM states, dev turns",
                       turns.context_prob)  # fmt: skip
    sweep, sweep_table = threshold_sweep(module, dev["turns"])
    recorded = record_turns(module, turns.test_shards, cfg.eval.limit, turns.record_batch, "LLM states, test turns",
                            turns.context_prob)  # fmt: skip
    thresholds = (s.state_answer_threshold, s.state_drop_threshold)
    result = state_report(module, recorded["turns"], *thresholds)
    result["skipped"] = recorded["skipped"]
    result["by_context"] = {}
    for name, ctx in (("first_turn", False), ("after_exchange", True)):
        if sub := [t for t in recorded["turns"] if t["context"] == ctx]:
            r = state_report(module, sub, *thresholds)
            result["by_context"][name] = {k: r[k] for k in ("turns", "answered_questions", "cut_in_rate",
                                                             "false_answer_rate")}  # fmt: skip
    result["dev_threshold_sweep"] = sweep
    result["table"] = (report_table(result) + context_table(result["by_context"]) +
                       "\nThe thresholds on the dev turns (pick them here, set "
                       "`speech_llm.state_drop_threshold` and `speech_llm.state_answer_threshold`):\n\n"
                       + sweep_table)  # fmt: skip
    out = eval_dir(cfg)
    (out / "state.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "state.md").write_text(result["table"])
    print(result["table"])
    return result
