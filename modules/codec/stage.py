"""Stage `output_1_codec`: the speech codec (encoder, 40 Hz codebook, voice tokens, generator).

The codec turns 24 kHz speech into one token per 25 ms (1024 codes) plus 8 global "voice"
tokens, and back. It trains as a GAN (manual optimisation): per batch, the MPD + MSD
discriminators take one least-squares step on real vs reconstructed crops (from
`codec.adversarial_start` on), then the encoder + generator take one step on

    mel_weight * L1(log-mel) + commitment_weight * VQ commitment
    [+ stft_weight * multi-resolution STFT loss]
    [+ adversarial_weight * LSGAN + feature_weight * feature matching]

The codebooks follow exponential moving averages (no optimiser). `trainer.max_steps` counts
generator steps. Validation reconstructs whole dev utterances and reports the log-mel distance,
SI-SNR and codebook use, and, once stage `judge` has run, the judge's WER on them against
training minutes (`judge_curve` in metrics.json); TensorBoard gets audio and spectrograms of one.

The discriminators exist only where training needs them: `load_codec` (inference: the dialogue
engine, Table 2, the codec tokens) builds the codec without them and leaves their saved weights out.

The blocks live in `modules.codec.network`; `tools.write_codec_tokens` writes the tokens of the
TTS shards for the speech decoder; `python infer.py eval_codec` is the report on the test split.
"""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F

from datamodules.tts import TTSDataModule
from modules.codec.discriminators import (
    Discriminators,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
)
from modules.codec.network import (
    CodecConfig,
    LogMel,
    MultiResolutionSTFTLoss,
    build_encoder,
    build_generator,
    hop_length,
)
from modules.config import run_dir
from modules.layers.quantizer import FactorizedQuantizer, GlobalQuantizer, VectorQuantizer, codebook_usage
from modules.stage import StageModule, StageRun, StageSpec, load_saved_weights, make_optimizer, read_stage_output
from modules.tb import log_audio, log_spectrograms

log = logging.getLogger(__name__)
STAGE = "output_1_codec"
# Parts only training uses (attribute names): an inference codec builds none and skips their saved weights.
TRAINING_ONLY = ("discriminators",)


def codec_config(cfg: DictConfig) -> CodecConfig:
    return OmegaConf.to_object(cfg.codec)


