"""The streaming speech encoder: fbank -> global CMVN -> Conv2d x4 subsampling -> chunk transformer.

    feats [B, T, 80] (raw Kaldi fbank, 100 Hz) -> out [B, T', D] (25 Hz, T' = subsampled_length(T))

The encoder owns its CMVN statistics (buffers saved with its weights), so a checkpoint alone
turns raw fbank into encoder frames. Layers are pre-LN transformer blocks with relative-position
chunk attention (`modules.layers.attention`); the chunk size and the number of left chunks come from
the config (paper: 4 frames = 160 ms, 16 left chunks). With `dynamic_chunk`, every training
batch draws its own chunk size (WeNet-style: full context or 1..max_dynamic_chunk frames), so
one model serves any chunk size at inference.

Streaming (`init_state` / `stream`) consumes fbank frames as they arrive and emits encoder
frames one chunk at a time; the per-stream `EncoderState` holds the unconsumed fbank tail and
each layer's keys/values trimmed to the left context. Its output equals `forward` under the
same chunk mask. The model holds no per-stream attributes: one instance serves many streams.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from datamodules.features import GlobalCMVN
from modules.layers.attention import RelPositionAttention, chunk_mask
from modules.layers.subsampling import RECEPTIVE_FIELD, STRIDE, Conv2dSubsampling4, subsampled_length

FRAME_RATE_HZ = 25.0  # encoder frames per second (fbank at 100 Hz, subsampled by 4)


@dataclass
class EncoderConfig:
    input_dim: int = 80
    subsampling_channels: int = 1024  # Conv2d channels of the front end
    d_model: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_dim: int = 4096
    dropout: float = 0.1
    attention_dropout: float = 0.0
    chunk_frames: int = 4  # encoder frames per chunk (4 x 40 ms = 160 ms); <= 0: full context
    left_chunks: int = 16  # chunks of left context; < 0: unlimited
    dynamic_chunk: bool = False  # draw the chunk size per training batch
    max_dynamic_chunk: int = 25
    full_context_prob: float = 0.5  # with dynamic_chunk: share of batches with full context
    conv_kernel: int = 0  # > 0: a causal depthwise-conv module in every block (Conformer-style); paper: 0


@dataclass
class CTCConfig:
    """The CTC head of stage input_1_ctc: outputs are BPE pieces or characters, plus the blank."""

    units: str = "bpe"  # bpe | char | llm (the LLM tokenizer's tokens: exact word vectors for adapter.lexical)
    bpe_vocab_size: int = 256  # BPE pieces, trained on the training transcripts at stage start
    vocab: str = " 'abcdefghijklmnopqrstuvwxyz0123456789"  # characters (the BPE's base alphabet)
    # > 0: an auxiliary character CTC on the output of this encoder layer (hierarchical CTC).
    # Characters teach the lower layers fast; word pieces at the top then skip the long
    # all-blank plateau that large-unit CTC sits in when trained alone.
    aux_layer: int = 0
    aux_weight: float = 0.5


@dataclass
class EncoderState:
    """Per-stream streaming state (B streams advancing together; B is usually 1).

    pending: [B, m, F] CMVN'd fbank frames not yet consumed by the subsampler.
    cache:   [L, 2, B, H, n, Dk] keys/values of the last n <= left-context encoder frames.
    frames_out: encoder frames emitted so far (a multiple of the chunk size until the end).
    conv_cache: [L, B, D, kernel - 1] inputs of each block's causal convolution (with conv_kernel > 0).
    """

    pending: torch.Tensor
    cache: torch.Tensor | None = None
    frames_out: int = 0
    conv_cache: torch.Tensor | None = None

    def clone(self) -> EncoderState:
        def copy(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.clone()

        return EncoderState(self.pending.clone(), copy(self.cache), self.frames_out, copy(self.conv_cache))

    def state_dict(self) -> dict:
        """Tensors (or None) and ints only: a session file loads with `torch.load(weights_only=True)`."""
        return {"pending": self.pending, "cache": self.cache, "frames_out": self.frames_out,
                "conv_cache": self.conv_cache}  # fmt: skip

    @classmethod
    def from_state_dict(cls, d: dict) -> EncoderState:
        return cls(d["pending"], d["cache"], int(d["frames_out"]), d["conv_cache"])


class CausalConvModule(nn.Module):
    """Conformer convolution module made causal: pointwise -> GLU -> depthwise conv over the
    past `kernel` frames -> LayerNorm -> SiLU -> pointwise. LayerNorm instead of BatchNorm keeps
    one stream's output independent of the batch. Its cache is the last `kernel - 1` GLU outputs.
    """

    def __init__(self, d_model: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.pointwise_in = nn.Linear(d_model, 2 * d_model)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel, groups=d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pointwise_out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, D], cache [B, D, kernel - 1] or None (zeros) -> (out [B, T, D], new cache)."""
        h = nn.functional.glu(self.pointwise_in(x), dim=-1).transpose(1, 2)  # (B, D, T)
        if cache is None:
            cache = h.new_zeros(h.shape[0], h.shape[1], self.kernel - 1)
        h = torch.cat([cache.to(h.dtype), h], dim=2)
        new_cache = h[:, :, h.shape[2] - (self.kernel - 1) :]
        h = self.depthwise(h).transpose(1, 2)  # (B, T, D)
        return self.pointwise_out(nn.functional.silu(self.norm(h))), new_cache


