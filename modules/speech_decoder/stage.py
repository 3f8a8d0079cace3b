"""Stages output_2_decoder and output_3_prefix: the speech decoder trained against the frozen LLM.

* `output_2_decoder` trains the token embedding, the pre-network and the shared NAR/AR stack on
  text–speech pairs (the TTS shards with codec tokens, `tools.write_codec_tokens`): the answer
  text enters as the frozen LLM's input embeddings of its tokens; cross-entropy on codec tokens.
* `output_3_prefix` trains only the prefix decoder, on the spoken-QA training dialogues: the
  frozen LLM reads each dialogue with its own earlier replies and its reply to the question
  (the replies cached by `tools.make_llm_answers`, so these are the hidden states it had while
  generating them); the reply's codec tokens come from the TTS shards when the reply is the
  corpus's reference answer (95% of turns for the tiny stand-in), else from the reply spoken in
  the assistant voice (eSpeak) and encoded with the trained codec.

`stage.variant=nopre speech_decoder.pre_net_layers=0` gives the chain without a pre-network
(the paper's Table 2 ablation).
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from datamodules.answer_speech import AnswerSpeechDataModule
from datamodules.shards.reader import iter_metadata, iter_raw
from datamodules.text_qa import chat_messages
from datamodules.tts import CODES_MEMBER, TTSDataModule
from modules.llm.hf import load_llm
from modules.speech_decoder.alignment import ESpeakAligner, TokenPhonemes, decoder_tokens
from modules.speech_decoder.network import SpeechDecoderConfig, SpeechDecoding
from modules.stage import (
    StageModule,
    StageRun,
    StageSpec,
    load_saved_weights,
    make_optimizer,
    read_stage_output,
    validation_metrics,
)

log = logging.getLogger(__name__)
DECODER = "output_2_decoder"
PREFIX = "output_3_prefix"


def decoder_config(cfg: DictConfig) -> SpeechDecoderConfig:
    return OmegaConf.to_object(cfg.speech_decoder)


class SpeechDecoder(SpeechDecoding, StageModule):
    """The speech-decoder component: its four parts plus the frozen LLM that feeds them."""

    def __init__(self, cfg: DictConfig, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        StageModule.__init__(self, cfg)
        dcfg = decoder_config(cfg)
        if dcfg.codebook_size != cfg.codec.codebook_size:
            raise ValueError(
                f"speech_decoder.codebook_size {dcfg.codebook_size} differs from codec.codebook_size "
                f"{cfg.codec.codebook_size}: the decoder's vocabulary is the codec's codes"
            )
        self.build_parts(dcfg, llm.config.hidden_size)
        self.llm, self.tokenizer = llm, tokenizer
        self.aligner = ESpeakAligner(tokenizer, dcfg.leading_space) if dcfg.duration_positions else None
        self.sounds = TokenPhonemes(tokenizer, dcfg.aligned_phonemes) if dcfg.aligned_phonemes else None

    def components(self) -> dict[str, nn.Module]:
        comps = {"embedding": self.embedding, "pre_net": self.pre_net, "decoder": self.decoder, "llm": self.llm}
        if self.prefix is not None:
            comps["prefix"] = self.prefix
        return comps

    # --- LLM-side inputs ------------------------------------------------------------------------
    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), n), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        valid = torch.zeros(len(rows), n, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            valid[i, : len(r)] = True
        return ids.to(self.device), valid.to(self.device)

    def text_ids(self, texts: list[str]) -> list[list[int]]:
        """The tokens the decoder speaks each text as (`speech_decoder.leading_space`)."""
        return [decoder_tokens(self.tokenizer, t, self.dcfg.leading_space)[0] for t in texts]

    def reply_ids(self, replies: list[str]) -> list[list[int]]:
        """The LLM's own tokens of each reply (what follows its chat prompt)."""
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in replies]

    @torch.no_grad()
    def text_inputs(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The LLM's input embeddings of each text's tokens [B, m, W] and their validity."""
        ids, valid = self._pad(self.text_ids(texts))
        return self.llm.get_input_embeddings()(ids).float(), valid

    def phoneme_inputs(self, texts: list[str]) -> torch.Tensor | None:
        """Each text token's phonemes [B, m, P] under `aligned_phonemes` (None without)."""
        if self.sounds is None:
            return None
        rows = self.text_ids(texts)
        width = max(1, max(len(r) for r in rows))
        return torch.from_numpy(self.sounds(rows, width)).to(self.device)

    @torch.no_grad()
    def reply_hidden_states(self, messages: list[list[dict]], replies: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen LLM's last hidden states (after the final norm) at the positions that
        predict each reply token, given the chat so far: [B, n, W] and their validity."""
        prompts = [
            self.tokenizer(self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
            for m in messages
        ]  # fmt: skip
        reply_ids = self.reply_ids(replies)
        ids, valid = self._pad([p + r for p, r in zip(prompts, reply_ids)])
        hidden = self.llm.get_decoder()(input_ids=ids, attention_mask=valid.long()).last_hidden_state.float()
        n = max(1, max(len(r) for r in reply_ids))
        out = hidden.new_zeros(len(prompts), n, hidden.shape[-1])
        out_valid = torch.zeros(len(prompts), n, dtype=torch.bool, device=hidden.device)
        for i, (p, r) in enumerate(zip(prompts, reply_ids)):
            out[i, : len(r)] = hidden[i, len(p) - 1 : len(p) - 1 + len(r)]
            out_valid[i, : len(r)] = True
        return out, out_valid

    def conditioning(self, batch: dict) -> dict[str, torch.Tensor | None]:
        """The decoder's inputs for a batch of texts (and chats); with `duration_positions` and
        the codec tokens' counts (training), the text tokens' durations from eSpeak's timings."""
        text, text_valid = self.text_inputs(batch["texts"])
        hidden = hidden_valid = durations = None
        if "messages" in batch and self.prefix is not None:
            hidden, hidden_valid = self.reply_hidden_states(batch["messages"], batch["texts"])
        if self.aligner is not None and "codes_lens" in batch:
            lens = [int(n) for n in batch["codes_lens"]]
            durations = torch.from_numpy(self.aligner.durations(batch["texts"], lens, text.shape[1])).to(self.device)
        return {"text": text, "text_valid": text_valid, "hidden": hidden, "hidden_valid": hidden_valid,
                "durations": durations, "phonemes": self.phoneme_inputs(batch["texts"])}  # fmt: skip

    # --- training -------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.teacher_forced(*args, **kwargs)

    def _step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        cond = self.conditioning(batch)
        logits, targets, log_dur = self.teacher_forced(
            cond["text"], cond["text_valid"], batch["codes"].to(self.device), batch["codes_lens"].to(self.device),
            cond["hidden"], cond["hidden_valid"], cond["durations"], cond["phonemes"],
        )  # fmt: skip
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        keep = targets != -100
        accuracy = (logits.argmax(-1)[keep] == targets[keep]).float().mean()
        if log_dur is not None:
            valid = cond["text_valid"]
            err = (log_dur - torch.log1p(cond["durations"])).square()[valid].mean()
            self.log(f"{'train' if self.training else 'val'}/duration_mse", err, batch_size=len(batch["texts"]))
            loss = loss + self.dcfg.duration_weight * err
        return loss, accuracy

    def training_step(self, batch, batch_idx):
        loss, acc = self._step(batch)
        n = len(batch["texts"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/token_accuracy", acc, batch_size=n)
        if self.aligner is not None:
            self.log("train/aligner_fallbacks", float(self.aligner.fallbacks), batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, acc = self._step(batch)
        n = len(batch["texts"])
        self.log("val/loss", loss, prog_bar=True, batch_size=n)
        self.log("val/token_accuracy", acc, batch_size=n)

    def configure_optimizers(self):
        return make_optimizer(self, self.cfg.optim, self.cfg.trainer.max_steps)


def build(cfg: DictConfig, llm: tuple | None = None) -> SpeechDecoder:
    """The decoder around `cfg`'s frozen LLM; `llm` = (model, tokenizer) shares one already loaded."""
    model, tokenizer = llm if llm is not None else load_llm(cfg.llm)
    return SpeechDecoder(cfg, model, tokenizer)


def load_speech_decoder(cfg: DictConfig, with_prefix: bool = True, llm: tuple | None = None) -> SpeechDecoder:
    """The trained decoder of `cfg`'s experiment (and variant), in eval mode: output_2_decoder's
    weights, plus output_3_prefix's when `with_prefix`; `llm` as in `build` (the streaming engine
    passes the speech LLM's, so the frozen LLM is loaded once)."""
    module = build(cfg, llm)
    for stage in (DECODER, PREFIX) if with_prefix else (DECODER,):
        load_saved_weights(cfg, module, stage, read_stage_output(cfg, stage))
    return module.eval()


# --- output_3_prefix data -----------------------------------------------------------------------
def tts_codes_by_id(shards: str) -> dict[str, tuple[str, np.ndarray]]:
    """{sample id: (text, codes)} of TTS shards with codec tokens (audio members are not decoded)."""
    out = {}
    for raw in iter_raw(shards):
        if CODES_MEMBER in raw:
            meta = json.loads(raw["json"])
            out[str(meta.get("id", raw["__key__"]))] = (meta["text"], np.load(io.BytesIO(raw[CODES_MEMBER])))
    return out


def answer_examples(cfg: DictConfig, split: str, codec=None) -> tuple[list[dict], dict]:
    """Examples of `datamodules.answer_speech` for the QA dialogues of `split` (train / dev)."""
    from modules.speech_llm.model import read_llm_answers

    replies = read_llm_answers(cfg, split)
    known = tts_codes_by_id(cfg.data.tts_codes[f"{split}_shards"])
    examples, to_speak, empty, unspeakable = [], [], 0, 0
    limit = cfg.data.tts_codes.limit or float("inf")
    for key, meta in iter_metadata(cfg.data.spoken_qa[f"{split}_shards"]):
        if len(examples) + len(to_speak) >= limit:
            break
        did = str(meta.get("id", key))
        history: list[tuple[str, str]] = []
        for k, (turn, reply) in enumerate(zip(meta["turns"], replies.get(key, []))):
            history.append((turn["question"], reply))
            if not reply.strip():  # nothing to speak (the LLM ended its turn at once)
                empty += 1
                continue
            if len(examples) + len(to_speak) >= limit:
                break
            ex = {"id": f"{did}-t{k}", "messages": chat_messages(history[:-1], turn["question"]), "text": reply}
            ref = known.get(f"tts-{did}-t{k}")
            if ref is not None and ref[0] == reply:
                ex["codes"] = ref[1].astype(np.int64)
                examples.append(ex)
            else:
                to_speak.append(ex)
    if to_speak:
        from datamodules.corpus.espeak import ESpeak, assistant_speech
        from modules.codec.stage import load_codec

        codec = codec or load_codec(cfg)
        tts, rate = ESpeak(), codec.codec_cfg.sample_rate
        for ex in tqdm(to_speak, desc=f"speaking {split} replies", unit="reply"):
            try:
                wav = torch.from_numpy(assistant_speech(ex["text"], rate, tts))[None, None]
            except RuntimeError as exn:  # e.g. punctuation only: eSpeak gives no audio
                log.warning("cannot speak reply %s (%r): %s", ex["id"], ex["text"], exn)
                unspeakable += 1
                continue
            ex["codes"] = codec.encode(wav)[0][0].numpy().astype(np.int64)
            examples.append(ex)
    stats = {
        "examples": len(examples), "from_tts_shards": len(examples) - len(to_speak) + unspeakable,
        "spoken": len(to_speak) - unspeakable, "skipped_empty": empty, "skipped_unspeakable": unspeakable,
    }  # fmt: skip
    log.info("%s spoken answers: %s", split, stats)
    return examples, stats


# --- the stages --------------------------------------------------------------------------------
def check_trained_codec(run: StageRun) -> None:
    """Both decoder stages: the trained codec (whose tokens they learn) has this config's sample
    rate, token rate and codebook size (`modules.codec.stage.check_codec_fits`)."""
    from modules.codec.stage import STAGE as CODEC
    from modules.codec.stage import check_codec_fits

    check_codec_fits(run.cfg, read_stage_output(run.cfg, f"{CODEC}@"))


def speak_answers(run: StageRun) -> None:
    """output_3_prefix: the spoken LLM replies of the train and dev dialogues (`answer_examples`)."""
    cfg = run.cfg
    check_trained_codec(run)
    if not any(k.startswith("decoder.") for k in run.loaded):
        raise ValueError(f"stage {PREFIX} trains the prefix of a trained decoder: set stage.init_from: [{DECODER}]")
    from modules.llm.answers import ensure_llm_answers

    ensure_llm_answers(cfg)  # the LLM's replies to the training questions, cached once
    examples, stats = {}, {}
    for split in ("train", "dev"):
        examples[split], stats[split] = answer_examples(cfg, split)
    run.prepared["examples"] = examples
    run.metrics["answers"] = stats


STAGE_SPECS = {
    DECODER: StageSpec(
        build=build,
        prepare=check_trained_codec,
        data=lambda run: TTSDataModule(OmegaConf.to_object(run.cfg.data.tts_codes), "codes"),
        evaluate=validation_metrics,
    ),
    PREFIX: StageSpec(
        build=build,
        prepare=speak_answers,
        data=lambda run: AnswerSpeechDataModule(
            run.prepared["examples"], run.cfg.data.tts_codes.max_tokens_per_batch, run.cfg.seed
        ),
        evaluate=validation_metrics,
    ),
}
