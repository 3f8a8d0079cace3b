"""Codec building blocks: paper sizes, generator shapes and conditioning, EMA vector quantization."""

import pytest
import torch

from modules.codec.network import CodecConfig, Generator, hop_length
from modules.layers.quantizer import GlobalQuantizer, VectorQuantizer, codebook_usage

SMALL = CodecConfig(
    dim=32, encoder_channels=4, global_dim=8, global_groups=2, upsample_kernels=[16, 11, 11, 5], resblock_kernels=[3, 5]
)


def test_paper_sizes_match_the_reference():
    cfg = CodecConfig()
    assert hop_length(cfg) == 600 and cfg.sample_rate // hop_length(cfg) == 40
    with torch.device("meta"):
        generator = Generator(cfg)
        books = [
            VectorQuantizer(cfg.codebook_size, cfg.dim),
            GlobalQuantizer(
                cfg.global_dim, cfg.global_groups, cfg.global_codebook_size, cfg.ema_decay, cfg.dead_code_threshold
            ),
        ]
    n = sum(p.numel() for p in generator.parameters())
    assert abs(n - 15_369_857) / 15_369_857 < 0.01, n
    entries = sum(b.numel() for q in books for name, b in q.named_buffers() if name.endswith("codebook"))
    assert entries == 655_360  # 1024 x 512 + 8 x 1024 x 16
    assert not any(True for q in books for _ in q.parameters())  # EMA updates, no gradient
    assert generator.global_stage == 1  # 512 -> 256 -> 128: after the second upsampler


def test_generator_gives_600_samples_per_token_and_uses_the_voice_vector():
    torch.manual_seed(0)
    gen = Generator(SMALL).eval()
    x = torch.randn(2, SMALL.dim, 7)
    voice = torch.randn(2, SMALL.global_dim)
    with torch.no_grad():
        y = gen(x, voice)
        other = gen(x, torch.randn(2, SMALL.global_dim))
    assert y.shape == (2, 1, 7 * 600) and y.abs().max() <= 1
    assert not torch.allclose(y, other)  # the voice changes the sound
    with pytest.raises(ValueError, match="must agree"):
        Generator(CodecConfig(upsample_rates=[8, 5, 5, 4], upsample_kernels=[16, 11, 11, 8]))


def test_quantizer_starts_from_data_passes_gradients_and_follows_its_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, decay=0.0).train()
    x = torch.randn(64, 4, requires_grad=True)
    q, _, loss = vq(x)
    assert bool(vq.initialized)
    (q.sum() + loss).backward()
    # straight through: d(sum q)/dx = 1, plus the commitment term's pull towards the codes
    assert torch.allclose(x.grad, 1 + 2 * (x - q).detach() / x.numel(), atol=1e-6)
    # decay 0: every code used by this batch moves to the mean of its vectors
    x2 = torch.randn(64, 4)
    _, codes2, _ = vq(x2)
    for k in codes2.unique():
        assert torch.allclose(vq.codebook[k], x2[codes2 == k].mean(0), atol=1e-4)
    # eval mode leaves the codebook alone
    before = vq.codebook.clone()
    vq.eval()(torch.randn(64, 4))
    assert torch.equal(before, vq.codebook)


def test_factorized_codes_are_unit_vectors_looked_up_by_direction_and_train_both_maps():
    from modules.layers.quantizer import FactorizedQuantizer

    torch.manual_seed(0)
    fq = FactorizedQuantizer(16, 12, code_dim=3, decay=0.0).train()
    x = torch.randn(64, 12, requires_grad=True)
    q, codes, loss = fq(x)
    assert q.shape == (64, 12) and codes.shape == (64,) and bool(fq.inner.initialized)
    (q.square().sum() + loss).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fq.parameters())  # both maps learn
    fq.eval()
    with torch.no_grad():
        assert torch.equal(fq.codes(x), fq(x)[1])  # lookup without update = the training path's codes
        assert torch.allclose(fq(x)[0], fq.embed(fq.codes(x)), atol=1e-5)  # what decode sees
        book = torch.nn.functional.normalize(fq.inner.codebook, dim=-1)
        low = torch.nn.functional.normalize(fq.proj_in(x), dim=-1)
        assert torch.equal(fq.codes(x), (low @ book.T).argmax(1))  # nearest unit vector = best cosine