class EncoderLayer(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), [x + Conv(LN(x)),] then x + FFN(LN(x)) with a ReLU FFN."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.norm_attn = nn.LayerNorm(cfg.d_model)
        self.attn = RelPositionAttention(cfg.d_model, cfg.num_heads, cfg.attention_dropout)
        self.norm_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.ffn_dim),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.ffn_dim, cfg.d_model),
        )
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.conv_kernel > 0:
            self.norm_conv = nn.LayerNorm(cfg.d_model)
            self.conv = CausalConvModule(cfg.d_model, cfg.conv_kernel)
        else:
            self.conv = None

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        cache: torch.Tensor | None = None,
        conv_cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns (x, new attention K/V, new conv cache or None)."""
        h, kv = self.attn(self.norm_attn(x), mask, cache)
        x = x + self.dropout(h)
        if self.conv is not None:
            h, conv_cache = self.conv(self.norm_conv(x), conv_cache)
            x = x + self.dropout(h)
        x = x + self.dropout(self.ffn(self.norm_ffn(x)))
        return x, kv, conv_cache


class SpeechEncoder(nn.Module):
    """Streaming chunk-attention transformer encoder (see the module docstring)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("cmvn_mean", torch.zeros(cfg.input_dim))
        self.register_buffer("cmvn_istd", torch.ones(cfg.input_dim))
        self.subsampling = Conv2dSubsampling4(cfg.input_dim, cfg.subsampling_channels, cfg.d_model)
        self.embed = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_model), nn.LayerNorm(cfg.d_model), nn.Dropout(cfg.dropout), nn.ReLU()
        )
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)

    @property
    def output_dim(self) -> int:
        return self.cfg.d_model

    @property
    def frame_rate_hz(self) -> float:
        return FRAME_RATE_HZ

    def set_cmvn(self, cmvn: GlobalCMVN) -> None:
        if cmvn.dim != self.cfg.input_dim:
            raise ValueError(f"CMVN stats have {cmvn.dim} dims but the encoder takes {self.cfg.input_dim}")
        self.cmvn_mean.copy_(torch.as_tensor(cmvn.mean))
        self.cmvn_istd.copy_(torch.as_tensor(cmvn.istd))

    def normalize(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.cmvn_mean) * self.cmvn_istd

    def training_chunk(self) -> tuple[int, int]:
        """(chunk_frames, left_chunks) of one training batch."""
        cfg = self.cfg
        if not (self.training and cfg.dynamic_chunk):
            return cfg.chunk_frames, cfg.left_chunks
        if random.random() < cfg.full_context_prob:
            return 0, -1
        return random.randint(1, cfg.max_dynamic_chunk), cfg.left_chunks

    # --- offline ------------------------------------------------------------------------------
    def forward(
        self,
        feats: torch.Tensor,
        feats_lens: torch.Tensor,
        chunk_frames: int | None = None,
        left_chunks: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [B, T, F] raw fbank, feats_lens [B] -> (out [B, T', D], out_lens [B]).

        `chunk_frames` / `left_chunks` default to the config (or, training with
        `dynamic_chunk`, to a random draw); pass `chunk_frames=0` for full context.
        """
        out, out_lens, _ = self.encode(feats, feats_lens, chunk_frames, left_chunks)
        return out, out_lens

    def encode(
        self,
        feats: torch.Tensor,
        feats_lens: torch.Tensor,
        chunk_frames: int | None = None,
        left_chunks: int | None = None,
        tap_layer: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`forward`, plus the raw output of block `tap_layer` (1-based; None when 0)."""
        if chunk_frames is None:
            chunk_frames, left_default = self.training_chunk()
            left_chunks = left_default if left_chunks is None else left_chunks
        elif left_chunks is None:
            left_chunks = self.cfg.left_chunks
        out_lens = subsampled_length(feats_lens)
        if feats.shape[1] < RECEPTIVE_FIELD:  # too short for one output frame
            empty = feats.new_zeros(feats.shape[0], 0, self.cfg.d_model)
            return empty, out_lens, (empty if tap_layer else None)
        x = self.embed(self.subsampling(self.normalize(feats)))
        t = x.shape[1]
        pos = torch.arange(t, device=x.device)
        valid = pos[None, :] < out_lens[:, None]  # [B, T']
        # Padded query rows would see no key at all; let every frame see itself so the
        # softmax stays finite (their outputs are ignored downstream).
        mask = (chunk_mask(pos, pos, chunk_frames, left_chunks)[None] & valid[:, None, :]) | torch.eye(
            t, dtype=torch.bool, device=x.device
        )
        tapped = None
        for i, layer in enumerate(self.layers, 1):
            x, _, _ = layer(x, mask)
            if i == tap_layer:
                tapped = x
        return self.final_norm(x), out_lens, tapped

    # --- streaming ----------------------------------------------------------------------------
    def init_state(self, batch_size: int = 1) -> EncoderState:
        p = self.cmvn_mean
        return EncoderState(pending=torch.zeros(batch_size, 0, self.cfg.input_dim, device=p.device, dtype=p.dtype))

    def stream(
        self, feats: torch.Tensor, state: EncoderState, final: bool = False
    ) -> tuple[torch.Tensor, EncoderState]:
        """Feed raw fbank frames `feats [B, t, F]` (t may be 0); return the completed frames.

        Emits whole chunks only, until `final=True`, which also flushes the last partial
        chunk. Returns (out [B, n, D], new state); `state` itself is not modified, so a
        caller can keep it as a snapshot.
        """
        cfg = self.cfg
        if cfg.chunk_frames <= 0:
            raise ValueError("a full-context encoder (chunk_frames <= 0) cannot stream; train with chunks")
        pending = torch.cat([state.pending, self.normalize(feats)], dim=1)
        available = subsampled_length(pending.shape[1])
        n = available if final else (available // cfg.chunk_frames) * cfg.chunk_frames
        if n == 0:
            out = pending.new_zeros(pending.shape[0], 0, cfg.d_model)
            return out, EncoderState(pending, state.cache, state.frames_out, state.conv_cache)
        x = self.embed(self.subsampling(pending[:, : STRIDE * (n - 1) + RECEPTIVE_FIELD]))
        cached = 0 if state.cache is None else state.cache.shape[4]
        q_pos = torch.arange(state.frames_out, state.frames_out + n, device=x.device)
        k_pos = torch.arange(state.frames_out - cached, state.frames_out + n, device=x.device)
        mask = chunk_mask(q_pos, k_pos, cfg.chunk_frames, cfg.left_chunks)[None]
        keep = cfg.chunk_frames * cfg.left_chunks if cfg.left_chunks >= 0 else None
        new_cache, new_conv = [], []
        for i, layer in enumerate(self.layers):
            x, kv, conv = layer(
                x,
                mask,
                None if state.cache is None else state.cache[i],
                None if state.conv_cache is None else state.conv_cache[i],
            )
            new_cache.append(kv if keep is None else kv[:, :, :, kv.shape[3] - min(keep, kv.shape[3]) :])
            new_conv.append(conv)
        new_state = EncoderState(
            pending=pending[:, STRIDE * n :],
            cache=torch.stack(new_cache),
            frames_out=state.frames_out + n,
            conv_cache=torch.stack(new_conv) if self.layers[0].conv is not None else None,
        )
        return self.final_norm(x), new_state
