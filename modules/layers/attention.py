"""Chunk attention masks and multi-head self-attention with relative positions.

Glossary: B batch, H heads, Tq query frames, Tk key frames, D model width, Dk = D / H.
Masks are boolean with True = may attend.

Chunk attention (WeNet-style): frames are grouped into chunks of `chunk_frames`; a frame sees
every frame of its own chunk and of the `left_chunks` chunks before it, nothing later. That
bounds both the look-ahead (the rest of the chunk) and the left context, so a streaming encoder
needs only a fixed-size key/value cache. `chunk_frames <= 0` means full (bidirectional) context;
`left_chunks < 0` means unlimited left context.

Positions are relative: the attention score adds a term on the distance `query - key` (the
Transformer-XL form, with learned biases u and v). The released Freeze-Omni drops the
relative shift, which turns that term into one on the key's absolute position and makes
streaming drift after 17 chunks; with true distances the encoder behaves the same at any
depth into a stream, and the cached keys need no position bookkeeping.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def chunk_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, chunk_frames: int, left_chunks: int) -> torch.Tensor:
    """Bool [Tq, Tk]: may query frame `query_pos[i]` attend to key frame `key_pos[j]`.

    Positions are absolute frame indices of one stream, so the same function builds the
    full-utterance training mask and the mask of a streaming step over cached keys.
    """
    if chunk_frames <= 0:
        return torch.ones(len(query_pos), len(key_pos), dtype=torch.bool, device=query_pos.device)
    q_chunk = torch.div(query_pos, chunk_frames, rounding_mode="floor")[:, None]
    k_chunk = torch.div(key_pos, chunk_frames, rounding_mode="floor")[None, :]
    allowed = k_chunk <= q_chunk
    if left_chunks >= 0:
        allowed &= k_chunk >= q_chunk - left_chunks
    return allowed


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encoding [N, dim] of (possibly negative) positions [N]."""
    inv = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = positions.to(torch.float32)[:, None] * inv[None, :]
    out = torch.zeros(len(positions), dim, device=positions.device)
    out[:, 0::2] = torch.sin(angles)
    out[:, 1::2] = torch.cos(angles)
    return out


class RelPositionAttention(nn.Module):
    """Multi-head self-attention whose scores add a term on the query-key distance.

    score(i, j) = ((q_i + u) . k_j + (q_i + v) . W_pos PE(i - j)) / sqrt(Dk)
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.h, self.dk = num_heads, d_model // num_heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(num_heads, self.dk))
        self.pos_bias_v = nn.Parameter(torch.zeros(num_heads, self.dk))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.h, self.dk).transpose(1, 2)  # (B, H, T, Dk)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, cache: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend from `x [B, Tq, D]` to the cached keys followed by `x` itself.

        mask: bool [B or 1, Tq, Tk] with Tk = cached frames + Tq (cached keys come first).
        cache: [2, B, H, Tc, Dk] keys and values of earlier frames, or None.
        Returns (out [B, Tq, D], new cache [2, B, H, Tc + Tq, Dk]).
        """
        b, tq, _ = x.shape
        q = self._heads(self.linear_q(x))
        k = self._heads(self.linear_k(x))
        v = self._heads(self.linear_v(x))
        if cache is not None and cache.shape[3] > 0:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        tk = k.shape[2]
        tc = tk - tq
        # Distances i - j for query i (absolute tc + i) and key j: from -(tq - 1) to tk - 1.
        dist = torch.arange(tk - 1, -tq, -1, device=x.device)  # [R], R = tk + tq - 1, descending
        pos = self.linear_pos(sinusoid(dist, self.h * self.dk).to(x.dtype))  # [R, D]
        pos = pos.view(-1, self.h, self.dk).transpose(0, 1)  # (H, R, Dk)
        bd = torch.matmul(q + self.pos_bias_v[None, :, None].to(q.dtype), pos.transpose(-1, -2))  # (B, H, Tq, R)
        # dist[r] = tk - 1 - r, so the distance (tc + i) - j sits at r = tk - 1 - tc - i + j.
        idx = (tk - 1 - tc) - torch.arange(tq, device=x.device)[:, None] + torch.arange(tk, device=x.device)[None, :]
        bd = torch.gather(bd, 3, idx.expand(b, self.h, tq, tk))  # (B, H, Tq, Tk)
        bias = (bd / math.sqrt(self.dk)).masked_fill(~mask[:, None], float("-inf"))
        out = nn.functional.scaled_dot_product_attention(
            q + self.pos_bias_u[None, :, None].to(q.dtype),
            k,
            v,
            attn_mask=bias,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, Tq, Dk)
        out = out.transpose(1, 2).reshape(b, tq, self.h * self.dk)
        return self.linear_out(out), torch.stack([k, v])
