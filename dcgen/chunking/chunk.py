"""Chunk (grid -> packed kept tokens) and de-chunk (packed -> grid), an inverse pair sharing one
`ChunkIndex` (METHOD §4, §5).

Shape legend: B batch, L = prod(G) grid positions, M_b kept tokens of sample b, T = sum_b M_b
packed tokens, D width, G grid. Packed order: sample by sample, each in increasing raster index.
Nothing here builds a (B, L, M) or (B, M, M) tensor: smoothing is separable on the grid and the
plug-back uses an exact separable nearest-token search.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from . import grid as G
from .router import RoutingModuleOutput


@dataclass
class ChunkIndex:
    """Which grid positions are kept and where they sit in the packed sequence."""

    grid: G.Grid
    kept_mask: torch.Tensor  # (B, L) bool, after tail dropping
    lengths: torch.Tensor  # (B,) int64, M_b
    lengths_host: list[int]  # M_b on the host (the one sync per forward packing needs)
    cu_seqlens: torch.Tensor  # (B + 1,) int32, [0, M_0, M_0 + M_1, ...]
    max_seqlen: int  # M
    flat_idx: torch.Tensor  # (T,) int64 index into the (B * L) flattened grid
    batch_idx: torch.Tensor  # (T,) int64 sample of each packed token
    pos_idx: torch.Tensor  # (T,) int64 raster index of each packed token
    slot_idx: torch.Tensor  # (T,) int64 position of each packed token inside its sample

    @property
    def batch_size(self) -> int:
        return self.kept_mask.shape[0]

    @property
    def total(self) -> int:
        return self.flat_idx.numel()

    @classmethod
    def from_mask(cls, kept: torch.Tensor, grid: G.Grid) -> "ChunkIndex":
        B, L = kept.shape
        lengths = kept.sum(1)  # (B,)
        lengths_host = lengths.tolist()  # host sync: packing needs T and M
        T = sum(lengths_host)
        flat_idx = torch.nonzero_static(kept.reshape(-1), size=T).squeeze(1)  # raster, per sample
        cu = torch.zeros(B + 1, dtype=torch.int32, device=kept.device)
        cu[1:] = torch.cumsum(lengths, 0)
        batch_idx = torch.div(flat_idx, L, rounding_mode="floor")
        pos_idx = flat_idx - batch_idx * L
        slot_idx = torch.arange(T, device=kept.device) - cu[:-1].long()[batch_idx]
        return cls(grid=tuple(grid), kept_mask=kept, lengths=lengths, lengths_host=lengths_host,
                   cu_seqlens=cu, max_seqlen=max(lengths_host) if lengths_host else 0,
                   flat_idx=flat_idx, batch_idx=batch_idx, pos_idx=pos_idx, slot_idx=slot_idx)


def tail_drop_mask(p: torch.Tensor, natural: torch.Tensor, rho, grid: G.Grid,
                   protect_forced: bool = True) -> torch.Tensor:
    """Kept mask after dropping the floor(rho * |B_b|) lowest-p natural boundaries per sample.

    rho: float or (B,) tensor. Forced corners are never dropped (unless `protect_forced` is
    False, reproducing [R]'s Q6). Ranking: p descending on the exact fp32 p, ties to the smaller
    raster index (a stable sort over raster order), so among equal p the later position goes first.
    """
    B, L = p.shape
    if not torch.is_tensor(rho):
        if rho == 0:
            return natural
        if not 0 <= rho < 1:
            raise ValueError(f"tail_drop must lie in [0, 1), got {rho}")
    rho = torch.as_tensor(rho, dtype=torch.float32, device=p.device).expand(B)
    n_nat = natural.sum(1)  # (B,)
    n_drop = torch.floor(rho * n_nat.float()).long()  # fp32 product, truncated (as [R])
    forced = torch.zeros(L, dtype=torch.bool, device=p.device)
    forced[0] = forced[L - 1] = True
    if protect_forced:
        ranked = natural & ~forced
        n_forced = (natural & forced).sum(1)
        n_drop = torch.minimum(n_drop, n_nat - n_forced)
        n_keep = n_nat - n_forced - n_drop  # non-forced boundaries to keep
    else:
        ranked = natural
        n_keep = n_nat - n_drop
    key = torch.where(ranked, p.float(), torch.full_like(p, -1.0, dtype=torch.float32))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices  # (B, L)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(L, device=p.device).expand(B, L))
    keep_ranked = ranked & (rank < n_keep[:, None])
    if protect_forced:
        return keep_ranked | (natural & forced)
    return keep_ranked


class ChunkLayer(nn.Module):
    """Select the kept tokens (natural boundaries minus the tail-dropped ones) and pack them."""

    def __init__(self, protect_forced: bool = True):
        super().__init__()
        self.protect_forced = protect_forced

    def forward(self, h: torch.Tensor, route: RoutingModuleOutput, grid: G.Grid,
                tail_drop=0.0) -> tuple[torch.Tensor, ChunkIndex]:
        B, L, D = h.shape
        kept = tail_drop_mask(route.boundary_prob, route.boundary_mask, tail_drop, grid,
                              self.protect_forced)
        idx = ChunkIndex.from_mask(kept, grid)
        return h.reshape(B * L, D)[idx.flat_idx], idx  # (T, D)


class DeChunkLayer(nn.Module):
    """Confidence-weighted Gaussian smoothing over the kept tokens, then nearest-kept plug-back.

    For kept tokens i, j of one sample (METHOD §5.1):
        W_ij = exp(-|u_i - u_j|^2 / (2 sigma^2)) * p_j,  h~_i = sum_j W_ij h_j / (sum_j W_ij + 1e-8)
        o_i  = p_i h_i + (1 - p_i) h~_i,                   p clamped to [1e-4, 1 - 1e-4]
    and every grid position copies o of its nearest kept token (ties: earliest in raster order).
    Runs in fp32 with autocast off.
    """

    def __init__(self, sigma=1.0, plug_weights=None, smoothing: bool = True):
        super().__init__()
        self.sigma = sigma
        self.plug_weights = plug_weights
        self.smoothing = smoothing  # False: the "no de-chunk smoothing" ablation ([P2] Table 3)

    def forward(self, z: torch.Tensor, idx: ChunkIndex, boundary_prob: torch.Tensor) -> torch.Tensor:
        grid = idx.grid
        B, L = boundary_prob.shape
        T, D = z.shape
        sigmas = G.per_axis(self.sigma, len(grid), "dechunk sigma")
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            if not self.smoothing:  # plug back the raw backbone outputs
                return z[plug_back_rows(idx, self.plug_weights)].view(B, L, D)
            p_hat = boundary_prob.float().clamp(1e-4, 1 - 1e-4).reshape(-1)[idx.flat_idx]  # (T,)
            src = torch.cat([z * p_hat[:, None], p_hat[:, None]], dim=1)  # (T, D+1): [p h | p]
            canvas = z.new_zeros(B * L, D + 1).index_copy(0, idx.flat_idx, src)
            smooth = G.separable_gaussian(canvas.view(B, L, D + 1), grid, sigmas)  # (B, L, D+1)
            smooth = smooth.reshape(B * L, D + 1)[idx.flat_idx]  # (T, D+1)
            h_tilde = smooth[:, :D] / (smooth[:, D:] + 1e-8)
            o = p_hat[:, None] * z + (1 - p_hat[:, None]) * h_tilde  # (T, D)
            return o[plug_back_rows(idx, self.plug_weights)].view(B, L, D)


def plug_back_rows(idx: ChunkIndex, weights=None) -> torch.Tensor:
    """(B * L,) packed row that every grid position copies (nearest kept, raster ties)."""
    src = G.nearest_kept_source(idx.kept_mask, idx.grid, weights)  # (B, L) raster index
    slot = torch.cumsum(idx.kept_mask, dim=1) - 1  # (B, L) slot id at kept positions
    rows = idx.cu_seqlens[:-1, None].long() + torch.gather(slot, 1, src)
    return rows.reshape(-1)


class _STE(torch.autograd.Function):
    """Forward exactly 1, backward identity (H-Net's confidence straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):
        return torch.ones_like(x)

    @staticmethod
    def backward(ctx, g):
        return g


def ste(x: torch.Tensor) -> torch.Tensor:
    return _STE.apply(x)
