"""The paper's Table 3 on any scale: spoken QA accuracy vs the same frozen LLM on text.

* `text_accuracy`: the frozen LLM answers the *text* of the test questions (multi-round, its
  own earlier replies in the context).
* `speech_accuracy`: the same dialogues spoken by unseen voices, fed 160 ms at a time through
  the streaming engine (`server.engine.DuplexModel.prefill`: fbank -> encoder -> adapter ->
  chunk-wise LLM prefill, stages input_2_align + input_3_prompt) and answered by its
  `generate` (text only); the KV cache carries the conversation across turns.

Both rows use the one frozen LLM the engine loaded.

One checker (`datamodules.corpus.answers.check_answer`) grades both. Writes
runs/<exp>/eval/spoken_qa.json, spoken_qa.md and the replies (spoken_qa_replies.jsonl).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from datamodules.audio import INPUT_SAMPLE_RATE
from datamodules.corpus.answers import check_answer
from datamodules.shards.reader import append_silence, iter_decoded
from datamodules.spoken_qa import read_dialogues
from modules.config import eval_dir
from modules.llm.generate import evaluate_text_qa
from modules.speech_llm.model import ALIGN, CHUNK_SAMPLES, PROMPT
from server.engine import DuplexModel

log = logging.getLogger(__name__)


def spoken_test_dialogues(cfg: DictConfig, limit: int = 0, desc: str = "spoken dialogues") -> Iterator[dict]:
    """The decoded spoken test dialogues (16 kHz; the first `limit`, 0 = all), with a progress bar."""
    samples = iter_decoded(cfg.data.spoken_qa.test_shards)
    for n, sample in enumerate(tqdm(samples, desc=desc, unit="dialogue")):
        if limit and n >= limit:
            return
        yield sample


def with_tail_silence(cfg: DictConfig, wav: np.ndarray) -> np.ndarray:
    """A test turn followed by the silence the spoken-QA stages train with
    (`data.spoken_qa.tail_silence_s`, the data pipeline's `append_silence`), as a turn reaches
    the model once its end is detected."""
    unit = {"wav": wav, "sr": INPUT_SAMPLE_RATE}
    return append_silence(unit, seconds=cfg.data.spoken_qa.tail_silence_s)["wav"]


def spoken_qa_engine(cfg: DictConfig) -> DuplexModel:
    """The text-only streaming engine of Table 3: stages input_2_align + input_3_prompt, no speech output."""
    return DuplexModel.load(cfg, speech_output=False, stages=(ALIGN, PROMPT))


def answer_turn(cfg: DictConfig, engine: DuplexModel, session, wav: np.ndarray) -> str:
    """One spoken question (16 kHz) and its tail silence prefilled 160 ms at a time, then the reply's text."""
    audio = with_tail_silence(cfg, wav)
    for i in range(0, len(audio), CHUNK_SAMPLES):
        engine.prefill(session, audio[i : i + CHUNK_SAMPLES])
    return engine.generate(session).text


def speech_qa(cfg: DictConfig, engine: DuplexModel, limit: int = 0) -> list[dict]:
    """Answer every spoken test dialogue through the streaming engine; one record per turn."""
    records = []
    for sample in spoken_test_dialogues(cfg, limit, "spoken QA (streaming)"):
        session = engine.new_session()
        for k, turn in enumerate(sample["turns"]):
            wav = np.asarray(turn["wav"], dtype=np.float32)
            reply = answer_turn(cfg, engine, session, wav)
            records.append({
                "id": sample["key"], "turn": k, "question": turn["question"], "family": turn["family"],
                "reply": reply, "gold": list(turn["gold"]), "correct": check_answer(reply, turn["gold"]),
                "audio_s": round(len(wav) / 16000, 3),
            })  # fmt: skip
    return records


def _per_family(records: list[dict]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        groups[r["family"]].append(r["correct"])
    return {f: sum(v) / len(v) for f, v in sorted(groups.items())}


def evaluate_spoken_qa(cfg: DictConfig) -> dict:
    dialogues = read_dialogues(cfg.data.spoken_qa.test_shards)
    if cfg.eval.limit:
        dialogues = dialogues[: cfg.eval.limit]
    engine = spoken_qa_engine(cfg)
    llm, tokenizer = engine.llm.llm, engine.llm.tokenizer  # the engine's frozen LLM: loaded once
    text = evaluate_text_qa(llm, tokenizer, dialogues, cfg.eval.batch_size, cfg.speech_llm.max_answer_tokens)
    records = speech_qa(cfg, engine, cfg.eval.limit)
    speech_acc = sum(r["correct"] for r in records) / max(1, len(records))
    text_acc = text["accuracy"]
    text_family = text["per_family"]
    speech_family = _per_family(records)
    families = sorted(set(speech_family) | set(text_family))

    def row(name: str, per_family: dict[str, float], acc: float) -> str:
        cells = " | ".join(f"{per_family[f]:.3f}" if f in per_family else "-" for f in families)
        return f"| {name} | {cells} | **{acc:.3f}** |"

    lines = [
        "### Spoken QA accuracy vs the same frozen LLM on text (Table 3 shape, unseen voices)",
        "",
        "| input | " + " | ".join(families) + " | all |",
        "|---|" + "---|" * (len(families) + 1),
        row("text (frozen LLM)", text_family, text_acc),
        row("speech, streaming 160 ms chunks", speech_family, speech_acc),
        "",
        f"speech / text = {speech_acc / max(text_acc, 1e-9):.3f} over {len(records)} turns of {len(dialogues)} dialogues",
    ]  # fmt: skip
    table = "\n".join(lines) + "\n"
    result = {
        "text_accuracy": text_acc,
        "speech_accuracy": speech_acc,
        "speech_over_text": speech_acc / max(text_acc, 1e-9),
        "num_turns": len(records),
        "num_dialogues": len(dialogues),
        "text_per_family": text_family,
        "speech_per_family": speech_family,
        "table": table,
    }
    out = eval_dir(cfg)
    (out / "spoken_qa.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "spoken_qa.md").write_text(table)
    (out / "spoken_qa_replies.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(table)
    return result


def evaluate_question_hearing(cfg: DictConfig) -> dict:
    """What the stage-1 encoder hears of the spoken QA test questions: CTC greedy transcripts at the
    streaming chunk size, per family (exact match and WER) and the most frequent misses.

    A Table-3 diagnostic: a word the CTC does not hear reaches the LLM as another word (through
    the lexical adapter, literally), so a family that is heard badly cannot be answered well.
    Each question is followed by `data.spoken_qa.tail_silence_s` of silence, as in Table 3.
    Writes runs/<exp>/eval/questions.{json,md}.
    """
    import torch

    from datamodules.features import fbank
    from datamodules.transcripts import normalize_transcript, wer
    from modules.encoder.ctc import greedy_decode, load_encoder_ctc

    module = load_encoder_ctc(cfg)
    chunk = int(cfg.encoder.chunk_frames)
    refs: dict[str, list[str]] = defaultdict(list)
    hyps: dict[str, list[str]] = defaultdict(list)
    with torch.no_grad():
        for sample in spoken_test_dialogues(cfg, cfg.eval.limit, "spoken questions (CTC)"):
            for turn in sample["turns"]:
                wav = with_tail_silence(cfg, np.asarray(turn["wav"], dtype=np.float32))
                feats = torch.from_numpy(fbank(wav))[None]
                log_probs, lens = module.log_probs(feats, torch.tensor([feats.shape[1]]), chunk_frames=chunk)
                refs[turn["family"]].append(normalize_transcript(turn["question"]))
                hyps[turn["family"]].append(normalize_transcript(greedy_decode(module.vocab, log_probs, lens)[0]))
    families = sorted(refs)
    per_family = {
        f: {
            "questions": len(refs[f]),
            "exact": sum(h == r for h, r in zip(hyps[f], refs[f])) / len(refs[f]),
            "wer": wer(hyps[f], refs[f]),
        }
        for f in families
    }
    all_refs = [r for f in families for r in refs[f]]
    all_hyps = [h for f in families for h in hyps[f]]
    exact = sum(h == r for h, r in zip(all_hyps, all_refs)) / max(1, len(all_refs))
    all_wer = wer(all_hyps, all_refs)
    tail_s = float(cfg.data.spoken_qa.tail_silence_s)
    misses = defaultdict(int)
    for h, r in zip(all_hyps, all_refs):
        if h != r:
            misses[(r, h)] += 1
    top = sorted(misses.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    ms = chunk * 40
    lines = [
        f"### How the stage-1 CTC hears the spoken QA test questions (greedy, chunk {chunk} = {ms} ms, unseen voices, "
        f"{tail_s:.2f} s of silence after each)",
        "",
        "| family | questions | heard exactly | WER |",
        "|---|---|---|---|",
        *(f"| {f} | {v['questions']} | {v['exact']:.3f} | {v['wer']:.3f} |" for f, v in per_family.items()),
        f"| **all** | {len(all_refs)} | **{exact:.3f}** | **{all_wer:.3f}** |",
        "",
        "Most frequent misses (count: question -> heard):",
        "",
        *(f"- {n}: {r} -> {h}" for (r, h), n in top),
    ]
    table = "\n".join(lines) + "\n"
    result = {
        "chunk_frames": chunk,
        "tail_silence_s": tail_s,
        "questions": len(all_refs),
        "exact": exact,
        "wer": all_wer,
        "per_family": per_family,
        "misses": [{"question": r, "heard": h, "count": n} for (r, h), n in top],
        "table": table,
    }
    out = eval_dir(cfg)
    (out / "questions.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "questions.md").write_text(table)
    print(table)
    return result