def test_dead_codes_restart_where_the_data_is():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 2, decay=0.5, dead_code_threshold=0.5).train()
    vq(torch.randn(256, 2) * 10)  # initialised over a wide region
    for _ in range(12):  # the data then lives in a small square far away
        vq(torch.rand(256, 2) + 50.0)
    assert (vq.codebook > 49.9).all() and (vq.codebook < 51.1).all()
    _, codes, _ = vq.eval()(torch.rand(2048, 2) + 50.0)
    assert codebook_usage(codes, 32)["used"] > 0.8


def test_codebook_usage_reports_perplexity_and_share_used():
    uniform = codebook_usage(torch.arange(8).repeat(10), 16)
    assert uniform["perplexity"] == pytest.approx(8.0, rel=1e-5) and uniform["used"] == 0.5
    assert codebook_usage(torch.zeros(100, dtype=torch.long), 16)["perplexity"] == pytest.approx(1.0)


def test_global_tokens_round_trip_to_the_voice_vector():
    torch.manual_seed(0)
    gq = GlobalQuantizer(
        SMALL.global_dim, SMALL.global_groups, SMALL.global_codebook_size, SMALL.ema_decay, SMALL.dead_code_threshold
    ).train()
    v = torch.randn(40, SMALL.global_dim)
    gq(v)  # initialise from data (and update: codes move after the lookup in training mode)
    q, tokens, _ = gq.eval()(v)
    assert tokens.shape == (40, SMALL.global_groups) and tokens.max() < SMALL.global_codebook_size
    assert torch.allclose(gq.embed(tokens), q.detach(), atol=1e-6)


def test_encoder_gives_one_vector_per_600_samples_and_a_voice_feature():
    from modules.codec.network import Encoder

    torch.manual_seed(0)
    enc = Encoder(SMALL).eval()
    with torch.no_grad():
        local, voice = enc(torch.randn(3, 1, 600 * 5))
    assert local.shape == (3, SMALL.dim, 5) and voice.shape == (3, SMALL.global_dim)
    with pytest.raises(ValueError, match="global_dim = 7 channels"):
        Encoder(CodecConfig(global_dim=7))


def test_discriminators_and_gan_losses():
    from modules.codec.discriminators import (
        Discriminators,
        discriminator_loss,
        feature_matching_loss,
        generator_adversarial_loss,
    )

    torch.manual_seed(0)
    disc = Discriminators(scale_width=16)
    wav = torch.randn(2, 1, 4800).tanh()
    outs = disc(wav)
    assert len(outs) == 8 and all(score.shape[0] == 2 and len(feats) >= 5 for score, feats in outs)
    # least squares: perfect scores give zero loss; the same audio gives zero feature-matching loss
    ones = [(torch.ones_like(s), f) for s, f in outs]
    zeros = [(torch.zeros_like(s), f) for s, f in outs]
    assert float(discriminator_loss(ones, zeros)) == 0.0 and float(generator_adversarial_loss(ones)) == 0.0
    assert float(feature_matching_loss(outs, outs).detach()) == 0.0
    assert float(feature_matching_loss(outs, disc(wav * 0.5)).detach()) > 0


def test_log_mel_puts_a_tone_in_its_band():
    from modules.codec.network import LogMel, mel_filterbank

    bank = mel_filterbank(24000, 1024, 80, 0.0, 8000)
    assert bank.shape == (80, 513) and (bank >= 0).all()
    assert (bank.argmax(1).diff() >= 0).all()  # filters rise in frequency
    mel = LogMel()
    t = torch.arange(24000) / 24000
    spec = mel(torch.sin(2 * torch.pi * 1000 * t)[None, None])
    assert spec.shape == (1, 80, 101)
    peak = int(spec[0, :, 50].argmax())
    assert bank[peak, round(1000 / (12000 / 512))] > 0  # the loudest band holds 1 kHz


ISTFT = CodecConfig(dim=32, global_dim=8, global_groups=2, generator="istft", encoder="mel", istft_width=16,
                    istft_layers=2, mel_encoder_layers=1)  # fmt: skip


