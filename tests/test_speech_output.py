"""Speech-output stages on the miniature corpus: the codec (output_1_codec) and its token tool.

As for the speech-input stages: after a training step every trainable parameter received a
gradient (the discriminators from their own objective, encoder and generator from theirs) and
the codebooks moved by EMA; the stage output holds exactly the declared components plus the
resolved config; a codec of another size is refused with both sizes named.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import train
from datamodules.shards.reader import iter_metadata, iter_raw
from datamodules.shards.writer import rewrite_shards
from datamodules.tts import PAD_CODE, TTSDataModule
from modules.codec.network import hop_length
from modules.codec.stage import Codec, codec_config, load_codec, si_snr, tts_data_config
from modules.config import load_config, run_dir
from modules.llm.answers import fingerprint
from modules.stage import read_checkpoint
from tools.write_codec_tokens import write_codec_tokens

CODEC_COMPONENTS = {"codec_encoder", "quantizer", "global_quantizer", "generator", "discriminators"}
# Top-level keys of the saved codec (its attributes; the component codec_encoder is `encoder`).
CODEC_SAVED_PARTS = {"encoder", "quantizer", "global_quantizer", "generator", "discriminators"}


@pytest.fixture
def codec_args(speech_args) -> list[str]:
    """The codec at toy width: 32 channels at the token rate, 2 voice tokens, 1-scale MSD."""
    return [
        *speech_args,
        "codec.dim=32",
        "codec.encoder_channels=4",
        "codec.istft_width=16",
        "codec.istft_layers=1",
        "codec.mel_encoder_layers=1",
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
    metrics = train.main(["stage=output_1_codec", *codec_args, "eval.limit=1"])
    assert metrics["train_steps"] == 2  # generator steps: the discriminator's raw steps are not counted
    for key in ("dev_mel_distance", "dev_si_snr_db", "dev_code_perplexity", "dev_codes_used"):
        assert np.isfinite(metrics[key]), key
    cfg = load_config(["stage=output_1_codec", *codec_args])
    dev_total = sum(1 for _ in iter_metadata(cfg.data.tts.dev_shards))
    assert 1 <= metrics["dev_utterances"] < dev_total, dev_total  # eval.limit=1: the first batch only
    saved = read_checkpoint(run_dir(cfg) / "model.pt")
    assert {k.split(".")[0] for k in saved["state_dict"]} == CODEC_SAVED_PARTS
    assert "quantizer.codebook" in saved["state_dict"] and saved["run_config"]["codec"]["dim"] == 32

    codec = load_codec(cfg)
    # inference builds no discriminators; their saved weights are left out on purpose
    assert codec.discriminators is None and "discriminators" not in codec.components()
    assert not any(name.startswith("discriminators.") for name, _ in codec.named_parameters())
    assert all(torch.equal(codec.state_dict()[k], v) for k, v in saved["state_dict"].items() if k in codec.state_dict())
    # a decoder variant's stages use the main chain's codec (there is no output_1_codec-nopre)
    assert isinstance(load_codec(load_config(["stage=output_3_prefix", *codec_args, "stage.variant=nopre"])), Codec)
    wav = torch.randn(2, 1, 1500).clamp(-1, 1) * 0.3
    codes, gtok = codec.encode(wav)
    assert codes.shape == (2, 3) and gtok.shape == (2, 2)  # 1500 samples round up to 3 tokens
    assert codec.decode(codes, gtok[0]).shape == (2, 1, 1800)
    with pytest.raises(ValueError, match=r"0\.\.63"):
        codec.decode(codes + 64, gtok)
    with pytest.raises(ValueError, match=r"quantize_after=2 is not below trainer\.max_steps=2"):
        train.main(["stage=output_1_codec", *codec_args, "codec.quantize_after=2", "resume=false"])

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
    raw = next(iter_raw(cfg.data.tts_codes.dev_shards))
    meta = json.loads(raw["json"])
    stored = np.load(io.BytesIO(raw["codes.npy"]))
    assert len(stored) == meta["codec_tokens"] == -(-meta["num_samples"] // 600)
    # data.tts_codes.limit encodes the first N utterances per split; a null folder skips a split
    cut = load_config(
        ["stage=output_1_codec", *codec_args, "data.tts_codes.limit=2", "data.tts_codes.test_shards=null"]
    )
    small = write_codec_tokens(cut, voice_utterances=4, progress=False)
    assert small["train"]["utterances"] == small["dev"]["utterances"] == 2 and "test" not in small

    with pytest.raises(ValueError, match=r"encoder.conv_pre.bias: output_1_codec saved \(32,\), this model has \(16,\)(.|\n)*"
                                         r"codec.dim: 32 -> 16"):  # fmt: skip
        load_codec(load_config(["stage=output_1_codec", *codec_args, "codec.dim=16"]))
    # what the decoder depends on (rate, token rate, codebook) is checked first, both sides named
    with pytest.raises(ValueError, match=r"has codebook_size 64; stage output_1_codec expects codebook_size 128"):
        load_codec(load_config(["stage=output_1_codec", *codec_args, "codec.codebook_size=128"]))
    from modules.codec.stage import check_codec_fits

    decoder_cfg = ["stage=output_2_decoder", *codec_args, "speech_decoder.codebook_size=64"]
    check_codec_fits(load_config(decoder_cfg), saved)  # the same codec: no complaint
    for change, message in [
        (["codec.sample_rate=16000", "data.tts.sample_rate=16000"],
         "has sample_rate 24000, tokens_per_second 40; stage output_2_decoder expects sample_rate 16000, "
         "tokens_per_second 26.6667"),
        (["codec.encoder_strides=[3,5,5,4]", "codec.upsample_rates=[4,5,5,3]"],
         "has tokens_per_second 40; stage output_2_decoder expects tokens_per_second 80"),
        (["codec.codebook_size=128", "speech_decoder.codebook_size=128"],
         "has codebook_size 64; stage output_2_decoder expects codebook_size 128"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            check_codec_fits(load_config([*decoder_cfg, *change]), saved)
    with pytest.raises(ValueError, match=r"data\.tts\.sample_rate 16000 differs from codec\.sample_rate 24000"):
        train.main(["stage=output_1_codec", *codec_args, "data.tts.sample_rate=16000"])


def test_rewrite_shards_drops_and_counts_what_the_transform_refuses(mini_corpus, tmp_path):
    src = iter_raw(str(mini_corpus / "shards" / "tts" / "train"))
    seen = []

    def keep_every_other(raw):
        seen.append(raw["__key__"])
        return None if len(seen) % 2 else {**raw, "extra.txt": b"x"}

    index = rewrite_shards(src, tmp_path / "out", "tts-train", keep_every_other, progress=False)
    assert index["num_samples"] == len(seen) // 2 and index["parts"]["tts-train"]["skipped"] == {
        "transform": len(seen) - len(seen) // 2
    }
    out = list(iter_raw(str(tmp_path / "out")))
    assert [r["__key__"] for r in out] == seen[1::2] and all(r["extra.txt"] == b"x" for r in out)


# --- speech decoder -----------------------------------------------------------------------------
def test_speech_decoder_paper_size_and_projection():
    from modules.speech_decoder.network import SpeechDecoderConfig, SpeechDecoderNet

    with torch.device("meta"):
        paper = SpeechDecoderNet(SpeechDecoderConfig(), 3584)
        other = SpeechDecoderNet(SpeechDecoderConfig(), 1000)
    assert sum(p.numel() for p in paper.parameters()) == 164_718_980  # reference: 164,718,980
    assert paper.pre_net.text_in.ratio == 4 and paper.pre_net.text_in.proj is None  # 3584 = 4 x 896
    assert other.pre_net.text_in.proj is not None and other.prefix.hidden_in.proj.in_features == 1000
    with pytest.raises(ValueError, match="must equal num_layers"):
        SpeechDecoderNet(SpeechDecoderConfig(prefix_layers=3), 3584)


def _toy_decoder(seed: int = 0, stride: float = 0.0, durations: bool = False, window: float = 0.0,
                 aligned: bool = False, phonemes: int = 0):  # fmt: skip
    from modules.speech_decoder.network import SpeechDecoderConfig, SpeechDecoderNet

    torch.manual_seed(seed)
    cfg = SpeechDecoderConfig(dim=32, num_heads=4, ffn_dim=64, codebook_size=16, dropout=0.0,
                              text_position_stride=stride, duration_positions=durations,
                              attention_window=window, aligned_text=aligned,
                              aligned_phonemes=phonemes)  # fmt: skip
    net = SpeechDecoderNet(cfg, 64)
    with torch.no_grad():  # sharper logits than the default init, so that greedy paths vary
        net.decoder.out.weight.mul_(20)
        if aligned or phonemes:  # about 3.5 codec tokens per text token: the generated tokens fall inside the text
            net.pre_net.duration.bias.fill_(1.5)
    return net.eval()


# the release's positions; text frame j at j x 2.5; text at the positions of its durations, with
# every text frame visible or only those within 3 tokens; then also the text frame of each position
# added to the speech inputs, and then the phoneme of each position as well
@pytest.mark.parametrize("stride,durations,window,aligned,phonemes", [
    (0.0, False, 0.0, False, 0), (2.5, False, 0.0, False, 0), (0.0, True, 0.0, False, 0),
    (0.0, True, 3.0, False, 0), (0.0, True, 3.0, True, 0), (0.0, True, 3.0, True, 3)])  # fmt: skip
def test_generation_with_and_without_cache_and_teacher_forcing_agree(stride, durations, window, aligned, phonemes):
    net = _toy_decoder(seed=1 if durations else 0, stride=stride, durations=durations, window=window,
                       aligned=aligned, phonemes=phonemes)  # fmt: skip
    text, text_valid = torch.randn(2, 5, 64), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    hidden, hidden_valid = torch.randn(2, 4, 64), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    sounds = None
    if phonemes:  # 1-3 sounds per token (ids 3-9), none on padding
        sounds = torch.randint(3, 10, (2, 5, 3), generator=torch.Generator().manual_seed(0))
        sounds[:, :, 1:] *= torch.rand(2, 5, 2, generator=torch.Generator().manual_seed(1)) > 0.4
        sounds[:, :, 2] *= sounds[:, :, 1] > 0
        sounds[1, 3:] = 0
    cached = net.generate(text, text_valid, hidden, hidden_valid, top_k=1, max_tokens=15, phonemes=sounds)
    plain = net.generate(text, text_valid, hidden, hidden_valid, top_k=1, max_tokens=15, use_cache=False,
                         phonemes=sounds)  # fmt: skip
    assert [c.tolist() for c in cached] == [c.tolist() for c in plain]
    cond_valid = torch.ones(1, 4, dtype=torch.bool)
    dur = None
    if durations:  # 2 frames per text token: token i's frames at its start and half-way through it
        with torch.no_grad():
            dur = net.predicted_durations(net.condition(text, text_valid, sounds)[0], text_valid)
        assert (dur[1, 3:] == 0).all() and (dur >= 0).all()
        assert net.cond_positions(cond_valid, torch.tensor([[2.0, 4.0]]))[0].tolist() == [0.0, 0.0, 1.0, 2.0, 4.0]
        with pytest.raises(ValueError, match="durations"):
            net.cond_positions(cond_valid)
        near = net.near_text(torch.tensor([[0.0, 0.0, 1.0, 2.0, 8.0]]), torch.tensor([[0, 5]]))
        assert (
            near is None
            if not window
            else near[0].tolist() == [[True, True, True, True, False], [True, False, False, True, True]]
        )
    else:  # text frame j sits at j x stride and the speech from 0 (stride 0: after the conditioning)
        expected_cond = [0.0, 2.5, 5.0, 7.5] if stride else [0, 1, 2, 3]
        assert net.cond_positions(cond_valid)[0].tolist() == expected_cond
    speech_from = 0 if stride or durations else 4
    assert net.speech_positions(cond_valid, torch.arange(3))[0].tolist() == [speech_from + i for i in range(3)]
    assert len(set(cached[0].tolist())) > 2  # not a degenerate path
    # the second row alone (no padding) generates the same tokens as inside the padded batch
    alone = net.generate(text[1:, :3], text_valid[1:, :3], hidden[1:, :2], hidden_valid[1:, :2], top_k=1, max_tokens=15,
                         phonemes=None if sounds is None else sounds[1:, :3])  # fmt: skip
    assert alone[0].tolist() == cached[1].tolist()
    # teacher forcing on the generated tokens predicts them again (specials masked as in sampling)
    codes = torch.nn.utils.rnn.pad_sequence(cached, batch_first=True, padding_value=PAD_CODE)
    lens = torch.tensor([len(c) for c in cached])
    logits, targets, log_dur = net(text, text_valid, codes, lens, hidden, hidden_valid, dur, sounds)
    assert (log_dur is not None) == durations
    logits[..., [16, 17, 19]] = float("-inf")
    for i, n in enumerate(lens.tolist()):
        assert logits[i, :n].argmax(-1).tolist() == cached[i].tolist()
        assert targets[i, n] == 18 and (targets[i, n + 1 :] == -100).all()  # EOS, then ignored


def test_aligned_text_gives_each_speech_position_the_frame_it_speaks():
    from modules.speech_decoder.network import SpeechDecoderConfig, SpeechDecoderNet

    net = _toy_decoder(durations=True, window=3.0, aligned=True)
    cond = torch.randn(1, 5, 32)  # BOS + 2 text tokens x 2 frames
    durations = torch.tensor([[2.0, 4.0]])
    cond_pos = net.cond_positions(torch.ones(1, 5, dtype=torch.bool), durations)  # [0, 0, 1, 2, 4]
    with torch.no_grad():
        out = net.aligned_frames(cond, cond_pos, durations, torch.arange(8)[None])
        expected = net.decoder.aligned(cond[0, 1:][[0, 1, 2, 2, 3, 3]])
    assert torch.allclose(out[0, :6], expected) and (out[0, 6:] == 0).all()  # nothing past the text's 6 tokens
    with pytest.raises(ValueError, match="needs duration_positions"):
        SpeechDecoderNet(SpeechDecoderConfig(dim=32, num_heads=4, ffn_dim=64, aligned_text=True), 64)


def test_aligned_phonemes_split_each_token_evenly_over_its_sounds():
    from modules.speech_decoder.alignment import OTHER_PHONEME, SILENT_TOKEN, phoneme_ids
    from modules.speech_decoder.network import SpeechDecoderConfig, SpeechDecoderNet

    net = _toy_decoder(durations=True, window=3.0, aligned=True, phonemes=3)
    sounds = torch.tensor([[[5, 6, 0], [7, 8, 9], [SILENT_TOKEN, 0, 0]]])
    durations = torch.tensor([[2.0, 4.0, 0.0]])  # token 2 (punctuation) takes no time
    with torch.no_grad():
        out = net.aligned_sounds(sounds, durations, torch.arange(8)[None])
        expected = net.decoder.phoneme(torch.tensor([5, 6, 7, 7, 8, 9]))  # 4 tokens over 3 sounds: 0, 0, 1, 2
    assert torch.allclose(out[0, :6], expected) and (out[0, 6:] == 0).all()  # nothing past the text
    with pytest.raises(ValueError, match="phonemes"):  # the pre-network needs them
        net.condition(torch.randn(1, 3, 64), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs duration_positions"):
        SpeechDecoderNet(SpeechDecoderConfig(dim=32, num_heads=4, ffn_dim=64, aligned_phonemes=4), 64)
    ids = phoneme_ids("twˈɛnti ʘ一")  # stress marks and spaces take no time; an unknown letter is OTHER
    assert len(ids) == 8 and ids[-1] == OTHER_PHONEME and ids[0] == ids[4] != OTHER_PHONEME


def test_token_phonemes_come_from_espeak_per_token():
    from modules.speech_decoder.alignment import NO_PHONEME, SILENT_TOKEN, TokenPhonemes, phoneme_ids

    class Pieces:  # a tokenizer whose token i is pieces[i]
        pieces = (" twenty", ".", " Paris", " supercalifragilistic")

        def decode(self, ids):
            return "".join(self.pieces[i] for i in ids)

    table = TokenPhonemes(Pieces(), max_phonemes=8)
    out = table([[0, 1], [2, 3, 3]], width=3)
    assert out.shape == (2, 3, 8)
    assert out[0, 0].tolist() == phoneme_ids("twɛnti") + [NO_PHONEME] * 2
    assert out[0, 1].tolist() == [SILENT_TOKEN] + [NO_PHONEME] * 7 and (out[0, 2] == NO_PHONEME).all()
    assert out[1, 0].tolist()[:5] == phoneme_ids("pæɹɪs") and (out[1, 1] != NO_PHONEME).all()  # cut at 8
    with pytest.raises(ValueError, match="at least 1"):
        TokenPhonemes(Pieces(), 0)


def test_sampling_masks_specials_and_respects_top_k():
    net = _toy_decoder(1)
    logits = torch.zeros(1000, 20)
    logits[:, 16] = logits[:, 17] = logits[:, 19] = 100.0  # BOS, SOS, PAD: never sampled
    logits[:, 3], logits[:, 7] = 5.0, 4.0
    picks = net._sample(logits, 2, torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {3, 7}
    assert set(net._sample(logits, 1, None).tolist()) == {3}
    text = torch.randn(1, 3, 64)
    assert len(net.generate(text, torch.ones(1, 3, dtype=torch.bool), top_k=3, max_tokens=7)[0]) <= 7


@pytest.fixture
def decoder_args(codec_args) -> list[str]:
    return [
        *codec_args,
        "speech_decoder.dim=16",
        "speech_decoder.num_heads=2",
        "speech_decoder.ffn_dim=32",
        "speech_decoder.codebook_size=64",
        "speech_decoder.dropout=0.0",
        "data.tts_codes.max_tokens_per_batch=400",
    ]


def _frozen_and_trained(module, batch, trainable: set[str]) -> None:
    """One optimizer step: trainable components got gradients and moved, the rest is bit-identical.

    Exception, as in the reference design: only the keys/values of each prefix layer are used,
    so the last prefix layer's query, output and MLP weights never influence the loss.
    """
    last = f"prefix.layers.layers.{module.dcfg.prefix_layers - 1}."
    dead = {last + n for n in ("q_proj.weight", "o_proj.weight", "mlp_norm.weight", "gate_proj.weight",
                               "up_proj.weight", "down_proj.weight")}  # fmt: skip
    from modules.stage import make_optimizer

    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    opt = make_optimizer(module, module.cfg.optim, 10)["optimizer"]
    module.train()
    module._step(batch)[0].backward()
    for name, p in module.named_parameters():
        if name.split(".")[0] in trainable and name not in dead:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        elif name.split(".")[0] not in trainable:
            assert not p.requires_grad and p.grad is None, f"frozen {name} has a gradient"
        else:
            assert p.grad is None, f"{name} should not influence the KV prefix"
    opt.step()
    after = module.state_dict()
    for k, v in before.items():
        if k.split(".")[0] not in trainable:
            assert torch.equal(v, after[k]), f"frozen {k} changed"


def test_decoder_stages_train_the_declared_parts(decoder_args):
    from datamodules.answer_speech import AnswerSpeechDataModule
    from datamodules.shards.reader import iter_metadata
    from modules.speech_decoder.stage import answer_examples, build, load_speech_decoder
    from modules.stage import load_stage_outputs

    train.main(["stage=output_1_codec", *decoder_args])
    cfg2 = load_config(["stage=output_2_decoder", *decoder_args])
    write_codec_tokens(cfg2, voice_utterances=4, progress=False)

    # output_2_decoder: embedding, pre-network and shared stack; LLM and prefix frozen
    assert set(cfg2.stage.trainable) == {"embedding", "pre_net", "decoder"}
    m2 = build(cfg2)
    m2.apply_freezing(list(cfg2.stage.trainable))
    batch = next(iter(TTSDataModule(OmegaConf.to_object(cfg2.data.tts_codes), "codes").make_loader("train")))
    _frozen_and_trained(m2, batch, {"embedding", "pre_net", "decoder"})
    metrics = train.main(["stage=output_2_decoder", *decoder_args])
    assert metrics["train_steps"] == 2 and np.isfinite(metrics["val/loss"])
    saved = read_checkpoint(run_dir(cfg2) / "model.pt")
    assert {k.split(".")[0] for k in saved["state_dict"]} == {"embedding", "pre_net", "decoder"}
    assert saved["run_config"]["speech_decoder"]["dim"] == 16

    # output_3_prefix: only the prefix, on the LLM's own replies with their hidden states
    cfg3 = load_config(["stage=output_3_prefix", *decoder_args])
    # The LLM's cached replies (tools.make_llm_answers' format): the reference answer (codes from
    # the TTS shards), another text (spoken and encoded here), or nothing (skipped).
    answers = Path(cfg3.speech_llm.answers_dir)
    answers.mkdir(parents=True)
    for split in ("train", "dev"):
        rows = []
        for key, meta in iter_metadata(cfg3.data.spoken_qa[f"{split}_shards"]):
            replies = [t["answer"] if k % 2 == 0 else t["answer"] + " Indeed." for k, t in enumerate(meta["turns"])]
            rows.append({"id": key, "replies": replies})
        rows[0]["replies"][0] = ""
        (answers / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (answers / "meta.json").write_text(json.dumps(fingerprint(cfg3)))  # as if this LLM had made them
    examples, stats = answer_examples(cfg3, "train")
    assert stats["examples"] == len(examples) > 0 and all(len(e["codes"]) > 0 for e in examples)
    assert stats["skipped_empty"] == 1 and stats["spoken"] > 0 and stats["from_tts_shards"] > 0
    spoken = next(e for e in examples if e["text"].endswith("Indeed."))
    cut, _ = answer_examples(load_config(["stage=output_3_prefix", *decoder_args, "data.tts_codes.limit=3"]), "train")
    assert len(cut) == 3 and {e["id"] for e in cut} <= {e["id"] for e in examples}
    assert spoken["messages"][-1]["role"] == "user" and len(spoken["codes"]) > 10
    m3 = build(cfg3)
    loaded = load_stage_outputs(cfg3, m3)
    assert {k.split(".")[0] for k in loaded} == {"embedding", "pre_net", "decoder"}
    m3.apply_freezing(list(cfg3.stage.trainable))
    batch = next(iter(AnswerSpeechDataModule({"train": examples}, 400).make_loader("train")))
    hidden, valid = m3.reply_hidden_states(batch["messages"], batch["texts"])
    assert hidden.shape[:2] == valid.shape and valid.sum(1).tolist() == [len(r) for r in m3.reply_ids(batch["texts"])]
    _frozen_and_trained(m3, batch, {"prefix"})
    metrics = train.main(["stage=output_3_prefix", *decoder_args])
    assert metrics["train_steps"] == 2 and metrics["answers"]["train"]["examples"] == len(examples)
    assert {k.split(".")[0] for k in read_checkpoint(run_dir(cfg3) / "model.pt")["state_dict"]} == {"prefix"}

    decoder = load_speech_decoder(cfg3)
    cond = decoder.conditioning(batch)
    codes = decoder.generate(cond["text"], cond["text_valid"], cond["hidden"], cond["hidden_valid"], max_tokens=5,
                             phonemes=cond["phonemes"])  # fmt: skip
    assert cond["phonemes"].shape[:2] == cond["text_valid"].shape  # tiny speaks from the tokens' sounds
    assert len(codes) == len(batch["texts"]) and all(len(c) <= 5 and (c < 64).all() for c in codes)
    with pytest.raises(ValueError, match=r"decoder\.out\.weight: output_2_decoder saved \(68, 16\)"):
        load_speech_decoder(load_config(["stage=output_3_prefix", *decoder_args, "speech_decoder.codebook_size=32",
                                         "codec.codebook_size=32"]))  # fmt: skip


def test_table2_and_codec_report_run_on_the_trained_chain(decoder_args, monkeypatch, reference_answers):
    import evaluation.speech_output as tts_eval
    from datamodules.shards.reader import iter_metadata
    from datamodules.text_qa import chat_messages
    from evaluation.codec import report_codec

    args = [*decoder_args, "eval.speech_output_turns=3", "eval.top_ks=[1,2]", "speech_decoder.max_tokens=30"]
    for stage in ("judge", "output_1_codec"):
        train.main([f"stage={stage}", *args])
    cfg = load_config(["stage=output_3_prefix", *args])
    write_codec_tokens(cfg, voice_utterances=4, progress=False)
    train.main(["stage=output_2_decoder", *args])
    reference_answers(cfg)
    train.main(["stage=output_3_prefix", *args])

    def reference_replies(cfg, turns):  # the mini LLM is untrained: speak the reference answers
        items = []
        for key, meta in iter_metadata(cfg.data.spoken_qa.test_shards):
            for k, t in enumerate(meta["turns"][:1]):
                items.append({"id": f"{key}-t{k}", "messages": chat_messages([], t["question"]), "text": t["answer"]})
        return items[:turns]

    monkeypatch.setattr(tts_eval, "test_replies", reference_replies)
    result = tts_eval.evaluate_speech_output(cfg)
    assert result["replies"] == 3 and result["floor_wer"] >= 0 and np.isfinite(result["codec_resynthesis_wer"])
    assert [(r["variant"], r["prefix"]) for r in result["rows"]] == [("", False), ("", True)]
    assert len(result["missing"]) == 2 and all("nopre" in m for m in result["missing"])
    OmegaConf.update(cfg, "eval.decoder_variants", [""])  # experiment=demo: the main chain only, no warning
    assert tts_eval.evaluate_speech_output(cfg)["missing"] == []
    assert all(set(r["wer"]) == {"1", "2"} for r in result["rows"])
    out = Path(cfg.run_root) / cfg.experiment / "eval"
    assert (out / "speech_output.md").is_file() and list((out / "speech_output").glob("*-espeak.wav"))

    assert all(set(r["mcd_db"]) == {"1", "2"} and r["mcd_db"]["1"] > 0 for r in result["rows"])
    report = report_codec(load_config(["stage=output_1_codec", *args]))
    assert report["utterances"] > 0 and report["judge_wer_original"] >= 0 and "judge_wer_reconstructed" in report
    assert report["mcd_db"] > 0 and (out / "codec_spectrograms.png").stat().st_size > 1000
    # the judge trained first, so the codec's validation heard its reconstructions: one curve point
    (point,) = report["judge_curve"]
    assert point["step"] == 2 and point["judge_wer"] >= 0 and point["train_minutes"] > 0
    assert (out / "codec_wer_curve.png").is_file() and "training minutes" in (out / "codec.md").read_text()