def si_snr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant signal-to-noise ratio (dB) of 1-D signals (or the last axis)."""
    estimate = estimate - estimate.mean(-1, keepdim=True)
    reference = reference - reference.mean(-1, keepdim=True)
    scale = (estimate * reference).sum(-1, keepdim=True) / (reference.pow(2).sum(-1, keepdim=True) + eps)
    target = scale * reference
    noise = estimate - target
    return 10 * torch.log10(target.pow(2).sum(-1) / (noise.pow(2).sum(-1) + eps) + eps)


class Codec(StageModule):
    """The codec component: `encode` (audio -> tokens), `decode` (tokens -> audio), GAN training.

    `with_discriminators=False` builds the inference codec: no discriminators (`TRAINING_ONLY`),
    so it cannot train. Its components are named for the chain (`codec_encoder`, not the
    speech encoder's `encoder`); the attributes keep the checkpoint keys (`encoder.*`).
    """

    def __init__(self, cfg: DictConfig, with_discriminators: bool = True):
        super().__init__(cfg)
        self.automatic_optimization = False
        c = self.codec_cfg = codec_config(cfg)
        self.hop = hop_length(c)
        self.encoder = build_encoder(c)
        self.quantizer = (
            FactorizedQuantizer(c.codebook_size, c.dim, c.code_dim, c.ema_decay, c.dead_code_threshold)
            if c.code_dim
            else VectorQuantizer(c.codebook_size, c.dim, c.ema_decay, c.dead_code_threshold)
        )
        self.global_quantizer = GlobalQuantizer(
            c.global_dim, c.global_groups, c.global_codebook_size, c.ema_decay, c.dead_code_threshold
        )
        self.generator = build_generator(c)
        self.discriminators = (
            Discriminators(tuple(c.disc_periods), c.disc_scales, c.disc_scale_width, tuple(c.disc_period_widths))
            if with_discriminators
            else None
        )
        self.mel = LogMel(c.sample_rate)
        self.stft_loss = MultiResolutionSTFTLoss(c.stft_resolutions) if c.stft_weight > 0 else None

    def components(self) -> dict[str, nn.Module]:
        comps = {
            "codec_encoder": self.encoder,
            "quantizer": self.quantizer,
            "global_quantizer": self.global_quantizer,
            "generator": self.generator,
        }
        if self.discriminators is not None:
            comps["discriminators"] = self.discriminators
        return comps

    # --- the codec ------------------------------------------------------------------------------
    def _pad(self, wav: torch.Tensor) -> torch.Tensor:
        """[B, 1, S] zero-padded to a whole number of tokens."""
        extra = (-wav.shape[-1]) % self.hop
        return F.pad(wav, (0, extra)) if extra else wav

    def reconstruct(self, wav: torch.Tensor) -> dict[str, torch.Tensor]:
        """wav [B, 1, S] -> {"wav" [B, 1, S'] (S' = S rounded up to tokens), "codes" [B, T],
        "global_tokens" [B, G], "commitment"}; codes and global tokens are None while training
        inside the `codec.quantize_after` warm-up."""
        local, voice = self.encoder(self._pad(wav))
        b, d, t = local.shape
        if self.training and self.global_step < self.codec_cfg.quantize_after:  # continuous warm-up: no codes
            y = self.generator(local, voice)
            return {"wav": y, "codes": None, "global_tokens": None, "commitment": local.new_zeros(())}
        q, codes, commit = self.quantizer(local.transpose(1, 2).reshape(-1, d))
        gq, gtokens, gcommit = self.global_quantizer(voice)
        y = self.generator(q.view(b, t, d).transpose(1, 2), gq)
        return {"wav": y, "codes": codes.view(b, t), "global_tokens": gtokens, "commitment": commit + gcommit}

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wav [B, 1, S] at the codec rate -> (codes [B, ceil(S / hop)], global tokens [B, G])."""
        local, voice = self.encoder(self._pad(wav))
        b, d, t = local.shape
        codes = self.quantizer.codes(local.transpose(1, 2).reshape(-1, d)).view(b, t)
        return codes, self.global_quantizer.codes(voice)

    @torch.no_grad()
    def voice_vector_tokens(self, voices: torch.Tensor) -> torch.Tensor:
        """Global tokens [G] of the mean of several utterances' voice features [N, global_dim]."""
        return self.global_quantizer.codes(voices.mean(0, keepdim=True))[0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, global_tokens: torch.Tensor) -> torch.Tensor:
        """codes [B, T] (0..K-1) and global tokens [B, G] (or [G]) -> wav [B, 1, hop * T] in [-1, 1]."""
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codec_cfg.codebook_size):
            raise ValueError(
                f"codec tokens must lie in 0..{self.codec_cfg.codebook_size - 1}; got {int(codes.min())}..{int(codes.max())}"
            )
        if global_tokens.dim() == 1:
            global_tokens = global_tokens[None].expand(len(codes), -1)
        x = self.quantizer.embed(codes).transpose(1, 2)
        return self.generator(x, self.global_quantizer.embed(global_tokens))

    # --- training -------------------------------------------------------------------------------
    def _generator_params(self) -> list[nn.Parameter]:
        return [p for m in (self.encoder, self.quantizer, self.generator) for p in m.parameters() if p.requires_grad]

    def adversarial(self) -> bool:
        return self.global_step >= self.codec_cfg.adversarial_start and self.discriminators.training

    def discriminator_objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Least-squares loss of the discriminators on real x vs generated y (detached); also
        returns their outputs on x, reused (detached) for the generator's feature matching."""
        real = self.discriminators(x)
        return discriminator_loss(real, self.discriminators(y.detach())), real

    def disc_window(self, length: int) -> slice:
        """The samples the discriminators judge in this step: a random `codec.disc_segment`
        window of the crop (the same for real and generated audio), or all of it."""
        w = self.codec_cfg.disc_segment
        if not w or w >= length:
            return slice(None)
        start = int(torch.randint(length - w + 1, ()))
        return slice(start, start + w)

    def generator_objective(
        self, x: torch.Tensor, out: dict[str, torch.Tensor], real: list | None = None, window: slice = slice(None)
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The encoder + generator objective (module docstring); adversarial terms when `real` (the
        discriminators' outputs on `x[..., window]`) is given."""
        c = self.codec_cfg
        y = out["wav"]
        loss_mel = F.l1_loss(self.mel(y), self.mel(x))
        loss = c.mel_weight * loss_mel + c.commitment_weight * out["commitment"]
        logs = {"train/mel": loss_mel.detach(), "train/commitment": out["commitment"].detach()}
        if self.stft_loss is not None:
            loss_stft = self.stft_loss(y, x)
            loss = loss + c.stft_weight * loss_stft
            logs["train/stft"] = loss_stft.detach()
        if real is not None:
            fake = self.discriminators(y[..., window])
            real_feats = [(s.detach(), [f.detach() for f in feats]) for s, feats in real]
            loss_adv = generator_adversarial_loss(fake)
            loss_fm = feature_matching_loss(real_feats, fake)
            loss = loss + c.adversarial_weight * loss_adv + c.feature_weight * loss_fm
            logs.update({"train/adversarial": loss_adv.detach(), "train/feature_matching": loss_fm.detach()})
        return loss, logs

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        clip = self.cfg.trainer.gradient_clip_val or None
        x = self._pad(batch["wav"])
        out = self.reconstruct(x)
        real, logs, window = None, {}, slice(None)
        if self.adversarial():
            window = self.disc_window(x.shape[-1])
            loss_d, real = self.discriminator_objective(x[..., window], out["wav"][..., window])
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            self.clip_gradients(opt_d, gradient_clip_val=clip)
            # The raw optimizer: stepping the Lightning wrapper would count a second global step.
            opt_d.optimizer.step()
            sched_d.step()
            logs["train/disc"] = loss_d.detach()
        loss, more = self.generator_objective(x, out, real, window)
        opt_g.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt_g, gradient_clip_val=clip)
        opt_g.step()
        sched_g.step()
        self.log_dict({**logs, **more, "train/loss": loss.detach()})
        if out["codes"] is not None:  # none during the `quantize_after` warm-up
            self.log("train/code_perplexity", codebook_usage(out["codes"], self.codec_cfg.codebook_size)["perplexity"])
        self.log("mel", more["train/mel"], prog_bar=True, logger=False)
        return loss

    # --- the judge's WER against training time ------------------------------------------------
    def on_fit_start(self) -> None:
        """Validation transcribes its reconstructions with the intelligibility judge (stage
        `judge`) when that has run: `val/judge_wer` and one point of `judge_curve` per validation,
        against the minutes spent training (validation time left out). A `codec.quantize_after`
        that leaves no quantized steps is refused first."""
        from modules.encoder.ctc import trained_judge

        steps, warm = self.trainer.max_steps, self.codec_cfg.quantize_after
        if 0 < steps <= warm:
            raise ValueError(
                f"codec.quantize_after={warm} is not below trainer.max_steps={steps}: the codebook would never "
                "be trained (lower codec.quantize_after, or 0 to quantize from the first step)"
            )

        judge = trained_judge(self.cfg, "codec validation")
        self.__dict__["_judge"] = judge  # not a submodule: never trained, moved or saved with the codec
        self.judge_curve: list[dict] = []
        self._fit_clock, self._val_seconds = time.monotonic(), 0.0

    def _judge_validation(self, train_minutes: float) -> None:
        from datamodules.transcripts import wer
        from modules.encoder.ctc import transcribe

        rate, heard = self.codec_cfg.sample_rate, self._val_heard
        point = {"step": self.global_step, "train_minutes": train_minutes}
        point["judge_wer"] = wer(transcribe(self._judge, heard["reconstructions"], rate), heard["texts"])
        if not self.judge_curve:  # the floor on the same utterances, once
            self._judge_floor = wer(transcribe(self._judge, heard["originals"], rate), heard["texts"])
        point["judge_wer_original"] = self._judge_floor
        self.log("val/judge_wer", point["judge_wer"])
        self.log("val/judge_wer_original", self._judge_floor)
        self.judge_curve.append(point)

    def on_validation_epoch_start(self) -> None:
        self._val_codes: list[torch.Tensor] = []
        self._val_heard: dict[str, list] = {"originals": [], "reconstructions": [], "texts": []}
        self._val_clock = time.monotonic()

    def validation_step(self, batch, batch_idx):
        m = measure_batch(self, batch)
        self._val_codes.append(m.pop("codes"))
        if getattr(self, "_judge", None) is not None and not self.trainer.sanity_checking:
            for i, n in enumerate(batch["lens"].tolist()):
                self._val_heard["originals"].append(batch["wav"][i, 0, :n].numpy())
                self._val_heard["reconstructions"].append(m["wav"][i, 0, :n].float().numpy())
            self._val_heard["texts"].extend(batch["texts"])
        n = len(batch["lens"])
        self.log("val/mel_distance", m["mel_distance"], batch_size=n)
        self.log("val/si_snr", m["si_snr"], batch_size=n)
        self.log("val/loss", m["mel_distance"], batch_size=n, prog_bar=True)
        if batch_idx == 0 and self.trainer.is_global_zero and self.logger is not None:
            n0 = int(batch["lens"][0])
            writer, rate, step = self.logger.experiment, self.codec_cfg.sample_rate, self.global_step
            log_audio(writer, "audio/original", batch["wav"][0, 0, :n0], rate, step)
            log_audio(writer, "audio/reconstructed", m["wav"][0, 0, :n0], rate, step)
            log_spectrograms(writer, "spectrogram/original_vs_reconstructed", {
                "original": self.mel(batch["wav"][0, 0, :n0])[0], "reconstructed": self.mel(m["wav"][0, 0, :n0])[0],
            }, step)  # fmt: skip

    def on_validation_epoch_end(self) -> None:
        if self._val_codes:
            usage = codebook_usage(torch.cat(self._val_codes), self.codec_cfg.codebook_size)
            self.log("val/code_perplexity", usage["perplexity"])
            self.log("val/codes_used", usage["used"])
        if self._val_heard["texts"]:  # heard only after on_fit_start found a judge
            self._judge_validation((self._val_clock - self._fit_clock - self._val_seconds) / 60)
        if hasattr(self, "_fit_clock"):
            self._val_seconds += time.monotonic() - self._val_clock

    def configure_optimizers(self):
        if self.discriminators is None:
            raise RuntimeError("this codec was built for inference (with_discriminators=False) and cannot train")
        steps = self.cfg.trainer.max_steps
        g = make_optimizer(nn.ModuleList([self.encoder, self.generator]), self.cfg.optim, steps)
        d = make_optimizer(self.discriminators, self.cfg.optim, steps)
        return [g["optimizer"], d["optimizer"]], [g["lr_scheduler"]["scheduler"], d["lr_scheduler"]["scheduler"]]


@torch.no_grad()
def measure_batch(codec: Codec, batch: dict) -> dict:
    """Reconstruct a padded batch of whole utterances: mean log-mel L1 and SI-SNR over the valid
    parts, the codes of the valid frames, and the reconstructions."""
    was_training = codec.training
    codec.eval()
    out = codec.reconstruct(batch["wav"])
    codec.train(was_training)
    mels, snrs, codes = [], [], []
    for i, n in enumerate(batch["lens"].tolist()):
        x, y = batch["wav"][i, 0, :n], out["wav"][i, 0, :n]
        mels.append(F.l1_loss(codec.mel(y), codec.mel(x)))
        snrs.append(si_snr(y, x))
        codes.append(out["codes"][i, : math.ceil(n / codec.hop)])
    return {
        "mel_distance": torch.stack(mels).mean(),
        "si_snr": torch.stack(snrs).mean(),
        "codes": torch.cat(codes),
        "wav": out["wav"],
    }


def tts_data_config(cfg: DictConfig):
    return OmegaConf.to_object(cfg.data.tts)


def check_rates(cfg: DictConfig) -> None:
    c = codec_config(cfg)
    if cfg.data.tts.sample_rate != c.sample_rate:
        raise ValueError(
            f"data.tts.sample_rate {cfg.data.tts.sample_rate} differs from codec.sample_rate {c.sample_rate}: "
            "the codec trains on audio at its own rate (the loader resamples to data.tts.sample_rate)"
        )


def build_stage_module(cfg: DictConfig) -> Codec:
    check_rates(cfg)
    return Codec(cfg)


def evaluate_dev(run: StageRun) -> dict:
    """The dev measures over the first eval.limit utterances (0: all), as the test report reads them."""
    dev = evaluate_codec(run.cfg, run.module, "dev", run.cfg.eval.limit)
    curve = {"judge_curve": run.module.judge_curve} if getattr(run.module, "judge_curve", None) else {}
    return {**{f"dev_{k}": v for k, v in dev.items() if k != "examples"}, **curve}


def codec_signature(codec: DictConfig | CodecConfig) -> dict[str, float]:
    """What a consumer of a codec's tokens or audio depends on: sample rate, tokens a second, codes."""
    return {
        "sample_rate": int(codec.sample_rate),
        "tokens_per_second": codec.sample_rate / hop_length(codec),
        "codebook_size": int(codec.codebook_size),
    }


def check_codec_fits(cfg: DictConfig, saved: dict, stage: str = f"{STAGE}@") -> None:
    """Raise a ValueError naming both sides when the codec saved by `stage` (its model.pt,
    `saved`) differs from `cfg.codec` in sample rate, token rate or codebook size (the decoder
    checks its own vocabulary against `cfg.codec`)."""
    from modules.config import saved_config

    have = codec_signature(saved_config(saved["run_config"]).codec)
    want = codec_signature(cfg.codec)
    if have != want:
        diff = [k for k in want if have[k] != want[k]]
        raise ValueError(
            f"the codec of {run_dir(cfg, stage)} has "
            + ", ".join(f"{k} {have[k]:g}" for k in diff)
            + f"; stage {cfg.stage.name} expects "
            + ", ".join(f"{k} {want[k]:g}" for k in diff)
            + " (codec.*): retrain the codec or set these to match"
        )


def load_codec(cfg: DictConfig, stage: str | None = None) -> Codec:
    """The trained codec of `cfg`'s experiment for inference, in eval mode and without
    discriminators: the main chain's, whatever variant a later stage runs (the decoder variants
    share one codec), unless `stage` names one. Saved discriminator weights are left out; any
    other saved tensor must fit."""
    if stage is None:
        stage = STAGE if cfg.stage.name == STAGE else f"{STAGE}@"
    saved = read_stage_output(cfg, stage)
    check_codec_fits(cfg, saved, stage)
    module = Codec(cfg, with_discriminators=False)
    load_saved_weights(cfg, module, stage, saved, leave_out=TRAINING_ONLY)
    return module.eval()


@torch.no_grad()
def evaluate_codec(cfg: DictConfig, codec: Codec, split: str, limit: int = 0, audio: dict | None = None) -> dict:
    """Reconstruction measures over a TTS split: log-mel distance, SI-SNR, code perplexity / share used.

    `audio` (a dict) receives the "originals", "reconstructions" and "texts" when given."""
    loader = TTSDataModule(tts_data_config(cfg), "audio").make_loader(split)
    mels, snrs, codes, weights, n = [], [], [], [], 0
    for batch in loader:
        m = measure_batch(codec, batch)
        k = len(batch["lens"])
        if audio is not None:
            for i, length in enumerate(batch["lens"].tolist()):
                audio.setdefault("originals", []).append(batch["wav"][i, 0, :length].numpy())
                audio.setdefault("reconstructions", []).append(m["wav"][i, 0, :length].numpy())
            audio.setdefault("texts", []).extend(batch["texts"])
        mels.append(float(m["mel_distance"]) * k)
        snrs.append(float(m["si_snr"]) * k)
        codes.append(m["codes"])
        weights.append(k)
        n += k
        if limit and n >= limit:
            break
    usage = codebook_usage(torch.cat(codes), codec.codec_cfg.codebook_size)
    return {
        "utterances": n,
        "mel_distance": sum(mels) / n,
        "si_snr_db": sum(snrs) / n,
        "code_perplexity": usage["perplexity"],
        "codes_used": usage["used"],
        "bits_per_second": np.log2(codec.codec_cfg.codebook_size) * codec.codec_cfg.sample_rate / codec.hop,
    }


def voice_tokens(cfg: DictConfig) -> torch.Tensor:
    path = run_dir(cfg, STAGE) / VOICE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run `python -m tools.write_codec_tokens experiment={cfg.experiment}`"
        )
    return torch.tensor(json.loads(path.read_text())["global_tokens"])


VOICE_FILE = "assistant_voice.json"


STAGE_SPECS = {
    STAGE: StageSpec(
        build=build_stage_module,
        data=lambda run: TTSDataModule(tts_data_config(run.cfg), "audio"),
        evaluate=evaluate_dev,
    )
}
