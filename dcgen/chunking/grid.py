"""Everything that depends on the rank of the token grid lives here (METHOD §12).

Shape legend: B batch, L = prod(G) grid positions, D width, G = (g_1, ..., g_n) the grid, n its rank.
Raster order: the LAST axis varies fastest, flat index i = sum_a u_a * prod_{b>a} g_b. Every
"first", "earliest" and tie rule in dcgen refers to this order.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn as nn

Grid = tuple[int, ...]


def check_grid(grid: Sequence[int]) -> Grid:
    grid = tuple(int(g) for g in grid)
    if not 1 <= len(grid) <= 3 or any(g < 1 for g in grid):
        raise ValueError(f"grid must have rank 1, 2 or 3 with positive sides, got {grid}")
    return grid


def numel(grid: Sequence[int]) -> int:
    return math.prod(grid)


def per_axis(value, n: int, name: str) -> tuple:
    """Broadcast a scalar or a length-n sequence to a length-n tuple."""
    if isinstance(value, (int, float)):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} needs one value per grid axis ({n}), got {value}")
    return value


# --------------------------------------------------------------------------------------------
# Layout conversions
# --------------------------------------------------------------------------------------------

def tokens_to_grid(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, L, D) -> (B, D, *G)."""
    B, L, D = x.shape
    assert L == numel(grid), (L, grid)
    return x.transpose(1, 2).reshape(B, D, *grid)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, D, *G) -> (B, L, D)."""
    return x.flatten(2).transpose(1, 2)


def coordinates(grid: Grid, device=None) -> torch.Tensor:
    """(L, n) int64 coordinates of every flat index, raster order."""
    axes = [torch.arange(g, device=device) for g in grid]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=1)


def corner_indices(grid: Grid) -> tuple[int, ...]:
    """Flat indices of the forced boundaries: the origin and the far corner (METHOD §3.1)."""
    L = numel(grid)
    return (0,) if L == 1 else (0, L - 1)


def forced_mask(L: int, device=None) -> torch.Tensor:
    """(L,) bool, True at `corner_indices` of a grid of L positions: the one definition the
    router and tail dropping use (built on the device: no host index tensor copied over)."""
    forced = torch.zeros(L, dtype=torch.bool, device=device)
    forced[0] = forced[L - 1] = True
    return forced


# --------------------------------------------------------------------------------------------
# Convolutions by rank
# --------------------------------------------------------------------------------------------

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv_nd(n: int, c_in: int, c_out: int, kernel=3, stride=1, padding=None, **kw) -> nn.Module:
    """Conv1d/2d/3d by rank. `kernel` a scalar or per-axis tuple; 'same' zero padding k//2
    unless given (kernels must be odd for 'same')."""
    if n not in _CONV:
        raise ValueError(f"grid rank must be 1, 2 or 3, got {n}")
    k = per_axis(kernel, n, "kernel")
    if padding is None:
        if any(ki % 2 == 0 for ki in k):
            raise ValueError(f"'same' padding needs odd kernels, got {k}")
        padding = tuple(ki // 2 for ki in k)
    return _CONV[n](c_in, c_out, k, stride=stride, padding=padding, **kw)


class FactorisedConv(nn.Module):
    """(1, k, k) spatial conv followed by (k, 1, 1) temporal conv, in place of a k^3 conv
    (video option, METHOD §12)."""

    def __init__(self, c_in: int, c_out: int, k: int = 3):
        super().__init__()
        self.spatial = conv_nd(3, c_in, c_out, (1, k, k))
        self.temporal = conv_nd(3, c_out, c_out, (k, 1, 1))

    def forward(self, x):
        return self.temporal(self.spatial(x))


def make_conv(n: int, c_in: int, c_out: int, kernel=3) -> nn.Module:
    """A 'same' conv used inside encoder/decoder/router: kernel int, per-axis tuple, or the
    string 'factorised' (rank 3 only)."""
    if kernel == "factorised":
        if n != 3:
            raise ValueError("kernel='factorised' is only defined for rank-3 grids")
        return FactorisedConv(c_in, c_out)
    return conv_nd(n, c_in, c_out, kernel)


# --------------------------------------------------------------------------------------------
# Position embedding (METHOD §2.7)
# --------------------------------------------------------------------------------------------

def sincos_1d(width: int, pos: torch.Tensor) -> torch.Tensor:
    """[sin(x w_k) | cos(x w_k)], w_k = 10000^(-k/(width/2)), float64."""
    assert width % 2 == 0
    half = width // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    arg = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def sincos_pos_embed(grid: Grid, dim: int, coord_scale: float = 1.0) -> torch.Tensor:
    """(L, dim) fp32 fixed N-D sin-cos table in raster order.

    One 1D block per axis, fastest axis first; each block 2*floor(dim/(2n)) wide, the even
    remainder added to the slowest axis (the last block). At n = 2 this is the MAE/DiT table
    (first half = column, second half = row) bit for bit.
    """
    n = len(grid)
    if dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even width, got {dim}")
    w = 2 * (dim // (2 * n))
    widths = [w] * n
    widths[0] += dim - n * w  # axis 1 (slowest) gets the remainder
    coords = coordinates(grid).to(torch.float64) * coord_scale  # (L, n)
    blocks = [sincos_1d(widths[a], coords[:, a]) for a in reversed(range(n))]
    return torch.cat(blocks, dim=1).float()


# --------------------------------------------------------------------------------------------
# Separable operations for the de-chunk (METHOD §5.2)
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def gaussian_band(g: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """(g, g) banded Toeplitz matrix K[i, j] = exp(-(i-j)^2 / (2 sigma^2)) for |i-j| <= ceil(6 sigma).

    The unnormalised kernel; truncation at 6 sigma keeps the separable sum within fp32 rounding
    of the dense one (4 sigma would leave ~3e-5)."""
    r = math.ceil(6 * sigma)
    idx = torch.arange(g, device=device, dtype=torch.float64)
    diff = idx[:, None] - idx[None, :]
    k = torch.exp(-diff**2 / (2 * sigma**2))
    k = torch.where(diff.abs() <= r, k, torch.zeros_like(k))
    return k.to(dtype)


def separable_gaussian(x: torch.Tensor, grid: Grid, sigmas: Sequence[float]) -> torch.Tensor:
    """Convolve (B, L, C) grid data with the per-axis Gaussian, zero padding, axis by axis.

    Implemented as one banded (g_a x g_a) matmul per axis; cost O(B L C sum_a g_a)."""
    B, L, C = x.shape
    y = x.reshape(B, *grid, C)
    for a, (g, s) in enumerate(zip(grid, sigmas)):
        if g == 1:
            continue  # exp(0) = 1: a length-1 axis leaves the data unchanged
        K = gaussian_band(g, s, device=x.device, dtype=x.dtype)  # symmetric
        # contract axis (a + 1) of y with K: move it next to C so one matmul does it
        y = torch.movedim(y, a + 1, -1)  # (B, ..., C, g)
        y = y @ K
        y = torch.movedim(y, -1, a + 1)
    return y.reshape(B, L, C)


_INF = 1 << 40  # sentinel: > any squared distance, no overflow in int64 when added to one


def nearest_kept_source(mask: torch.Tensor, grid: Grid, weights: Sequence[int] | None = None,
                        max_elems: int = 1 << 24) -> torch.Tensor:
    """Exact nearest kept position for every grid position, ties to the earliest raster index.

    mask (B, L) bool with at least one True per row. Returns (B, L) int64 flat indices.
    Distance-transform decomposition, fastest axis first (METHOD §5.2 b): along every line of
    axis a, position i takes the FIRST argmin over j of d(j) + w_a (i - j)^2. Identical to the
    dense argmin over kept tokens, ties included. Integer arithmetic throughout.
    """
    B, L = mask.shape
    n = len(grid)
    w = per_axis(1 if weights is None else weights, n, "plug-back weights")
    dev = mask.device
    flat = torch.arange(L, device=dev).expand(B, L)
    d = torch.where(mask, torch.zeros((), dtype=torch.int64, device=dev),
                    torch.full((), _INF, dtype=torch.int64, device=dev))
    s = torch.where(mask, flat, torch.zeros_like(flat))
    d = d.reshape(B, *grid)
    s = s.reshape(B, *grid)
    for a in reversed(range(n)):
        g = grid[a]
        if g == 1:
            continue
        pos = torch.arange(g, device=dev)
        cost = int(w[a]) * (pos[:, None] - pos[None, :]) ** 2  # (i, j)
        dl = torch.movedim(d, a + 1, -1)
        sl = torch.movedim(s, a + 1, -1)
        shape = dl.shape
        dl = dl.reshape(-1, g)
        sl = sl.reshape(-1, g)
        new_d = torch.empty_like(dl)
        new_s = torch.empty_like(sl)
        rows = max(1, max_elems // (g * g))  # tile lines to bound the (rows, g, g) temporary
        for r0 in range(0, dl.shape[0], rows):
            dd = dl[r0:r0 + rows]
            total = dd[:, None, :] + cost[None]  # (rows, i, j)
            best, j = total.min(dim=2)  # min returns the first index among ties
            new_d[r0:r0 + rows] = best
            new_s[r0:r0 + rows] = torch.gather(sl[r0:r0 + rows], 1, j)
        d = torch.movedim(new_d.reshape(shape), -1, a + 1)
        s = torch.movedim(new_s.reshape(shape), -1, a + 1)
    return s.reshape(B, L)
