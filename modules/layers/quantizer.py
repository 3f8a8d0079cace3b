"""Vector quantizers: one EMA codebook, and a group of them for a global (voice) vector.

Codebooks are buffers, not parameters: exponential moving averages of the vectors assigned to
each code update them (in training mode only), data-initialised on the first batch, with dead
codes restarted from the batch; checkpoints keep them. Under torch.distributed the statistics
are all-reduced so every rank keeps the same codebook.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


# --- vector quantization ------------------------------------------------------------------------
class VectorQuantizer(nn.Module):
    """One codebook [K, D] (a buffer) updated by exponential moving averages (no gradient).

    The first training batch initialises the codebook from its own vectors; a code whose EMA
    assignment count falls below `dead_code_threshold` times its fair share (vectors per batch /
    codes) is restarted at a random vector of the current batch. Relative to the fair share, one
    threshold serves the paper's 6,400 vectors per batch and a CPU run's 160. Statistics are
    summed over processes when torch.distributed is initialised.
    """

    def __init__(self, size: int, dim: int, decay: float = 0.99, dead_code_threshold: float = 0.1):
        super().__init__()
        self.size, self.dim, self.decay, self.dead_code_threshold = size, dim, decay, dead_code_threshold
        self.register_buffer("codebook", torch.randn(size, dim) / math.sqrt(dim))
        self.register_buffer("ema_count", torch.ones(size))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("initialized", torch.tensor(False))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest code per row of x [N, D] -> [N]."""
        book = self.codebook.float()
        dist2 = x.float().pow(2).sum(1, keepdim=True) - 2 * x.float() @ book.T + book.pow(2).sum(1)[None]
        return dist2.argmin(1)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.codebook)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (quantized with straight-through gradient [N, D], codes [N], commitment loss)."""
        if self.training and not bool(self.initialized):
            self._init_from(x.detach())
        codes = self.codes(x.detach())
        q = self.embed(codes).to(x.dtype)
        if self.training:
            self._ema_update(x.detach().float(), codes)
        commitment = F.mse_loss(x, q.detach())
        return x + (q - x).detach(), codes, commitment

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        picks = _sample_rows(x.float(), self.size)
        _broadcast(picks)
        fair = _global_count(len(x)) / self.size
        self.codebook.copy_(picks)
        self.ema_sum.copy_(picks * fair)
        self.ema_count.fill_(fair)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        onehot = F.one_hot(codes, self.size).float()  # [N, K]
        count, total = onehot.sum(0), onehot.T @ x
        _all_reduce(count, total)
        self.ema_count.mul_(self.decay).add_(count, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(total, alpha=1 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + self.size * 1e-5) * n  # Laplace smoothing
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        fair = float(count.sum()) / self.size
        dead = self.ema_count < self.dead_code_threshold * fair
        if dead.any():
            fresh = _sample_rows(x, int(dead.sum()))
            _broadcast(fresh)
            self.codebook[dead] = fresh
            self.ema_sum[dead] = fresh * fair
            self.ema_count[dead] = fair


def _sample_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """k rows of x, without replacement when there are enough (with small noise when repeated)."""
    if len(x) >= k:
        return x[torch.randperm(len(x), device=x.device)[:k]].clone()
    rows = x[torch.randint(len(x), (k,), device=x.device)]
    return rows + 1e-3 * rows.std() * torch.randn_like(rows)


def _global_count(n: int) -> float:
    """n summed over processes."""
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([float(n)])
        dist.all_reduce(t)
        return float(t)
    return float(n)


def _all_reduce(*tensors: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        for t in tensors:
            dist.all_reduce(t)


def _broadcast(t: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t, src=0)


def codebook_usage(codes: torch.Tensor, size: int) -> dict[str, float]:
    """Perplexity of the code distribution and the share of codes used at least once."""
    probs = torch.bincount(codes.flatten(), minlength=size).float()
    probs = probs / probs.sum().clamp(min=1)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum()
    return {"perplexity": float(entropy.exp()), "used": float((probs > 0).float().mean())}


class FactorizedQuantizer(nn.Module):
    """A `VectorQuantizer` looked up in a small space: x [N, D] -> Linear to `code_dim` -> unit
    length -> nearest code (a unit vector too) -> Linear back to D. With few dimensions and unit
    vectors, the nearest code is a cosine match and more of the codebook is in use early in
    training (the factorized, l2-normalized codes of ViT-VQGAN and DAC). Same interface."""

    def __init__(self, size: int, dim: int, code_dim: int, decay: float = 0.99, dead_code_threshold: float = 0.1):
        super().__init__()
        self.inner = VectorQuantizer(size, code_dim, decay, dead_code_threshold)
        self.proj_in, self.proj_out = nn.Linear(dim, code_dim), nn.Linear(code_dim, dim)

    def _low(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj_in(x).float(), dim=-1)

    def _unit_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.inner.embed(codes), dim=-1)

    def _nearest(self, low: torch.Tensor) -> torch.Tensor:
        return (low @ F.normalize(self.inner.codebook.float(), dim=-1).T).argmax(1)  # best cosine

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return self._nearest(self._low(x))

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self._unit_codes(codes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        low = self._low(x)
        if self.training and not bool(self.inner.initialized):
            self.inner._init_from(low.detach())
        codes = self._nearest(low.detach())
        q = self._unit_codes(codes)
        if self.training:
            self.inner._ema_update(low.detach(), codes)
        commitment = F.mse_loss(low, q.detach())
        return self.proj_out(low + (q - low).detach()).to(x.dtype), codes, commitment


class GlobalQuantizer(nn.Module):
    """The voice vector [B, 128] as 8 groups of 16 dims, each from its own codebook of 1024."""

    def __init__(self, dim: int, groups: int, codebook_size: int, ema_decay: float, dead_code_threshold: float):
        super().__init__()
        if dim % groups:
            raise ValueError(f"codec.global_dim {dim} is not a multiple of global_groups {groups}")
        self.groups = nn.ModuleList(
            VectorQuantizer(codebook_size, dim // groups, ema_decay, dead_code_threshold) for _ in range(groups)
        )

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """v [B, 128] -> (quantized [B, 128], global tokens [B, 8], commitment loss)."""
        parts = v.chunk(len(self.groups), dim=-1)
        outs = [vq(p) for vq, p in zip(self.groups, parts)]
        return (
            torch.cat([q for q, _, _ in outs], -1),
            torch.stack([c for _, c, _ in outs], -1),
            torch.stack([loss for _, _, loss in outs]).mean(),
        )

    def codes(self, v: torch.Tensor) -> torch.Tensor:
        """Voice vectors [B, 128] -> global tokens [B, 8] (nearest codes, no update)."""
        return torch.stack([vq.codes(p) for vq, p in zip(self.groups, v.chunk(len(self.groups), dim=-1))], -1)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Global tokens [B, 8] -> voice vector [B, 128]."""
        return torch.cat([vq.embed(tokens[..., i]) for i, vq in enumerate(self.groups)], -1)
