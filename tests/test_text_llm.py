"""Stage llm_text: tokenizer, chat encoding, a short real fit, save/load, resume, evaluation."""

import json

import pytest
import torch

import train
from datamodules.text_qa import IGNORE_INDEX, dialogue_messages, encode_chat
from datamodules.tokenizer import train_bpe_tokenizer
from modules.config import load_config
from modules.llm import build_qwen2, load_llm
from modules.training import read_checkpoint

TINY = [
    "llm.arch.vocab_size=400",
    "llm.arch.hidden_size=32",
    "llm.arch.intermediate_size=64",
    "llm.arch.num_hidden_layers=1",
    "llm.arch.num_attention_heads=2",
    "llm.arch.num_key_value_heads=1",
    "data.text_qa.batch_size=4",
    "data.text_qa.max_tokens_per_batch=400",
    "data.text_qa.bucket_pool=16",
    "data.text_qa.val_dialogues=4",
    "trainer.val_check_interval=2",
    "trainer.enable_progress_bar=false",
    "eval.limit=6",
    "eval.max_new_tokens=8",
]


@pytest.fixture
def transcripts(tmp_path):
    path = tmp_path / "asr_train.jsonl"
    path.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["the red fox runs home", "seven small dogs sleep"])
    )
    return path


def test_chat_labels_cover_the_chosen_turns_only():
    tok = train_bpe_tokenizer(["What is two plus two? Two plus two is four. system user assistant"] * 50, 300)
    turns = [
        {"question": "What is two plus two?", "answer": "Two plus two is four."},
        {"question": "What is that plus two?", "answer": "Four plus two is six."},
    ]
    ids, labels = encode_chat(tok, dialogue_messages(turns), 512, roles=("assistant",))
    assert len(ids) == len(labels)
    learned = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert learned == "Two plus two is four.<|im_end|>Four plus two is six.<|im_end|>"
    assert tok.decode(ids).startswith("<|im_start|>system")
    # training default: user and assistant turns, never the system prompt or role headers
    _, labels = encode_chat(tok, dialogue_messages(turns), 512)
    learned = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert learned == (
        "What is two plus two?<|im_end|>Two plus two is four.<|im_end|>"
        "What is that plus two?<|im_end|>Four plus two is six.<|im_end|>"
    )
    # truncation keeps ids and labels aligned
    ids, labels = encode_chat(tok, dialogue_messages(turns), 10)
    assert len(ids) == len(labels) == 10


def test_sequence_requests_are_consistent():
    import random

    from datamodules.answers import normalize_answer
    from datamodules.text_qa import sequence_request

    rng = random.Random(0)
    for _ in range(200):
        r = sequence_request(rng)
        items = r["answer"].rstrip(".").split(", ")
        assert 2 <= len(items) <= 8
        assert items[0].lower() in r["question"].lower() and items[-1].lower() in r["question"].lower()
        if r["question"].startswith("Count"):
            values = [int(normalize_answer(x)[0]) for x in items]
            step = -1 if "down" in r["question"] else 1
            assert values == list(range(values[0], values[0] + step * len(values), step))
            assert all(0 <= v <= 20 for v in values)


def test_tiny_config_respects_the_size_budget():
    cfg = load_config(["stage=llm_text", "experiment=tiny"])

    class Tok:  # only what build_qwen2 reads
        bos_token_id, eos_token_id, pad_token_id = None, 2, 0

        def __len__(self):
            return cfg.llm.arch.vocab_size

    with torch.device("meta"):
        n = sum(p.numel() for p in build_qwen2(cfg.llm.arch, Tok()).parameters())
    assert 1_000_000 < n <= 15_000_000


def test_short_fit_saves_a_loadable_llm_and_resumes(tmp_path, transcripts):
    args = ["stage=llm_text", "experiment=tiny", f"run_root={tmp_path / 'runs'}",
            f"data.text_qa.repeat_manifest={transcripts}", *TINY]  # fmt: skip
    metrics = train.main([*args, "trainer.max_steps=4"])
    out = tmp_path / "runs" / "tiny" / "llm_text"
    assert metrics["train_steps"] == 4
    assert 0.0 <= metrics["text_qa_accuracy"] <= 1.0 and metrics["text_qa_turns"] >= 6
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["text_qa_accuracy"] == metrics["text_qa_accuracy"]
    assert (out / "config.yaml").is_file() and list((out / "tb").rglob("events.out.tfevents.*"))

    cfg = load_config(args)
    model, tok = load_llm(cfg.llm)  # the one loading path, local files only
    assert sum(p.numel() for p in model.parameters()) == metrics["num_parameters"]
    assert tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    ).endswith("<|im_start|>assistant\n")

    ckpt = read_checkpoint(out / "checkpoints" / "last.ckpt")
    assert ckpt["run_config"]["stage"]["trainable"] == ["llm"]
    assert ckpt["global_step"] == 4

    again = train.main([*args, "trainer.max_steps=6"])  # resumes from last.ckpt
    assert again["train_steps"] == 6


def test_missing_llm_path_says_what_to_do(tmp_path):
    cfg = load_config(["stage=llm_text", "experiment=tiny", f"llm.path={tmp_path}/nothing"])
    with pytest.raises(FileNotFoundError, match="stage=llm_text experiment=tiny"):
        load_llm(cfg.llm)
