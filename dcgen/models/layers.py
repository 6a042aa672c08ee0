"""Building blocks shared by DiT and DC-DiT: embedders, N-D patch embedding, norms, conv blocks,
the final layer and unpatchify.

Shape legend: B batch, C data channels, G token grid (rank n), P patch per axis, L = prod(G),
D backbone width, D_e encoder/decoder width.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..chunking import grid as G


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def fp32_call(module: nn.Module, *args):
    """Call `module` with fp32 parameters: how the fp32 islands (router, residual_proj) run in a
    model whose weights were cast to another dtype. Free (a plain call) when they already are fp32;
    otherwise the module runs on fp32 copies (gradients still reach the original weights)."""
    params = dict(module.named_parameters())
    if all(p.dtype == torch.float32 for p in params.values()):
        return module(*args)
    return torch.func.functional_call(module, {k: p.float() for k, p in params.items()}, args)


class TimestepEmbedder(nn.Module):
    """256-dim [cos | sin] sinusoid of t followed by Linear -> SiLU -> Linear (DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                                device=t.device) / half)
        arg = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
        if dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # the fp32 sinusoid in the weights' dtype (a no-op for fp32 weights; autocast casts anyway)
        return self.mlp(self.sinusoid(t, self.freq_dim).to(self.mlp[0].weight.dtype))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class embedding with a null row at index `num_classes` (classifier-free guidance). Label
    dropout is the training loop's (`train.label_dropout`, drawn rank-invariantly), not the
    model's: one knob."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y is None:
            raise ValueError("this model is class-conditional: pass labels y (use index "
                             f"{self.num_classes} for the null label)")
        return self.embedding_table(y)


class RMSNorm(nn.Module):
    """Learnable RMSNorm, fp32 math, output in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


class PatchEmbedND(nn.Module):
    """N-D patch embedding to (B, L, D) tokens in raster order, no position embedding.

    mode 'overlap' (DC-DiT default): kernel P+2, stride P, padding 1 (kernel 3, stride 1 at P = 1).
    mode 'dit': kernel P, stride P, no padding (DiT's patchify).
    """

    def __init__(self, in_channels: int, dim: int, patch: Sequence[int], mode: str = "overlap"):
        super().__init__()
        n = len(patch)
        self.patch = tuple(patch)
        if mode == "overlap":
            k, pad = tuple(p + 2 for p in patch), 1
        elif mode == "dit":
            k, pad = tuple(patch), 0
        else:
            raise ValueError(f"unknown patch_mode '{mode}' (valid: overlap, dit)")
        self.proj = G.conv_nd(n, in_channels, dim, k, stride=tuple(patch), padding=pad)

    def token_grid(self, spatial: Sequence[int]) -> G.Grid:
        for s, p in zip(spatial, self.patch):
            if s % p:
                raise ValueError(f"input size {tuple(spatial)} is not divisible by patch {self.patch}")
        return tuple(s // p for s, p in zip(spatial, self.patch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return G.grid_to_tokens(self.proj(x))  # (B, L, D)

    def reset_parameters(self):
        w = self.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)


def unpatchify(x: torch.Tensor, grid: G.Grid, patch: Sequence[int], channels: int) -> torch.Tensor:
    """(B, L, prod(P) * C) -> (B, C, g_1 P_1, ..., g_n P_n); within a token (P_1..P_n, C),
    channels fastest (DiT order)."""
    B = x.shape[0]
    n = len(grid)
    x = x.reshape(B, *grid, *patch, channels)
    # (B, g1..gn, P1..Pn, C) -> (B, C, g1, P1, g2, P2, ...)
    perm = [0, 2 * n + 1] + [i for a in range(n) for i in (1 + a, 1 + n + a)]
    x = x.permute(*perm)
    return x.reshape(B, channels, *(g * p for g, p in zip(grid, patch)))


class ConvBlock(nn.Module):
    """Stable-Diffusion ResBlock with additive conditioning (METHOD §2.3), N-D.

    h = conv1(SiLU(GN(x))); h += Linear(SiLU(c)); h = conv2(SiLU(GN(h))); out = h + skip(x).
    C_mid = min(C_in, C_out): a widening block widens in conv2 and skip, a narrowing one in conv1.
    """

    def __init__(self, c_in: int, c_out: int, cond_dim: int, grid_rank: int, kernel=3,
                 groups: int = 32):
        super().__init__()
        for c in (c_in, min(c_in, c_out)):
            if c % groups:
                raise ValueError(f"conv-block width {c} is not divisible by {groups} GroupNorm "
                                 "groups (set norm_groups or a width that is)")
        c_mid = min(c_in, c_out)
        n = grid_rank
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-5)
        self.conv1 = G.make_conv(n, c_in, c_mid, kernel)
        self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, c_mid))
        self.norm2 = nn.GroupNorm(groups, c_mid, eps=1e-5)
        self.conv2 = G.make_conv(n, c_mid, c_out, kernel)
        self.skip_proj = G.conv_nd(n, c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.grid_rank = n

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_mid, *G)
        h = h + self.cond_proj(c).view(*c.shape[:1], -1, *([1] * self.grid_rank))
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C_out, *G)
        return h + self.skip_proj(x)


class ConvStack(nn.Module):
    """Conv blocks on the full grid followed by an RMSNorm: the DC-DiT encoder and decoder."""

    def __init__(self, widths: Sequence[int], cond_dim: int, grid_rank: int, kernel=3,
                 groups: int = 32):
        super().__init__()
        self.layers = nn.ModuleList(
            ConvBlock(a, b, cond_dim, grid_rank, kernel, groups) for a, b in zip(widths[:-1], widths[1:]))
        self.rmsnorm = RMSNorm(widths[-1])

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: G.Grid) -> torch.Tensor:
        h = G.tokens_to_grid(x, grid)  # (B, C, *G)
        for layer in self.layers:
            h = layer(h, c)
        return self.rmsnorm(G.grid_to_tokens(h))  # (B, L, C_out)


class FinalLayer(nn.Module):
    """LN (no affine) -> adaLN shift/scale from c -> Linear to the per-token output (DiT)."""

    def __init__(self, hidden: int, cond_dim: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # (B, hidden) each
        x = modulate(self.norm_final(x), shift[:, None], scale[:, None])  # (B, L, hidden)
        return self.linear(x)  # (B, L, out_dim)

    def zero_init(self):
        for m in (self.linear, self.adaLN_modulation[-1]):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
