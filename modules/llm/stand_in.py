"""Stage `llm_text`: train the stand-in LLM (offline experiments only).

No pretrained LLM can be downloaded on the machines this project targets, so the tiny
experiment trains a Qwen2-architecture causal LM and a BPE tokenizer on the text QA of the
synthetic corpus, saves both with `save_pretrained` to runs/<exp>/llm_text/hf/, and every
later stage loads them through `modules.llm.hf.load_llm`, the path that loads Qwen2-7B-Instruct.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from datamodules.corpus.qa import build_qa_splits, sample_dialogue
from datamodules.text_qa import (
    GAP_ID,
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    TextQADataModule,
    chat_messages,
    read_transcripts,
    repeat_request,
    spoken_form,
    to_spoken_form,
    transcript_words,
)
from datamodules.tokenizer import train_bpe_tokenizer
from modules.config import run_dir
from modules.llm.generate import accuracy_table, evaluate_repeat, evaluate_text_qa, generate_replies
from modules.llm.hf import build_qwen2, load_llm, next_token_loss
from modules.stage import StageModule, StageRun, StageSpec, make_optimizer

log = logging.getLogger(__name__)


class TextLLM(StageModule):
    """A causal LM trained with next-token cross-entropy on assistant tokens."""

    def __init__(self, cfg: DictConfig, tokenizer: PreTrainedTokenizerBase):
        super().__init__(cfg)
        self.tokenizer = tokenizer
        self.llm = build_qwen2(cfg.llm.arch, tokenizer)

    def components(self) -> dict[str, nn.Module]:
        return {"llm": self.llm}

    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch["input_ids"]
        gap = ids == GAP_ID
        embeds = None
        if gap.any():  # spread user turns: gap positions read a zero vector
            embeds = self.llm.get_input_embeddings()(ids.masked_fill(gap, 0)).masked_fill(gap[..., None], 0.0)
        return next_token_loss(
            self.llm,
            batch["labels"],
            batch["attention_mask"],
            input_ids=ids if embeds is None else None,
            inputs_embeds=embeds,
            ignore_index=IGNORE_INDEX,
        )

    def training_step(self, batch, batch_idx):
        loss, acc = self._loss(batch)
        n = len(batch["input_ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/token_acc", acc, batch_size=n)
        self.log("train/batch_size", float(n), batch_size=n)
        self.log("train/real_tokens", batch["attention_mask"].sum().float(), reduce_fx="sum", batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, acc = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        self.log("val/token_acc", acc, batch_size=len(batch["input_ids"]))

    def on_validation_epoch_end(self) -> None:
        """Show a few greedy answers to held-out questions in TensorBoard."""
        if self.trainer.sanity_checking or not hasattr(self.logger, "experiment"):
            return
        rng = random.Random(0)
        questions = [sample_dialogue(rng, self.cfg.corpus.seed, heldout=True, max_turns=1)[0] for _ in range(4)]
        convs = [chat_messages([], t.question) for t in questions]
        replies = generate_replies(self.llm, self.tokenizer, convs, self.cfg.eval.max_new_tokens)
        text = "\n\n".join(f"Q: {t.question}  \nA: {r}  \n(reference: {t.answer})" for t, r in zip(questions, replies))
        self.logger.experiment.add_text("samples/held_out_answers", text, self.global_step)

    def configure_optimizers(self):
        return make_optimizer(self, self.cfg.optim, self.cfg.trainer.max_steps)


def tokenizer_corpus(cfg: DictConfig) -> list[str]:
    """Text the BPE is trained on: training QA dialogues, repeat prompts and ASR train transcripts.

    Questions and transcripts come in spoken form too (lower case, no punctuation), so "what"
    is a token as "What" is: speech reaches the LLM in that form, and with `ctc.units=llm`
    the CTC units are these tokens (else "what" falls apart into "w", "h", "at").
    The corpus depends only on the seeds, the corpus and the vocabulary size, so every stage
    that trains it (`ensure_tokenizer`) gets the same tokenizer.
    """
    rng = random.Random(f"bpe-{cfg.seed}")
    texts = [f"system\nuser\nassistant\n{SYSTEM_PROMPT}"] * 1000  # what every chat holds
    for _ in range(5000):
        for t in sample_dialogue(rng, cfg.corpus.seed, heldout=False):
            texts += [t.question, t.answer, spoken_form(t.question)]
    transcripts = read_transcripts(cfg.data.text_qa.repeat_manifest)
    return texts + transcripts + [spoken_form(t) for t in transcripts]


def is_stand_in(cfg: DictConfig) -> bool:
    """True when llm.path is this experiment's stand-in (trained by stage llm_text)."""
    return Path(cfg.llm.path).resolve() == (run_dir(cfg, "llm_text") / "hf").resolve()


