"""Text QA evaluation of a causal LM: multi-round dialogues, answers checked by the one checker.

Each dialogue is answered turn by turn with the model's *own* earlier answers in the
context, as in a real conversation. Turns at the same depth are generated together in
left-padded batches with greedy decoding.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from datamodules.corpus.answers import check_answer
from datamodules.text_qa import chat_messages
from datamodules.transcripts import normalize_transcript


@torch.inference_mode()
def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict]],
    max_new_tokens: int,
) -> list[str]:
    """Greedy replies to a batch of chat message lists (left padding)."""
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    finally:
        tokenizer.padding_side = side
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, enc["input_ids"].shape[1] :]]


def evaluate_text_qa(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dialogues: list[dict],
    batch_size: int = 64,
    max_new_tokens: int = 40,
    progress: bool = True,
) -> dict:
    """Accuracy over all turns, per family and per turn depth, plus the replies themselves."""
    was_training = model.training
    model.eval()
    replies: list[list[str]] = [[] for _ in dialogues]
    depth = max(len(d["turns"]) for d in dialogues)
    total = sum(len(d["turns"]) for d in dialogues)
    bar = tqdm(total=total, desc="text QA", unit="turn", disable=not progress)
    for k in range(depth):
        idx = [i for i, d in enumerate(dialogues) if len(d["turns"]) > k]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            convs = []
            for i in chunk:
                turns = dialogues[i]["turns"]
                history = [(turns[j]["question"], replies[i][j]) for j in range(k)]
                convs.append(chat_messages(history, turns[k]["question"]))
            for i, reply in zip(chunk, generate_replies(model, tokenizer, convs, max_new_tokens)):
                replies[i].append(reply)
            bar.update(len(chunk))
    bar.close()
    model.train(was_training)

    per_family: dict[str, list[bool]] = defaultdict(list)
    per_depth: dict[int, list[bool]] = defaultdict(list)
    records = []
    for d, rs in zip(dialogues, replies):
        for k, (turn, reply) in enumerate(zip(d["turns"], rs)):
            ok = check_answer(reply, turn["gold"])
            per_family[turn["family"]].append(ok)
            per_depth[k + 1].append(ok)
            records.append(
                {
                    "id": d["id"],
                    "turn": k,
                    "question": turn["question"],
                    "reply": reply,
                    "gold": turn["gold"],
                    "correct": ok,
                }
            )
    all_ok = [r["correct"] for r in records]
    return {
        "accuracy": sum(all_ok) / len(all_ok),
        "num_turns": len(all_ok),
        "num_dialogues": len(dialogues),
        "per_family": {f: sum(v) / len(v) for f, v in sorted(per_family.items())},
        "per_turn_depth": {str(k): sum(v) / len(v) for k, v in sorted(per_depth.items())},
        "records": records,
    }


def evaluate_repeat(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sentences: list[str],
    instruction: str,
    batch_size: int = 64,
    max_new_tokens: int = 40,
) -> dict:
    """Exact-match rate (after transcript normalization) of greedy replies to `instruction + s`.

    This is the skill stage input_2_align relies on: given the instruction and a sentence it
    has never seen, the LLM says the sentence back. Returns the rate and the failures.
    """
    was_training = model.training
    model.eval()
    replies: list[str] = []
    for start in tqdm(range(0, len(sentences), batch_size), desc="repeat", unit="batch"):
        convs = [chat_messages([], instruction + s) for s in sentences[start : start + batch_size]]
        replies += generate_replies(model, tokenizer, convs, max_new_tokens)
    model.train(was_training)
    ok = [normalize_transcript(r) == normalize_transcript(s) for r, s in zip(replies, sentences)]
    failures = [{"sentence": s, "reply": r} for s, r, good in zip(sentences, replies, ok) if not good]
    return {"exact_match": sum(ok) / len(ok), "num_sentences": len(ok), "failures": failures}


def accuracy_table(title: str, metrics: dict) -> str:
    """Markdown table of overall and per-family accuracy."""
    lines = [f"### {title}", "", "| family | accuracy |", "|---|---|"]
    lines += [f"| {f} | {a:.3f} |" for f, a in metrics["per_family"].items()]
    lines.append(f"| **all ({metrics['num_turns']} turns)** | **{metrics['accuracy']:.3f}** |")
    return "\n".join(lines) + "\n"