def test_istft_generator_gives_600_samples_per_token_and_uses_the_voice_vector():
    from modules.codec.network import ISTFTGenerator, build_generator

    torch.manual_seed(0)
    gen = build_generator(ISTFT).eval()
    assert isinstance(gen, ISTFTGenerator) and gen.up == 2  # 600 / 300: two frames per token
    x, voice = torch.randn(2, 32, 7), torch.randn(2, 8)
    with torch.no_grad():
        y, other = gen(x, voice), gen(x, torch.randn(2, 8))
    assert y.shape == (2, 1, 7 * 600) and y.abs().max() <= 1 and not torch.allclose(y, other)
    odd = build_generator(CodecConfig(**{**ISTFT.__dict__, "istft_hop": 200, "istft_n_fft": 800}))
    assert odd(x, voice).shape == (2, 1, 7 * 600)  # three frames per token (an odd factor)
    with pytest.raises(ValueError, match="must divide the token hop 600"):
        build_generator(CodecConfig(**{**ISTFT.__dict__, "istft_hop": 256}))
    with pytest.raises(ValueError, match="'hifigan' or 'istft'"):
        build_generator(CodecConfig(generator="vocos"))


@pytest.mark.parametrize("samples", [600, 600 * 5, 24000])
def test_mel_encoder_gives_one_vector_per_600_samples_and_a_voice_feature(samples):
    from modules.codec.network import build_encoder

    torch.manual_seed(0)
    enc = build_encoder(ISTFT).eval()
    with torch.no_grad():
        local, voice = enc(torch.randn(3, 1, samples))
    assert local.shape == (3, 32, samples // 600) and voice.shape == (3, 8)
    with pytest.raises(ValueError, match="'wave' or 'mel'"):
        build_encoder(CodecConfig(encoder="spectrum"))


def test_multi_resolution_stft_loss_is_zero_on_the_same_audio_and_grows_with_the_error():
    from modules.codec.network import MultiResolutionSTFTLoss

    torch.manual_seed(0)
    loss = MultiResolutionSTFTLoss([[256, 64], [512, 128]])
    x = torch.randn(2, 1, 4800) * 0.1
    small, large = loss(x + 0.01 * torch.randn_like(x), x), loss(x + 0.1 * torch.randn_like(x), x)
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6) and 0 < float(small) < float(large)


def test_the_codec_trains_with_the_istft_generator_and_the_stft_loss():
    """One generator step of the Codec module's objective moves its loss, on the cheap blocks."""
    from modules.codec.stage import Codec
    from modules.config import load_config

    torch.manual_seed(0)
    sizes = ["codec.dim=32", "codec.global_dim=8", "codec.global_groups=2", "codec.istft_width=16"]
    cfg = load_config(["stage=output_1_codec", "experiment=tiny", "codec.generator=istft", "codec.encoder=mel",
                       "codec.stft_weight=1.0", *sizes])  # fmt: skip
    codec = Codec(cfg, with_discriminators=False).train()
    x = torch.randn(4, 1, 6000).tanh() * 0.3
    opt = torch.optim.Adam([p for p in codec.parameters() if p.requires_grad], 3e-3)
    losses = []
    for _ in range(8):
        loss, logs = codec.generator_objective(x, codec.reconstruct(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert "train/stft" in logs and losses[-1] < losses[0]


def test_quantize_after_trains_unquantized_first_and_then_starts_the_codebook_from_the_encoder():
    from modules.codec.stage import Codec
    from modules.config import load_config

    torch.manual_seed(0)
    sizes = ["codec.dim=32", "codec.global_dim=8", "codec.global_groups=2", "codec.istft_width=16"]
    cfg = load_config(["stage=output_1_codec", "experiment=tiny", "codec.quantize_after=1", *sizes])
    codec = Codec(cfg, with_discriminators=False).train()  # no trainer yet: step 0, before quantize_after
    x = torch.randn(2, 1, 6000).tanh() * 0.3
    out = codec.reconstruct(x)
    assert not bool(codec.quantizer.initialized) and float(out["commitment"]) == 0.0
    assert out["wav"].shape[-1] == 6000 and out["wav"].requires_grad
    codec.codec_cfg.quantize_after = 0  # past the warm-up: quantized, the codebook from these vectors
    out = codec.reconstruct(x)
    assert bool(codec.quantizer.initialized) and float(out["commitment"].detach()) > 0.0
    assert codec.quantizer.codes(codec.quantizer.codebook).unique().numel() > 1
