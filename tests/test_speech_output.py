"""Speech-output stages on the miniature corpus: the codec (output_1_codec) and its token tool.

As for the speech-input stages: after a training step every trainable parameter received a
gradient (the discriminators from their own objective, encoder and generator from theirs) and
the codebooks moved by EMA; the stage output holds exactly the declared components plus the
resolved config; a codec of another size is refused with both sizes named.
"""

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf

import train
from datamodules.shard_writer import rewrite_shards
from datamodules.shards import resolve_shards
from datamodules.tts import PAD_CODE, TTSDataModule
from modules.codec import Codec, codec_config, load_codec, si_snr, tts_data_config
from modules.codec_layers import hop_length
from modules.config import load_config, run_dir
from modules.training import read_checkpoint
from tools.write_codec_tokens import write_codec_tokens

CODEC_COMPONENTS = {"encoder", "quantizer", "global_quantizer", "generator", "discriminators"}


@pytest.fixture
def codec_args(speech_args) -> list[str]:
    """The codec at toy width: 32 channels at the token rate, 2 voice tokens, 1-scale MSD."""
    return [
        *speech_args,
        "codec.dim=32",
        "codec.encoder_channels=4",
        "codec.encoder_resblock_kernels=[3]",
        "codec.resblock_kernels=[3]",
        "codec.global_dim=8",
        "codec.global_groups=2",
        "codec.global_codebook_size=16",
        "codec.codebook_size=64",
        "codec.disc_period_widths=[2,4,4,4]",
        "codec.disc_periods=[2,3]",
        "codec.disc_scales=1",
        "codec.disc_scale_width=4",
        "data.tts.segment_s=0.1",
        "data.tts.max_batch_size=3",
        "data.tts.max_seconds_per_batch=8",
    ]


def test_si_snr_is_scale_invariant_and_falls_with_noise():
    torch.manual_seed(0)
    x = torch.randn(4000)
    assert float(si_snr(3 * x, x)) > 60  # a scaled copy is perfect
    assert abs(float(si_snr(x + torch.randn(4000), x))) < 1.0  # equal noise power: about 0 dB


def test_codec_stage_gradients_and_ema(codec_args):
    cfg = load_config(["stage=output_1_codec", *codec_args])
    assert set(cfg.stage.trainable) == CODEC_COMPONENTS
    codec = Codec(cfg)
    codec.apply_freezing(list(cfg.stage.trainable))
    batch = next(iter(TTSDataModule(tts_data_config(cfg), "audio").make_loader("train")))
    assert batch["wav"].shape == (3, 1, 2400) and (batch["lens"] <= 2400).all()
    codec.train()
    x = codec._pad(batch["wav"])
    out = codec.reconstruct(x)  # training mode: the codebooks initialise from this batch
    assert bool(codec.quantizer.initialized) and out["codes"].shape == (3, 2400 // hop_length(codec_config(cfg)))
    loss_d, real = codec.discriminator_objective(x, out["wav"])
    loss_d.backward()
    for name, p in codec.discriminators.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"discriminators.{name} got no gradient"
    codec.zero_grad()
    loss, logs = codec.generator_objective(x, out, real)
    loss.backward()
    assert {"train/mel", "train/adversarial", "train/feature_matching"} <= set(logs)
    for name, p in codec.named_parameters():
        if name.split(".")[0] in ("encoder", "generator"):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    book = codec.quantizer.codebook.clone()
    codec.reconstruct(x)
    assert not torch.equal(book, codec.quantizer.codebook)  # EMA update in training mode
    book = codec.quantizer.codebook.clone()
    codec.eval().reconstruct(x)
    assert torch.equal(book, codec.quantizer.codebook)  # eval mode leaves it alone


def test_codec_stage_trains_writes_tokens_and_refuses_another_size(codec_args, tmp_path):
    metrics = train.main(["stage=output_1_codec", *codec_args])
    assert metrics["train_steps"] == 2  # generator steps: the discriminator's raw steps are not counted
    for key in ("dev_mel_distance", "dev_si_snr_db", "dev_code_perplexity", "dev_codes_used"):
        assert np.isfinite(metrics[key]), key
    cfg = load_config(["stage=output_1_codec", *codec_args])
    saved = read_checkpoint(run_dir(cfg) / "model.pt")
    assert {k.split(".")[0] for k in saved["state_dict"]} == CODEC_COMPONENTS
    assert "quantizer.codebook" in saved["state_dict"] and saved["run_config"]["codec"]["dim"] == 32

    codec = load_codec(cfg)
    wav = torch.randn(2, 1, 1500).clamp(-1, 1) * 0.3
    codes, gtok = codec.encode(wav)
    assert codes.shape == (2, 3) and gtok.shape == (2, 2)  # 1500 samples round up to 3 tokens
    assert codec.decode(codes, gtok[0]).shape == (2, 1, 1800)
    with pytest.raises(ValueError, match="0..63"):
        codec.decode(codes + 64, gtok)

    summary = write_codec_tokens(cfg, voice_utterances=4, progress=False)
    assert len(summary["global_tokens"]) == 2
    data = TTSDataModule(OmegaConf.to_object(cfg.data.tts_codes), "codes")
    n = 0
    for split in ("train", "dev", "test"):
        for batch in data.make_loader(split):
            assert batch["codes"].max() < 64 and (batch["codes"] >= PAD_CODE).all()
            assert batch["global_tokens"].tolist() == [summary["global_tokens"]] * len(batch["texts"])
            n += len(batch["texts"])
    assert n == sum(summary[s]["utterances"] for s in ("train", "dev", "test"))
    # each utterance's tokens are the codec's tokens of its audio (ceil(samples / 600) of them)
    raw = next(iter(wds.DataPipeline(wds.SimpleShardList(resolve_shards(cfg.data.tts_codes.dev_shards)),
                                     wds.tarfile_to_samples())))  # fmt: skip
    meta = json.loads(raw["json"])
    stored = np.load(io.BytesIO(raw["codes.npy"]))
    assert len(stored) == meta["codec_tokens"] == -(-meta["num_samples"] // 600)

    with pytest.raises(ValueError, match=r"quantizer.codebook: output_1_codec saved \(64, 32\), this model has"):
        load_codec(load_config(["stage=output_1_codec", *codec_args, "codec.codebook_size=128"]))
    with pytest.raises(ValueError, match="data.tts.sample_rate 16000 differs from codec.sample_rate 24000"):
        train.main(["stage=output_1_codec", *codec_args, "data.tts.sample_rate=16000"])


def test_rewrite_shards_drops_and_counts_what_the_transform_refuses(mini_corpus, tmp_path):
    src = wds.DataPipeline(
        wds.SimpleShardList(resolve_shards(str(mini_corpus / "shards" / "tts" / "train"))), wds.tarfile_to_samples()
    )
    seen = []

    def keep_every_other(raw):
        seen.append(raw["__key__"])
        return None if len(seen) % 2 else {**raw, "extra.txt": b"x"}

    index = rewrite_shards(src, tmp_path / "out", "tts-train", keep_every_other, progress=False)
    assert index["num_samples"] == len(seen) // 2 and index["parts"]["tts-train"]["skipped"] == {
        "transform": len(seen) - len(seen) // 2
    }
    out = list(wds.DataPipeline(wds.SimpleShardList(resolve_shards(str(tmp_path / "out"))), wds.tarfile_to_samples()))
    assert [r["__key__"] for r in out] == seen[1::2] and all(r["extra.txt"] == b"x" for r in out)
