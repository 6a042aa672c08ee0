"""Dense O(M^2) / O(L M) reference formulas of METHOD §5.1: the oracles the chunking core is checked
against (tests, and tools/gpu_check.py on a device). The library's own paths never build these
(B, M, M) / (L, M) tensors."""
from __future__ import annotations

import torch

from . import grid as G


def dense_plug_back(mask: torch.Tensor, grid, weights=None) -> torch.Tensor:
    """(B, L) raster index of the nearest kept position, ties to the earliest kept (dense argmin)."""
    B, L = mask.shape
    n = len(grid)
    w = torch.tensor(G.per_axis(1 if weights is None else weights, n, "w"), dtype=torch.int64)
    u = G.coordinates(grid)  # (L, n)
    out = torch.empty(B, L, dtype=torch.int64)
    for b in range(B):
        kept = torch.nonzero(mask[b]).squeeze(1)  # (M,) increasing raster index
        diff = u[:, None, :] - u[kept][None, :, :]  # (L, M, n)
        d2 = (diff**2 * w).sum(-1)  # (L, M) exact integers
        m = torch.argmin(d2, dim=1)  # first minimiser = earliest kept token
        out[b] = kept[m]
    return out


def dense_dechunk(z: torch.Tensor, mask: torch.Tensor, p: torch.Tensor, grid, sigma, weights=None):
    """(B, L, D) de-chunk output from packed (T, D) z, in float64."""
    B, L = mask.shape
    n = len(grid)
    sig = torch.tensor(G.per_axis(sigma, n, "sigma"), dtype=torch.float64)
    u = G.coordinates(grid).to(torch.float64)
    src = dense_plug_back(mask, grid, weights)
    out = []
    start = 0
    for b in range(B):
        kept = torch.nonzero(mask[b]).squeeze(1)
        M = kept.numel()
        h = z[start:start + M].double()
        start += M
        ph = p[b, kept].double().clamp(1e-4, 1 - 1e-4)
        diff = u[kept][:, None, :] - u[kept][None, :, :]  # (M, M, n)
        W = torch.exp(-(diff**2 / (2 * sig**2)).sum(-1)) * ph[None, :]  # (M, M), source confidence
        ht = W @ h / (W.sum(1, keepdim=True) + 1e-8)
        o = ph[:, None] * h + (1 - ph[:, None]) * ht  # (M, D)
        slot = torch.full((L,), -1, dtype=torch.int64)
        slot[kept] = torch.arange(M)
        out.append(o[slot[src[b]]])
    return torch.stack(out)


def random_mask(B, grid, density, gen, force_corners=True):
    L = G.numel(grid)
    mask = torch.rand(B, L, generator=gen) < density
    if force_corners:
        mask[:, list(G.corner_indices(grid))] = True
    else:
        mask[mask.sum(1) == 0, 0] = True
    return mask


def randomise_zero_inits(model, seed=0, router_bias=0.0):
    """Fresh models output exactly zero: give the zero-initialised layers values and set the
    router's last bias, so outputs, gradients and the number of kept tokens are all non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        if hasattr(model, "router") and hasattr(model.router, "residual_scorer"):
            model.router.residual_scorer[3].bias.fill_(router_bias)
    return model