def ensure_tokenizer(cfg: DictConfig) -> PreTrainedTokenizerBase:
    """The LLM's tokenizer, from llm.path; for the stand-in, trained and saved there first if absent.

    Stage input_1_ctc uses it for `ctc.units=llm` before (or while) stage llm_text trains the
    model; llm_text trains the same tokenizer again (deterministic) and saves it with the model.
    """
    path = Path(cfg.llm.path)
    if (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not is_stand_in(cfg):
        raise FileNotFoundError(f"no tokenizer.json at '{path}' (llm.path)")
    tokenizer = train_bpe_tokenizer(tokenizer_corpus(cfg), cfg.llm.arch.vocab_size)
    tmp = path.with_name(f"{path.name}.tokenizer-{os.getpid()}")
    tokenizer.save_pretrained(tmp)
    path.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():  # file by file, atomically: a run beside this one may write the same files
        os.replace(f, path / f.name)
    tmp.rmdir()
    return tokenizer


def build_stage_module(cfg: DictConfig) -> TextLLM:
    """A fresh stand-in LLM with a BPE tokenizer trained on `tokenizer_corpus`."""
    return TextLLM(cfg, train_bpe_tokenizer(tokenizer_corpus(cfg), cfg.llm.arch.vocab_size))


def count_parameters(run: StageRun) -> None:
    n_params = sum(p.numel() for p in run.module.llm.parameters())
    log.info("stand-in LLM: %s parameters", f"{n_params:,}")
    run.metrics["num_parameters"] = n_params


def save_hf(run: StageRun) -> None:
    """The stage output is a Hugging Face model + tokenizer at llm.path (what every later stage loads)."""
    hf_dir = Path(run.cfg.llm.path)
    hf_dir.mkdir(parents=True, exist_ok=True)
    run.module.llm.save_pretrained(hf_dir)
    run.module.tokenizer.save_pretrained(hf_dir)
    log.info("saved the LLM to %s", hf_dir)


def evaluate(cfg: DictConfig) -> dict:
    """Text QA accuracy of the LLM at `llm.path` on the held-out test dialogues."""
    model, tokenizer = load_llm(cfg.llm)
    dialogues = build_qa_splits(cfg.corpus.seed, {"test": cfg.corpus.qa_dialogues["test"]})["test"]
    if cfg.eval.limit:
        dialogues = dialogues[: cfg.eval.limit]
    result = evaluate_text_qa(model, tokenizer, dialogues, cfg.eval.batch_size, cfg.eval.max_new_tokens)
    out = run_dir(cfg, "llm_text")
    out.mkdir(parents=True, exist_ok=True)
    (out / "text_qa_replies.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result["records"]))
    (out / "text_qa.md").write_text(accuracy_table(f"Text QA, held-out test dialogues ({cfg.llm.path})", result))
    print(accuracy_table("Text QA accuracy of the stand-in LLM (held-out test split)", result))
    # The same questions as speech carries them (lower case, no punctuation): the stage-3 input.
    spoken = [{**d, "turns": to_spoken_form(d["turns"])} for d in dialogues]
    spoken_result = evaluate_text_qa(model, tokenizer, spoken, cfg.eval.batch_size, cfg.eval.max_new_tokens)
    print(f"Text QA accuracy on the questions in spoken form: {spoken_result['accuracy']:.3f}")
    # Saying back unseen sentences: what stage input_2_align needs from the frozen LLM.
    sentences = read_transcripts(cfg.data.text_qa.repeat_eval_manifest)
    if cfg.eval.limit:
        sentences = sentences[: cfg.eval.limit]
    instruction = cfg.speech_llm.align_instruction
    repeat = evaluate_repeat(model, tokenizer, sentences, instruction, cfg.eval.batch_size, cfg.eval.max_new_tokens)
    (out / "repeat_failures.jsonl").write_text("".join(json.dumps(r) + "\n" for r in repeat["failures"]))
    # The same with random word sequences: no template to guess from, so only copying scores.
    rng = random.Random(f"scrambled-{cfg.seed}")
    words = transcript_words(sentences)
    scrambled = [repeat_request(rng, sentences, words, scramble_prob=1.0)["answer"] for _ in range(len(sentences))]
    copy = evaluate_repeat(model, tokenizer, scrambled, instruction, cfg.eval.batch_size, cfg.eval.max_new_tokens)
    print(
        f"Repeat exact match ({instruction!r} + {repeat['num_sentences']} unseen test transcripts): "
        f"{repeat['exact_match']:.3f}; on as many random word sequences: {copy['exact_match']:.3f}"
    )
    return {
        "repeat_exact_match": repeat["exact_match"],
        "repeat_scrambled_exact_match": copy["exact_match"],
        "text_qa_accuracy": result["accuracy"],
        "text_qa_spoken_form_accuracy": spoken_result["accuracy"],
        "text_qa_per_family": result["per_family"],
        "text_qa_per_turn_depth": result["per_turn_depth"],
        "text_qa_turns": result["num_turns"],
    }


STAGE_SPECS = {
    "llm_text": StageSpec(
        build=build_stage_module,
        prepare=count_parameters,
        data=lambda run: TextQADataModule(
            run.cfg.data.text_qa, run.module.tokenizer, qa_seed=run.cfg.corpus.seed, seed=run.cfg.seed
        ),
        save=save_hf,
        evaluate=lambda run: evaluate(run.cfg),
    )
}
