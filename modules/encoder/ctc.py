"""Stage `input_1_ctc`: the speech encoder and a CTC head trained on ASR data.

The encoder learns to turn speech into frames that carry its words before it ever meets
the LLM. It applies the CMVN statistics of `data.asr.cmvn_path` itself (stored with its
weights), so the data module hands it raw fbank. Validation reports CTC greedy WER at the
training chunk size; `decode_split` decodes a split at any chunk size (Table 1).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from datamodules.asr import ASRDataConfig, ASRDataModule
from datamodules.features import GlobalCMVN
from datamodules.shards.reader import iter_metadata
from datamodules.transcripts import BPEUnits, CharVocab, LLMTokenUnits, wer
from modules.config import saved_config
from modules.encoder.network import SpeechEncoder
from modules.stage import (
    StageModule,
    StageRun,
    StageSpec,
    load_saved_weights,
    make_optimizer,
    read_stage_output,
    save_stage_output,
)
from modules.tb import log_posteriorgram

log = logging.getLogger(__name__)


CTCUnits = CharVocab | BPEUnits | LLMTokenUnits


def make_units(cfg: DictConfig) -> CTCUnits:
    """The CTC output units of `cfg.ctc`: characters, a BPE trained on the training transcripts,
    or the LLM tokenizer's tokens that those transcripts use."""
    if cfg.ctc.units == "char":
        return CharVocab(cfg.ctc.vocab)
    if cfg.ctc.units not in ("bpe", "llm"):
        raise ValueError(f"ctc.units must be 'bpe', 'char' or 'llm', not '{cfg.ctc.units}'")
    texts = [meta.get("text", "") for _, meta in iter_metadata(cfg.data.asr.train_shards)]
    if not texts:
        raise ValueError(f"no transcripts in {cfg.data.asr.train_shards} to build the CTC units from")
    if cfg.ctc.units == "llm":
        from modules.llm.stand_in import ensure_tokenizer  # the stand-in's module; loads no model

        return LLMTokenUnits.from_texts(ensure_tokenizer(cfg).backend_tokenizer, texts)
    return BPEUnits.train(texts, cfg.ctc.bpe_vocab_size, cfg.ctc.vocab)


class CTCHead(nn.Module):
    """Linear CTC output layer, plus (with `aux_units`) an auxiliary one on an inner encoder layer."""

    def __init__(self, dim: int, units: int, aux_units: int = 0):
        super().__init__()
        self.out = nn.Linear(dim, units)
        self.aux = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, aux_units)) if aux_units else None

    def forward(self, enc: torch.Tensor) -> torch.Tensor:
        return self.out(enc)


