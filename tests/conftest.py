"""Shared fixtures: a miniature eSpeak corpus (shards + CMVN) and a miniature stand-in LLM.

Both are built once per test session in a temporary directory (a few seconds), so the stage
tests run the real pipeline (synthesis -> shards -> fbank -> encoder -> frozen LLM) at toy size.
"""

from __future__ import annotations

import random

import pytest

from datamodules.corpus.qa import build_qa_splits, sample_dialogue
from datamodules.text_qa import SYSTEM_PROMPT
from datamodules.tokenizer import train_bpe_tokenizer
from modules.llm.hf import LLMArchConfig, build_qwen2
from tools.prepare_corpus import prepare_corpus

MINI_QA = {"train": 8, "dev": 3, "test": 3}


@pytest.fixture(scope="session")
def mini_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    prepare_corpus(
        out,
        seed=5,
        n_asr=30,
        n_tts=20,
        n_turns=30,
        workers=1,
        progress=False,
        qa_builder=lambda s: build_qa_splits(s, MINI_QA),
    )
    return out


@pytest.fixture(scope="session")
def mini_llm(tmp_path_factory):
    """A randomly initialised 1-layer Qwen2 with a BPE tokenizer and a chat template, saved to disk."""
    out = tmp_path_factory.mktemp("llm")
    rng = random.Random(0)
    texts = [f"system user assistant {SYSTEM_PROMPT} Repeat after me:"] * 20
    for _ in range(200):
        for t in sample_dialogue(rng, 5, heldout=False):
            texts += [t.question, t.answer]
    tokenizer = train_bpe_tokenizer(texts, 400)
    arch = LLMArchConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
    )  # fmt: skip
    build_qwen2(arch, tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def speech_args(tmp_path, mini_corpus, mini_llm) -> list[str]:
    """Command-line arguments that shrink every speech-input stage to seconds on a CPU."""
    return [
        "experiment=tiny",
        f"run_root={tmp_path / 'runs'}",
        f"corpus.root={mini_corpus}",
        f"llm.path={mini_llm}",
        "encoder.subsampling_channels=4",
        "encoder.d_model=16",
        "encoder.num_layers=1",
        "ctc.aux_layer=1",
        "encoder.num_heads=2",
        "encoder.ffn_dim=32",
        "speech_llm.prompt_num=3",
        "adapter.lexical=false",  # the paper's adapter; tests that want the lexical path add it
        "speech_llm.max_answer_tokens=4",
        "ctc.bpe_vocab_size=60",
        "trainer.max_steps=2",
        "codec.quantize_after=0",  # two steps leave no room for an unquantized warm-up
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "trainer.precision=32-true",
        "data.asr.max_frames_per_batch=3000",
        "data.spoken_qa.max_frames_per_batch=6000",
        "eval.batch_size=8",
    ]


def write_reference_answers(cfg) -> None:
    """The mini LLM's cached "own" answers (tools.make_llm_answers' format) = the reference
    answers of the QA train/dev dialogues, fingerprinted as if this LLM had made them."""
    import json
    from pathlib import Path

    from datamodules.shards.reader import iter_metadata
    from modules.llm.answers import fingerprint

    answers = Path(cfg.speech_llm.answers_dir)
    answers.mkdir(parents=True)
    for split in ("train", "dev"):
        rows = [{"id": k, "replies": [t["answer"] for t in m["turns"]]}
                for k, m in iter_metadata(cfg.data.spoken_qa[f"{split}_shards"])]  # fmt: skip
        (answers / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (answers / "meta.json").write_text(json.dumps(fingerprint(cfg)))


@pytest.fixture
def reference_answers():
    return write_reference_answers
