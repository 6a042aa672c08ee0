"""Routers: score every grid position, keep those with p > 0.5 (METHOD §3).

Shape legend: B batch, L grid positions, D width, D_r router bottleneck, G grid.
All routers run in fp32 with autocast disabled; the origin and the far corner are forced to
p = 1 (no gradient reaches their logits), so every sample keeps at least one token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import grid as G


@dataclass
class RoutingModuleOutput:
    boundary_prob: torch.Tensor  # (B, L) fp32, p
    boundary_mask: torch.Tensor  # (B, L) bool, natural decision p > 0.5 (before tail dropping)
    selected_probs: torch.Tensor  # (B, L) fp32, kappa = p if boundary else 1 - p


def finish_probs(p: torch.Tensor, grid: G.Grid) -> RoutingModuleOutput:
    """Force the corners, threshold strictly at 0.5, and form the natural confidence."""
    B, L = p.shape
    forced = G.forced_mask(L, p.device)
    # torch.where sends no gradient to the replaced entries, so the forced logits get none
    p = torch.where(forced, torch.ones((), device=p.device, dtype=p.dtype), p)
    mask = p > 0.5
    kappa = torch.where(mask, p, 1 - p)
    return RoutingModuleOutput(boundary_prob=p, boundary_mask=mask, selected_probs=kappa)


class RoutingModule(nn.Module):
    """v2 spatial-predictability router ([P2] Eq. 1): a boundary is where the local context fails
    to predict a token.

        z = 1x1(E); r = z - k3(z); logit = 1x1(SiLU(GN8(k3(r)))); p = sigmoid(logit)
    """

    def __init__(self, dim: int, grid_rank: int, router_dim: int | None = None, kernel=3,
                 mask_center: bool = False, bias_init: float = -1.1):
        super().__init__()
        r = router_dim or dim // 4
        if r % 8:
            raise ValueError(f"router width {r} must be divisible by 8 (GroupNorm(8))")
        n = grid_rank
        self.proj = G.conv_nd(n, dim, r, 1)
        self.context_predictor = G.make_conv(n, r, r, kernel)
        self.residual_scorer = nn.Sequential(
            G.make_conv(n, r, r, kernel), nn.GroupNorm(8, r, eps=1e-5), nn.SiLU(), G.conv_nd(n, r, 1, 1))
        self.mask_center = mask_center
        if mask_center and not isinstance(self.context_predictor, nn.modules.conv._ConvNd):
            raise ValueError("mask_center needs a plain (not factorised) context predictor")
        nn.init.constant_(self.residual_scorer[3].bias, bias_init)  # sigmoid(-1.1) ~ 0.25 ~ 1/N

    def _predict(self, z):
        if not self.mask_center:
            return self.context_predictor(z)
        conv = self.context_predictor
        w = conv.weight.clone()
        centre = tuple(k // 2 for k in w.shape[2:])
        w[(slice(None), slice(None), *centre)] = 0  # predict a token from its neighbours only
        return conv._conv_forward(z, w, conv.bias)

    def forward(self, e: torch.Tensor, grid: G.Grid) -> RoutingModuleOutput:
        with torch.autocast(e.device.type, enabled=False):
            x = G.tokens_to_grid(e.float(), grid)  # (B, D, *G)
            z = self.proj(x)  # (B, D_r, *G)
            res = z - self._predict(z)
            logit = self.residual_scorer(res)  # (B, 1, *G)
            p = torch.sigmoid(logit.flatten(1))  # (B, L)
            return finish_probs(p, grid)


class CosineRouter(nn.Module):
    """v1 router ([P1]; ablation `router=cosine`): dissimilarity between a token's query and the
    local average of its neighbours' keys, p = clamp((1 - cos)/2, 0, 1)."""

    def __init__(self, dim: int, grid_rank: int):
        super().__init__()
        n = grid_rank
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.k_avg = G.conv_nd(n, dim, dim, 3, groups=dim, bias=False)
        with torch.no_grad():
            self.q_proj.weight.copy_(torch.eye(dim))
            self.k_proj.weight.copy_(torch.eye(dim))
            self.k_avg.weight.fill_(1.0 / 3**n)
        for m in (self.q_proj, self.k_proj):
            m._dcgen_keep_init = True  # excluded from the model's blanket re-init

    def forward(self, e: torch.Tensor, grid: G.Grid) -> RoutingModuleOutput:
        with torch.autocast(e.device.type, enabled=False):
            e = e.float()
            q = F.normalize(self.q_proj(e), dim=-1)
            k = F.normalize(self.k_proj(e), dim=-1)
            kbar = G.grid_to_tokens(self.k_avg(G.tokens_to_grid(k, grid)))
            s = (q * kbar).sum(-1)
            p = ((1 - s) / 2).clamp(0, 1)
            return finish_probs(p, grid)


class CausalCosineRouter(nn.Module):
    """H-Net's original rule on 1D sequences ([H]): p_t = (1 - cos(q_{t-1}, k_t))/2, p_0 = 1.
    Only for rank-1 ablations (`router=cosine_causal`)."""

    def __init__(self, dim: int, grid_rank: int):
        super().__init__()
        if grid_rank != 1:
            raise ValueError("router=cosine_causal is defined for 1D grids only")
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.q_proj.weight.copy_(torch.eye(dim))
            self.k_proj.weight.copy_(torch.eye(dim))
        for m in (self.q_proj, self.k_proj):
            m._dcgen_keep_init = True

    def forward(self, e: torch.Tensor, grid: G.Grid) -> RoutingModuleOutput:
        with torch.autocast(e.device.type, enabled=False):
            e = e.float()
            q = F.normalize(self.q_proj(e[:, :-1]), dim=-1)
            k = F.normalize(self.k_proj(e[:, 1:]), dim=-1)
            p = ((1 - (q * k).sum(-1)) / 2).clamp(0, 1)
            p = F.pad(p, (1, 0), value=1.0)
            return finish_probs(p, grid)


def build_router(kind: str, dim: int, grid_rank: int, **kw) -> nn.Module:
    if kind == "predictability":
        return RoutingModule(dim, grid_rank, **kw)
    if kind == "cosine":
        return CosineRouter(dim, grid_rank)
    if kind == "cosine_causal":
        return CausalCosineRouter(dim, grid_rank)
    raise ValueError(f"unknown router '{kind}' (valid: predictability, cosine, cosine_causal)")
