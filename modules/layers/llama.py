"""Llama-style transformer layers for the speech decoder: RMSNorm, rotary positions, SwiGLU.

One `DecoderLayer` serves three roles (reference section 4.1): bidirectional over the text in
the pre-network, bidirectional over the LLM hidden states in the prefix decoder (whose keys and
values become a KV prefix of the shared stack), and the shared NAR/AR stack itself, which
prefills the conditioning and then extends its cache one speech token at a time.

Positions are explicit per token (`[B, L]`), so padded batches whose parts sit at different
offsets rotate exactly as a single sequence would. Masks are boolean `[B, Lq, Lk]`, True = may
attend. Keys and values are cached after rotation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values [B, H, L, head_dim]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def rotary(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, L, head_dim] for integer positions [B, L] (the half-split RoPE of Llama)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv  # [B, L, hd/2]
    angles = torch.cat([angles, angles], -1)[:, None]
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, -1)
    return x * cos.to(x.dtype) + torch.cat([-b, a], -1) * sin.to(x.dtype)


class DecoderLayer(nn.Module):
    """Pre-norm self-attention (no biases) + SwiGLU MLP, with an optional KV prefix/cache."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float = 1e-6, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not a multiple of its {num_heads} heads")
        self.num_heads, self.head_dim, self.dropout = num_heads, dim // num_heads, dropout
        self.attn_norm = RMSNorm(dim, eps)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = RMSNorm(dim, eps)
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        past: KV | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """x [B, L, D]; mask [B, L, past + L]. Returns (output, (keys, values) of past + x)."""
        h = self.attn_norm(x)
        cos, sin = rope
        q = _rotate(self._heads(self.q_proj(h)), cos, sin)
        k = _rotate(self._heads(self.k_proj(h)), cos, sin)
        v = self._heads(self.v_proj(h))
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None], dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.o_proj(a.transpose(1, 2).reshape(x.shape))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)), (k, v)


class LayerStack(nn.Module):
    """Layers applied in turn; each may take its own past (KV) and returns its full KV."""

    def __init__(self, n: int, dim: int, num_heads: int, ffn_dim: int, eps: float, dropout: float, theta: float):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, num_heads, ffn_dim, eps, dropout) for _ in range(n))
        self.head_dim, self.theta = dim // num_heads, theta

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, past: list[KV] | None = None
    ) -> tuple[torch.Tensor, list[KV]]:
        rope = rotary(positions, self.head_dim, self.theta)
        kvs = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, rope, mask, None if past is None else past[i])
            kvs.append(kv)
        return x, kvs