def ctc_loss(log_probs: torch.Tensor, lens: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    """Summed CTC loss per utterance, averaged over the batch (log_probs [B, T', V])."""
    flat = torch.tensor([u for t in targets for u in t], dtype=torch.long, device=log_probs.device)
    target_lens = torch.tensor([len(t) for t in targets], dtype=torch.long)
    loss = nn.functional.ctc_loss(
        log_probs.transpose(0, 1), flat, lens, target_lens, blank=0, reduction="sum", zero_infinity=True
    )
    return loss / len(targets)


class EncoderCTC(StageModule):
    """Speech encoder + linear CTC head over BPE pieces or characters (+ optional auxiliary character CTC)."""

    def __init__(self, cfg: DictConfig, units: CTCUnits):
        super().__init__(cfg)
        self.vocab = units
        self.encoder = SpeechEncoder(OmegaConf.to_object(cfg.encoder))
        self.aux_layer = int(cfg.ctc.aux_layer)
        if not 0 <= self.aux_layer <= cfg.encoder.num_layers:
            raise ValueError(f"ctc.aux_layer must be in 0..{cfg.encoder.num_layers} (encoder.num_layers)")
        self.aux_vocab = CharVocab(cfg.ctc.vocab) if self.aux_layer else None
        aux_units = len(self.aux_vocab) if self.aux_vocab else 0
        self.ctc_head = CTCHead(self.encoder.output_dim, len(self.vocab), aux_units)

    def components(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "ctc_head": self.ctc_head}

    def log_probs(self, feats, feats_lens, chunk_frames=None, left_chunks=None):
        """[B, T', V] CTC log-probabilities (fp32) and their lengths."""
        enc, enc_lens = self.encoder(feats, feats_lens, chunk_frames, left_chunks)
        return self.ctc_head(enc).float().log_softmax(-1), enc_lens

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(total loss, main log-probs, lengths, auxiliary loss or None)."""
        enc, lens, tapped = self.encoder.encode(batch["feats"], batch["feats_lens"], tap_layer=self.aux_layer)
        log_probs = self.ctc_head(enc).float().log_softmax(-1)
        loss = ctc_loss(log_probs, lens, [self.vocab.encode(t) for t in batch["texts"]])
        aux = None
        if tapped is not None:
            aux_lp = self.ctc_head.aux(tapped).float().log_softmax(-1)
            aux = ctc_loss(aux_lp, lens, [self.aux_vocab.encode(t) for t in batch["texts"]])
            w = float(self.cfg.ctc.aux_weight)
            loss = (1 - w) * loss + w * aux
        return loss, log_probs, lens, aux

    def training_step(self, batch, batch_idx):
        loss, _, _, aux = self._loss(batch)
        n = len(batch["texts"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if aux is not None:
            self.log("train/aux_char_loss", aux, batch_size=n)
        self.log("train/batch_size", float(n), batch_size=n)
        for reason, count in batch["skipped"].items():
            self.log(f"data/skipped_{reason}", float(count), reduce_fx="sum", batch_size=n)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, log_probs, lens, _ = self._loss(batch)
        hyps = greedy_decode(self.vocab, log_probs, lens)
        n = len(hyps)
        self.log("val/loss", loss, prog_bar=True, batch_size=n)
        self.log("val/wer", wer(hyps, batch["texts"]), prog_bar=True, batch_size=n)
        if batch_idx == 0 and hasattr(self.logger, "experiment") and not self.trainer.sanity_checking:
            text = "\n\n".join(f"REF: {r}  \nHYP: {h}" for r, h in zip(batch["texts"][:4], hyps[:4]))
            self.logger.experiment.add_text("samples/ctc_greedy", text, self.global_step)
            log_posteriorgram(
                self.logger.experiment,
                "samples/fbank_and_ctc",
                batch["feats"][0, : batch["feats_lens"][0]],
                log_probs[0, : lens[0]],
                self.vocab.units,
                self.global_step,
            )

    def configure_optimizers(self):
        return make_optimizer(self, self.cfg.optim, self.cfg.trainer.max_steps)


def greedy_decode(vocab: CTCUnits, log_probs: torch.Tensor, lens: torch.Tensor) -> list[str]:
    best = log_probs.argmax(-1).cpu()
    return [vocab.decode(best[i, : int(lens[i])].tolist()) for i in range(len(best))]


def encoder_data_config(cfg: DictConfig, which: str = "asr") -> ASRDataConfig:
    """The data config of a speech-input stage: raw fbank, because the encoder applies CMVN."""
    data = OmegaConf.to_object(cfg.data[which])
    return dataclasses.replace(data, cmvn_path=None)


# --- the stage --------------------------------------------------------------------------------
def build_stage_module(cfg: DictConfig) -> EncoderCTC:
    """A fresh encoder + CTC head with the CMVN stats of `data.asr.cmvn_path` (stored with its weights)."""
    module = EncoderCTC(cfg, make_units(cfg))
    if not cfg.data.asr.cmvn_path:
        raise ValueError("stage input_1_ctc needs data.asr.cmvn_path (CMVN stats from tools.compute_cmvn)")
    module.encoder.set_cmvn(GlobalCMVN.load(cfg.data.asr.cmvn_path))
    return module


def warn_out_of_vocabulary(run: StageRun) -> None:
    vocab = run.module.vocab
    oov = set().union(*(vocab.oov(m.get("text", "")) for _, m in iter_metadata(run.cfg.data.asr.dev_shards)))
    if oov:
        log.warning("transcript characters outside ctc.vocab are dropped from CTC targets: %s", sorted(oov))


def save_with_units(run: StageRun) -> None:
    """model.pt with the CTC units, which later stages (lexical adapter, decoding) need."""
    save_stage_output(run.cfg, run.module, extras={"ctc_units": units_json(run.module.vocab)})


Decoder = Callable[[dict, int], list[str]]  # (batch, chunk_frames) -> hypotheses


@torch.inference_mode()
def decode_split(
    cfg: DictConfig, split: str, decoders: dict[str, Decoder], chunks: list[int], limit: int = 0, desc: str = ""
) -> tuple[list[str], dict[str, list[str]]]:
    """Run every decoder at every chunk size (0 = full context) over an ASR split.

    Returns (references, {"<decoder>_<chunk>": hypotheses}); stops after `limit` utterances if set.
    """
    refs: list[str] = []
    hyps: dict[str, list[str]] = {f"{d}_{c}": [] for d in decoders for c in chunks}
    loader = ASRDataModule(encoder_data_config(cfg)).make_loader(split)
    for batch in tqdm(loader, desc=desc or f"decode {split}", unit="batch", leave=False):
        refs += batch["texts"]
        for name, decode in decoders.items():
            for c in chunks:
                hyps[f"{name}_{c}"] += decode(batch, c)
        if limit and len(refs) >= limit:
            break
    return refs, hyps


def ctc_decoder(module: EncoderCTC) -> Decoder:
    def decode(batch: dict, chunk_frames: int) -> list[str]:
        log_probs, lens = module.log_probs(batch["feats"], batch["feats_lens"], chunk_frames=chunk_frames)
        return greedy_decode(module.vocab, log_probs, lens)

    return decode


def evaluate_wer(
    cfg: DictConfig, module: nn.Module, name: str, decoder: Decoder, split: str, chunks: list[int], desc: str
) -> dict:
    """WER of `decoder` on `split` at each chunk size (0 = full context): {"<name>_wer_<split>_chunk<c>": w}.

    `module` is decoded in eval mode and left in the mode it came in.
    """
    was_training = module.training
    module.eval()
    refs, hyps = decode_split(cfg, split, {name: decoder}, chunks, desc=desc)
    module.train(was_training)
    out = {f"{name}_wer_{split}_chunk{c or 'full'}": wer(hyps[f"{name}_{c}"], refs) for c in chunks}
    log.info("%s", out)
    return out


def evaluate_ctc_split(cfg: DictConfig, module: EncoderCTC, split: str, chunks: list[int]) -> dict:
    """CTC greedy WER on `split` at each chunk size (0 = full context): {"ctc_wer_<split>_chunk<c>": w}."""
    return evaluate_wer(cfg, module, "ctc", ctc_decoder(module), split, chunks, desc=f"CTC {split}")


def load_encoder_ctc(cfg: DictConfig, stage: str = "input_1_ctc") -> EncoderCTC:
    """The trained stage-1 module of `cfg`'s experiment (and variant), in eval mode."""
    saved = read_stage_output(cfg, stage)
    module = EncoderCTC(cfg, units_from_json(saved.get("ctc_units")))
    load_saved_weights(cfg, module, stage, saved)
    return module.eval()


# --- the intelligibility judge ------------------------------------------------------------------
JUDGE = "judge"
JUDGE_LABEL = "stage judge: full-context CTC greedy"  # how reports name it


def judge_train_shards(cfg: DictConfig) -> str:
    """The judge's training audio: the ASR training voices plus the assistant voice's training split."""
    return f"{cfg.data.asr.train_shards}::{cfg.data.tts.train_shards}"


def build_judge(cfg: DictConfig) -> EncoderCTC:
    """A fresh judge: its BPE units and its data come from `judge_train_shards` (written into the
    run's config, which model.pt keeps)."""
    if "::" not in str(cfg.data.asr.train_shards):
        OmegaConf.update(cfg, "data.asr.train_shards", judge_train_shards(cfg))
    return build_stage_module(cfg)


def load_judge(cfg: DictConfig) -> EncoderCTC:
    """The trained judge of `cfg`'s experiment, in eval mode, built from the config it was trained
    with (its encoder need not match the chain's)."""
    saved = read_stage_output(cfg, f"{JUDGE}@")  # the one judge, whatever variant cfg names
    judge_cfg = saved_config(saved["run_config"])
    module = EncoderCTC(judge_cfg, units_from_json(saved.get("ctc_units")))
    load_saved_weights(judge_cfg, module, JUDGE, saved)
    return module.eval()


def trained_judge(cfg: DictConfig, without: str) -> EncoderCTC | None:
    """`load_judge`, or None (logged as "`without` without the judge: why") when no judge is trained."""
    try:
        return load_judge(cfg)
    except FileNotFoundError as e:
        log.info("%s without the judge: %s", without, e)
        return None


def reading_tts(cfg: DictConfig, split: str) -> DictConfig:
    """A copy of cfg whose ASR `split` is the TTS split of the same name: the assistant voice,
    read by the ASR loader."""
    out = cfg.copy()
    OmegaConf.update(out, f"data.asr.{split}_shards", cfg.data.tts[f"{split}_shards"])
    return out


def evaluate_judge_dev(run: StageRun) -> dict:
    """Full-context WER on the dev splits: user voices (ASR) and the assistant voice (TTS)."""
    cfg, module = run.cfg, run.module
    out = evaluate_ctc_split(cfg, module, "dev", [0])
    assistant = evaluate_ctc_split(reading_tts(cfg, "dev"), module, "dev", [0])
    out.update({k.replace("_dev_", "_assistant_dev_"): v for k, v in assistant.items()})
    return out


def units_json(units: CTCUnits) -> str:
    if isinstance(units, BPEUnits):
        return json.dumps({"bpe": units.to_json()})
    if isinstance(units, LLMTokenUnits):
        return json.dumps({"llm": units.to_json()})
    return json.dumps({"chars": "".join(units.units[1:])})


def units_from_json(text: str | None) -> CTCUnits:
    if text is None:
        raise ValueError("this input_1_ctc output has no CTC units (saved by an older version?)")
    spec = json.loads(text)
    if "llm" in spec:
        return LLMTokenUnits.from_json(spec["llm"])
    return BPEUnits.from_json(spec["bpe"]) if "bpe" in spec else CharVocab(spec["chars"])


@torch.inference_mode()
def transcribe(module: EncoderCTC, wavs: list, sample_rate: int, chunk_frames: int = 0, batch: int = 16) -> list[str]:
    """CTC greedy transcripts of waveforms (float arrays at `sample_rate`; resampled to 16 kHz):
    the intelligibility judge of generated speech."""
    from datamodules.audio import INPUT_SAMPLE_RATE, resample
    from datamodules.features import fbank
    from datamodules.shards.reader import pad_feats

    out: list[str] = []
    for i in range(0, len(wavs), batch):
        feats = [
            torch.from_numpy(fbank(resample(np.asarray(w, dtype=np.float32), sample_rate, INPUT_SAMPLE_RATE)))
            for w in wavs[i : i + batch]
        ]
        feats = [f if len(f) else torch.zeros(1, f.shape[1]) for f in feats]
        x, lens = pad_feats(feats)
        log_probs, out_lens = module.log_probs(x, lens, chunk_frames=chunk_frames)
        out += greedy_decode(module.vocab, log_probs, out_lens)
    return out


# init_from is empty by default; e.g. a dynamic-chunk encoder may start from the chunk-4 one.
STAGE_SPECS = {
    "input_1_ctc": StageSpec(
        build=build_stage_module,
        prepare=warn_out_of_vocabulary,
        data=lambda run: ASRDataModule(encoder_data_config(run.cfg)),
        save=save_with_units,
        evaluate=lambda run: evaluate_ctc_split(run.cfg, run.module, "dev", [run.cfg.encoder.chunk_frames]),
    ),
    JUDGE: StageSpec(
        build=build_judge,
        prepare=warn_out_of_vocabulary,
        data=lambda run: ASRDataModule(encoder_data_config(run.cfg)),
        save=save_with_units,
        evaluate=evaluate_judge_dev,
    ),
}
