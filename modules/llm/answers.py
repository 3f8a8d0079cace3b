"""The frozen LLM's answers to the *text* of the spoken-QA training questions, generated once.

`python -m tools.make_llm_answers experiment=tiny` makes them ahead of time; the stages that need
them call `ensure_llm_answers`.

Stage input_3_prompt teaches the prompt vectors to make the LLM answer a spoken question the
way it answers the same question in text, so its targets are the LLM's own replies, not the
corpus's reference answers (the paper did the same). Each dialogue is answered turn by turn,
with the LLM's own earlier replies in the context, in greedy decoding. Reads the question
text from the spoken-QA shards' JSON (no audio is decoded) and writes
`<speech_llm.answers_dir>/{train,dev}.jsonl` ({"id", "replies"}) plus `meta.json` naming the
LLM; a later call with the same LLM and shards reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from datamodules.shards.reader import resolve_shards
from datamodules.spoken_qa import read_dialogues
from modules.llm.generate import evaluate_text_qa
from modules.llm.hf import load_llm

log = logging.getLogger(__name__)

SPLITS = ("train", "dev")


def fingerprint(cfg: DictConfig) -> dict:
    """What the cached answers depend on: the LLM's files and the shard lists."""
    llm = Path(cfg.llm.path)
    h = hashlib.sha256()
    for f in sorted(llm.glob("*.safetensors")) + sorted(llm.glob("*.json")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    shards = {s: resolve_shards(cfg.data.spoken_qa[f"{s}_shards"]) for s in SPLITS}
    return {
        "llm_path": str(llm),
        "llm_files": h.hexdigest(),
        "shards": shards,
        "max_new_tokens": cfg.speech_llm.max_answer_tokens,
    }


def make_llm_answers(cfg: DictConfig) -> Path:
    out = Path(cfg.speech_llm.answers_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_llm(cfg.llm)
    summary = {}
    for split in SPLITS:
        dialogues = read_dialogues(cfg.data.spoken_qa[f"{split}_shards"])
        result = evaluate_text_qa(model, tokenizer, dialogues, cfg.eval.batch_size, cfg.speech_llm.max_answer_tokens)
        replies: dict[str, list[str]] = {d["key"]: [] for d in dialogues}
        keys = {d["id"]: d["key"] for d in dialogues}
        for rec in result["records"]:
            replies[keys[rec["id"]]].append(rec["reply"])
        tmp = out / f"{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps({"id": k, "replies": r}) + "\n" for k, r in replies.items()))
        tmp.replace(out / f"{split}.jsonl")
        summary[split] = {"dialogues": len(dialogues), "turns": result["num_turns"], "accuracy": result["accuracy"]}
        log.info("%s: %d dialogues, LLM text accuracy %.3f", split, len(dialogues), result["accuracy"])
    (out / "meta.json").write_text(json.dumps({**fingerprint(cfg), "summary": summary}, indent=2) + "\n")
    return out


def ensure_llm_answers(cfg: DictConfig) -> Path:
    """The cached answers, generated first if missing or made with another LLM / other shards."""
    out = Path(cfg.speech_llm.answers_dir)
    meta = out / "meta.json"
    if meta.is_file():
        old = json.loads(meta.read_text())
        old.pop("summary", None)
        if old == json.loads(json.dumps(fingerprint(cfg))) and all((out / f"{s}.jsonl").is_file() for s in SPLITS):
            return out
        log.info("cached LLM answers in %s were made with another LLM or other shards: regenerating", out)
    return make_llm_answers(cfg)
