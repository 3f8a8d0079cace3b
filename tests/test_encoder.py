"""The streaming speech encoder and the adapter: streaming == offline, causality, state snapshots, sizes.

All models here are tiny, fp32, on CPU, with dropout 0 and fixed seeds.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from datamodules.features import CMVNStats, GlobalCMVN, StreamingFbank, fbank
from modules.adapter import AdapterConfig, SpeechAdapter, adapter_length
from modules.encoder.network import EncoderConfig, SpeechEncoder
from modules.layers.subsampling import subsampled_length

F = 80  # fbank bins
D = 32  # tiny encoder width
D_LLM = 48  # tiny LLM width
ATOL = 1e-4
PAPER_ENCODER_PARAMS = 357_950_464
PAPER_ADAPTER_PARAMS = 17_835_520


def tiny_cfg(**overrides) -> EncoderConfig:
    kw = dict(
        input_dim=F,
        subsampling_channels=8,
        d_model=D,
        num_layers=2,
        num_heads=4,
        ffn_dim=64,
        dropout=0.0,
        attention_dropout=0.0,
        chunk_frames=4,
        left_chunks=2,
    )
    kw.update(overrides)
    return EncoderConfig(**kw)


def make_encoder(seed: int = 0, **overrides) -> SpeechEncoder:
    torch.manual_seed(seed)
    return SpeechEncoder(tiny_cfg(**overrides)).eval()


def make_adapter(seed: int = 1) -> SpeechAdapter:
    torch.manual_seed(seed)
    return SpeechAdapter(AdapterConfig(), D, D_LLM).eval()


def random_feats(num_frames: int, seed: int, batch: int = 1) -> torch.Tensor:
    """Fbank-like frames [B, T, 80] (log-mel magnitudes around 5 +- 3)."""
    g = torch.Generator().manual_seed(seed)
    return 5.0 + 3.0 * torch.randn(batch, num_frames, F, generator=g)


def random_sizes(total: int, rng: np.random.Generator) -> list[int]:
    """Piece sizes summing to `total`, with empty pieces and the odd big one."""
    sizes: list[int] = []
    left = total
    while left > 0:
        r = rng.random()
        if r < 0.2:
            n = 0
        elif r < 0.3:
            n = int(rng.integers(17, 60))
        else:
            n = int(rng.integers(1, 12))
        n = min(n, left)
        sizes.append(n)
        left -= n
    sizes.insert(int(rng.integers(0, len(sizes) + 1)), 0)  # at least one empty piece
    return sizes


def split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    assert sum(sizes) == x.shape[1]
    return list(torch.split(x, sizes, dim=1)) if sizes else []


def stream_all(
    encoder: SpeechEncoder,
    adapter: SpeechAdapter,
    pieces: list[torch.Tensor],
    final_piece: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream `pieces` through encoder and adapter, then `final_piece` (or nothing) with final=True."""
    chunk = encoder.cfg.chunk_frames
    state, astate = encoder.init_state(1), adapter.init_state(1)
    enc_out, ad_out = [], []
    emitted = 0
    for piece in pieces:
        out, state = encoder.stream(piece, state)
        assert out.shape[1] % chunk == 0, "non-final calls emit whole chunks only"
        emitted += out.shape[1]
        assert state.frames_out == emitted
        enc_out.append(out)
        a, astate = adapter.stream(out, astate)
        ad_out.append(a)
    if final_piece is None:
        final_piece = torch.zeros(1, 0, F)
    out, state = encoder.stream(final_piece, state, final=True)
    enc_out.append(out)
    a, astate = adapter.stream(out, astate)
    ad_out.append(a)
    return torch.cat(enc_out, dim=1), torch.cat(ad_out, dim=1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return float((a - b).abs().max()) if a.numel() else 0.0


# ------------------------------------------------------------------------------------ streaming == offline


@pytest.mark.parametrize("pieces", ["random", "16frames"])
@pytest.mark.parametrize("left_chunks", [0, 1, 3, -1])
@pytest.mark.parametrize("chunk_frames", [1, 2, 4, 5])
@torch.no_grad()
def test_stream_equals_forward(chunk_frames, left_chunks, pieces):
    check_stream_equals_forward(chunk_frames, left_chunks, pieces, conv_kernel=0)


@pytest.mark.parametrize(("chunk_frames", "left_chunks", "conv_kernel"), [(1, 1, 3), (4, 2, 5), (4, -1, 15), (5, 0, 7)])
@torch.no_grad()
def test_stream_equals_forward_with_conv_module(chunk_frames, left_chunks, conv_kernel):
    check_stream_equals_forward(chunk_frames, left_chunks, "random", conv_kernel)


def check_stream_equals_forward(chunk_frames: int, left_chunks: int, pieces: str, conv_kernel: int) -> None:
    encoder = make_encoder(chunk_frames=chunk_frames, left_chunks=left_chunks, conv_kernel=conv_kernel)
    adapter = make_adapter()
    rng = np.random.default_rng(100 * chunk_frames + 10 * left_chunks + (pieces == "random") + conv_kernel)
    lengths = [7, 8, 10, 13, 22, 30, 300, int(rng.integers(7, 31)), int(rng.integers(31, 320))]
    for i, num_frames in enumerate(lengths):
        feats = random_feats(num_frames, seed=1000 * chunk_frames + 10 * i + left_chunks)
        lens = torch.tensor([num_frames])
        ref, ref_lens = encoder(feats, lens, chunk_frames=chunk_frames, left_chunks=left_chunks)
        assert ref.shape == (1, subsampled_length(num_frames), D)
        assert int(ref_lens[0]) == ref.shape[1]
        ref_ad, ref_ad_lens = adapter(ref, ref_lens)
        assert ref_ad.shape == (1, adapter_length(ref.shape[1]), D_LLM)
        assert int(ref_ad_lens[0]) == ref_ad.shape[1]

        if pieces == "random":
            enc_out, ad_out = stream_all(encoder, adapter, split(feats, random_sizes(num_frames, rng)))
        else:  # 160 ms of audio per piece; the last (partial) piece comes with final=True
            parts = list(torch.split(feats, 16, dim=1))
            enc_out, ad_out = stream_all(encoder, adapter, parts[:-1], final_piece=parts[-1])

        ctx = f"T={num_frames} chunk={chunk_frames} left={left_chunks} pieces={pieces} conv={conv_kernel}"
        assert enc_out.shape == ref.shape, ctx
        assert max_diff(enc_out, ref) <= ATOL, ctx
        assert ad_out.shape == ref_ad.shape, ctx
        assert max_diff(ad_out, ref_ad) <= ATOL, ctx


@torch.no_grad()
def test_stream_emits_chunks_as_soon_as_their_input_is_complete():
    """Chunk k (frames kc .. kc + c - 1) needs input frames up to 4(kc + c - 1) + 6 and no more."""
    c = 4
    encoder = make_encoder(chunk_frames=c, left_chunks=1)
    feats = random_feats(120, seed=5)
    state = encoder.init_state(1)
    emitted = []
    for t in range(feats.shape[1]):
        out, state = encoder.stream(feats[:, t : t + 1], state)
        emitted.append(out.shape[1])
    for t, n in enumerate(emitted):
        expected = (subsampled_length(t + 1) // c - subsampled_length(t) // c) * c
        assert n == expected, f"after input frame {t}: emitted {n}, expected {expected}"


# ------------------------------------------------------------------------------------ end to end from audio


def synthetic_speechlike(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2  # syllable-rate amplitude modulation
    x = env * 0.3 * np.sin(2 * np.pi * (120 + 900 * t) * t) + 0.02 * rng.standard_normal(t.shape[0])
    return x.astype(np.float32)


@torch.no_grad()
def test_end_to_end_audio_streaming_matches_offline():
    wav = synthetic_speechlike(3.05)  # not a multiple of the 2560-sample piece
    offline_feats = fbank(wav)
    stats = CMVNStats(F)
    stats.add(offline_feats)
    cmvn = GlobalCMVN.from_stats(stats.mean_stat, stats.var_stat, stats.frame_num)

    encoder = make_encoder(chunk_frames=4, left_chunks=2)
    encoder.set_cmvn(cmvn)
    adapter = make_adapter()
    normed = encoder.normalize(torch.from_numpy(offline_feats))
    assert abs(float(normed.mean())) < 1e-3 and abs(float(normed.std()) - 1.0) < 1e-2  # CMVN took effect

    feats = torch.from_numpy(offline_feats)[None]
    ref, ref_lens = encoder(feats, torch.tensor([feats.shape[1]]))
    ref_ad, _ = adapter(ref, ref_lens)

    fb = StreamingFbank()
    state, astate = encoder.init_state(1), adapter.init_state(1)
    fb_out, enc_out, ad_out = [], [], []
    for start in range(0, len(wav), 2560):  # 160 ms pieces
        f = fb.accept(wav[start : start + 2560])
        fb_out.append(f)
        e, state = encoder.stream(torch.from_numpy(f)[None], state)
        a, astate = adapter.stream(e, astate)
        enc_out.append(e)
        ad_out.append(a)
    f = fb.finish()
    fb_out.append(f)
    e, state = encoder.stream(torch.from_numpy(f)[None], state, final=True)
    a, astate = adapter.stream(e, astate)
    enc_out.append(e)
    ad_out.append(a)

    streamed_feats = np.concatenate(fb_out, axis=0)
    assert streamed_feats.shape == offline_feats.shape
    assert float(np.abs(streamed_feats - offline_feats).max()) <= ATOL
    enc_out, ad_out = torch.cat(enc_out, dim=1), torch.cat(ad_out, dim=1)
    assert enc_out.shape == ref.shape == (1, subsampled_length(offline_feats.shape[0]), D)
    assert max_diff(enc_out, ref) <= ATOL
    assert ad_out.shape == ref_ad.shape
    assert max_diff(ad_out, ref_ad) <= ATOL


# ------------------------------------------------------------------------------------ causality (gradients)


def input_grad(encoder: SpeechEncoder, feats: torch.Tensor, t: int, c: int, left: int) -> torch.Tensor:
    """|d (w . out[0, t]) / d feats[0, j]| summed over bins, per input frame j.

    A fixed random `w` rather than a plain sum: the final LayerNorm (unit weight, zero bias at
    init) makes `out[0, t].sum()` a constant whose gradient vanishes everywhere.
    """
    x = feats.clone().requires_grad_(True)
    out, _ = encoder(x, torch.tensor([x.shape[1]]), chunk_frames=c, left_chunks=left)
    w = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(t))
    (g,) = torch.autograd.grad((out[0, t] * w).sum(), x)
    return g[0].abs().sum(dim=-1)


@pytest.mark.parametrize(("c", "left", "conv"), [(1, 0, 0), (2, 1, 0), (4, 2, 0), (5, -1, 0), (1, 0, 5), (4, 2, 15)])
def test_no_dependence_on_future_chunks(c, left, conv):
    encoder = make_encoder(chunk_frames=c, left_chunks=left, conv_kernel=conv)
    num_frames = 130
    feats = random_feats(num_frames, seed=7)
    t_out = subsampled_length(num_frames)
    for t in sorted({0, 1, c - 1, c, t_out // 2, t_out - c - 1, t_out - 1}):
        if not 0 <= t < t_out:
            continue
        k = t // c
        first_banned = 4 * (k + 1) * c + 3
        last_allowed = 4 * ((k + 1) * c - 1) + 6
        assert last_allowed == first_banned - 1
        g = input_grad(encoder, feats, t, c, left)
        assert torch.all(g[first_banned:] == 0), f"t={t}: depends on input frames >= {first_banned}"
        assert torch.all(g[4 * t : 4 * t + 7] > 0), f"t={t}: no gradient from its own receptive field"
        if last_allowed < num_frames and (k + 1) * c - 1 < t_out:
            assert g[last_allowed] > 0, f"t={t}: look-ahead shorter than the chunk"


@pytest.mark.parametrize(("c", "left"), [(1, 1), (2, 1), (3, 2), (4, 0)])
def test_left_context_is_bounded_one_layer(c, left):
    encoder = make_encoder(num_layers=1, chunk_frames=c, left_chunks=left)
    num_frames = 150
    feats = random_feats(num_frames, seed=8)
    t_out = subsampled_length(num_frames)
    checked = 0
    for t in range(0, t_out, 3):
        k = t // c
        if k - left <= 0:
            continue
        earliest = 4 * (k - left) * c  # first input frame of encoder frame (k - left) * c
        g = input_grad(encoder, feats, t, c, left)
        assert torch.all(g[:earliest] == 0), f"t={t}: depends on input frames < {earliest}"
        assert g[earliest] > 0, f"t={t}: left context shorter than {left} chunks"
        checked += 1
    assert checked >= 5


def test_unlimited_left_context_reaches_the_start():
    encoder = make_encoder(num_layers=1, chunk_frames=2, left_chunks=-1)
    feats = random_feats(150, seed=9)
    g = input_grad(encoder, feats, subsampled_length(150) - 1, 2, -1)
    assert g[0] > 0


def test_adapter_is_causal():
    adapter = make_adapter()
    num = 21
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, num, D, generator=g)
    t_out = adapter_length(num)
    assert t_out == 11
    for t in range(t_out):
        x = x0.clone().requires_grad_(True)
        out, _ = adapter(x, torch.tensor([num]))
        (grad,) = torch.autograd.grad(out[0, t].sum(), x)
        per_frame = grad[0].abs().sum(dim=-1)
        assert torch.all(per_frame[2 * t + 1 :] == 0), f"adapter output {t} sees inputs > {2 * t}"
        assert torch.all(per_frame[: max(0, 2 * t - 4)] == 0), f"adapter output {t} sees inputs < {2 * t - 4}"
        assert torch.all(per_frame[max(0, 2 * t - 4) : 2 * t + 1] > 0)


# ------------------------------------------------------------------------------------ state snapshots


def _state_tensors(state) -> list[torch.Tensor]:
    return [t for t in (state.pending, state.cache, state.conv_cache) if t is not None]


@pytest.mark.parametrize("conv", [0, 5])
@torch.no_grad()
def test_snapshot_and_restore(conv):
    encoder = make_encoder(chunk_frames=2, left_chunks=2, conv_kernel=conv)
    adapter = make_adapter()
    feats = random_feats(203, seed=11)
    half = 97  # not a chunk boundary: the state holds a partial fbank tail
    state, astate = encoder.init_state(1), adapter.init_state(1)
    first = []
    for piece in torch.split(feats[:, :half], 13, dim=1):
        out, state = encoder.stream(piece, state)
        a, astate = adapter.stream(out, astate)
        first.append(a)
    assert state.pending.shape[1] > 0 and state.cache is not None and state.frames_out > 0

    before, abefore = state.clone(), astate.clone()
    snap, asnap = state.clone(), astate.clone()
    assert snap.pending is not state.pending and snap.cache is not state.cache
    assert (state.conv_cache is not None) == (conv > 0)
    assert conv == 0 or snap.conv_cache is not state.conv_cache
    assert asnap.buffer is not astate.buffer

    def continue_from(s, a_s):
        enc, ad = [], []
        for piece in torch.split(feats[:, half:], 16, dim=1):
            out, s = encoder.stream(piece, s)
            a, a_s = adapter.stream(out, a_s)
            enc.append(out)
            ad.append(a)
        out, s = encoder.stream(torch.zeros(1, 0, F), s, final=True)
        a, a_s = adapter.stream(out, a_s)
        return torch.cat([*enc, out], dim=1), torch.cat([*ad, a], dim=1)

    runs = [continue_from(state, astate), continue_from(state, astate), continue_from(snap, asnap)]
    for enc, ad in runs[1:]:
        assert torch.equal(enc, runs[0][0])
        assert torch.equal(ad, runs[0][1])

    # The continuations left the snapshot untouched.
    assert state.frames_out == before.frames_out
    for x, y in zip(_state_tensors(state), _state_tensors(before)):
        assert torch.equal(x, y)
    assert torch.equal(astate.buffer, abefore.buffer)

    # And the whole thing is the offline result.
    ref, ref_lens = encoder(feats, torch.tensor([feats.shape[1]]))
    ref_ad, _ = adapter(ref, ref_lens)
    assert max_diff(runs[0][0], ref[:, state.frames_out :]) <= ATOL
    assert max_diff(torch.cat([*first, runs[0][1]], dim=1), ref_ad) <= ATOL


# ------------------------------------------------------------------------------------ paper sizes


def test_paper_parameter_counts():
    with torch.device("meta"):
        encoder = SpeechEncoder(EncoderConfig())
        adapter = SpeechAdapter(AdapterConfig(), 1024, 3584)
    assert encoder.output_dim == 1024 and encoder.frame_rate_hz == 25.0
    n_enc = sum(p.numel() for p in encoder.parameters())
    n_ad = sum(p.numel() for p in adapter.parameters())
    assert abs(n_enc - PAPER_ENCODER_PARAMS) <= 0.005 * PAPER_ENCODER_PARAMS, n_enc
    assert abs(n_ad - PAPER_ADAPTER_PARAMS) <= 0.005 * PAPER_ADAPTER_PARAMS, n_ad
    assert n_enc == PAPER_ENCODER_PARAMS, (
        f"encoder has {n_enc:,} parameters, paper config gives {PAPER_ENCODER_PARAMS:,}"
    )
    assert n_ad == PAPER_ADAPTER_PARAMS, f"adapter has {n_ad:,} parameters, paper config gives {PAPER_ADAPTER_PARAMS:,}"


# ------------------------------------------------------------------------------------ dynamic chunk


def test_dynamic_chunk_draws():
    encoder = make_encoder(dynamic_chunk=True, max_dynamic_chunk=6, chunk_frames=4, left_chunks=3)
    encoder.train()
    random.seed(1234)
    draws = [encoder.training_chunk() for _ in range(500)]
    full = [d for d in draws if d == (0, -1)]
    chunked = [d for d in draws if d != (0, -1)]
    assert full and chunked
    assert 0.35 < len(full) / len(draws) < 0.65  # full_context_prob = 0.5
    assert all(1 <= c <= 6 and left == 3 for c, left in chunked)
    assert {c for c, _ in chunked} == set(range(1, 7))

    encoder.eval()
    assert {encoder.training_chunk() for _ in range(50)} == {(4, 3)}
    static = make_encoder(dynamic_chunk=False, chunk_frames=4, left_chunks=3).train()
    assert {static.training_chunk() for _ in range(50)} == {(4, 3)}


def test_dynamic_chunk_forward_uses_the_draw():
    encoder = make_encoder(dynamic_chunk=True, max_dynamic_chunk=6).train()  # dropout is 0
    feats = random_feats(90, seed=12)
    lens = torch.tensor([90])
    seen = set()
    for seed in range(6):
        random.seed(seed)
        c, left = encoder.training_chunk()
        seen.add(c == 0)
        random.seed(seed)
        with torch.no_grad():
            out, _ = encoder(feats, lens)
            ref, _ = encoder(feats, lens, chunk_frames=c, left_chunks=left)
        assert torch.equal(out, ref)
    assert seen == {True, False}


# ------------------------------------------------------------------------------------ padding


@pytest.mark.parametrize(
    ("c", "left", "conv"), [(0, -1, 0), (1, 2, 0), (2, 1, 0), (4, -1, 0), (5, 0, 0), (0, -1, 5), (4, 2, 5)]
)
@torch.no_grad()
def test_padding_does_not_leak(c, left, conv):
    encoder = make_encoder(chunk_frames=max(c, 1), left_chunks=left, conv_kernel=conv)
    adapter = make_adapter()
    long_len, short_len = 157, 93
    batch = random_feats(long_len, seed=13, batch=2)
    batch[1, short_len:] = 1e3 * torch.randn(long_len - short_len, F)  # garbage padding
    lens = torch.tensor([long_len, short_len])
    out, out_lens = encoder(batch, lens, chunk_frames=c, left_chunks=left)
    assert out_lens.tolist() == [subsampled_length(long_len), subsampled_length(short_len)]
    n = int(out_lens[1])
    alone, _ = encoder(batch[1:, :short_len], torch.tensor([short_len]), chunk_frames=c, left_chunks=left)
    first, _ = encoder(batch[:1], lens[:1], chunk_frames=c, left_chunks=left)
    assert torch.isfinite(out).all()
    assert max_diff(out[1:, :n], alone) <= 1e-5
    assert max_diff(out[:1], first) <= 1e-5

    ad, ad_lens = adapter(out, out_lens)
    ad_alone, _ = adapter(alone, out_lens[1:])
    m = int(ad_lens[1])
    assert m == adapter_length(n)
    assert max_diff(ad[1:, :m], ad_alone) <= 1e-5


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("chunk_frames", [0, -1])
def test_full_context_encoder_cannot_stream(chunk_frames):
    encoder = make_encoder(chunk_frames=chunk_frames, left_chunks=-1)
    with pytest.raises(ValueError, match="cannot stream"):
        encoder.stream(random_feats(20, seed=0), encoder.init_state(1))


@torch.no_grad()
def test_lexical_adapter_streams_like_offline_and_stays_causal():
    torch.manual_seed(5)
    adapter = SpeechAdapter(AdapterConfig(lexical=True), D, D_LLM, num_units=7).eval()
    # with the conv path's Linear at zero the output is exactly the word vectors of the two
    # newest frames (it starts near zero in stage input_2_align)
    assert adapter.proj.weight.abs().max() < 0.01
    x = torch.randn(1, 13, D)
    adapter.lexicon.normal_()
    nn.init.zeros_(adapter.proj.weight)
    out, _ = adapter(x, torch.tensor([13]))
    words = adapter.ctc(x).softmax(-1) @ adapter.lexicon
    words = nn.functional.pad(words, (0, 0, 1, 0))  # output t holds frames 2t - 1 and 2t
    assert torch.allclose(out[0], words[0].reshape(7, 2, D_LLM).sum(1), atol=1e-5)
    nn.init.normal_(adapter.proj.weight, std=0.1)
    ref, _ = adapter(x, torch.tensor([13]))
    for sizes in ([1] * 13, [3, 5, 5], [13]):
        state, parts = adapter.init_state(1), []
        for piece in torch.split(x, sizes, dim=1):
            o, state = adapter.stream(piece, state)
            parts.append(o)
        assert torch.allclose(torch.cat(parts, 1), ref[:, : sum(p.shape[1] for p in parts)], atol=1e-5)
    with torch.enable_grad():
        for t in range(7):
            xg = x.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(adapter(xg, torch.tensor([13]))[0][0, t].sum(), xg)
            assert torch.all(grad[0, 2 * t + 1 :] == 0) and torch.all(grad[0, : max(0, 2 * t - 4)] == 0)
