"""Chunk (grid -> packed kept tokens) and de-chunk (packed -> grid), an inverse pair sharing one
`ChunkIndex` (METHOD §4, §5).

Shape legend: B batch, L = prod(G) grid positions, M_b kept tokens of sample b, T = sum_b M_b
packed tokens, D width, G grid. Packed order: sample by sample, each in increasing raster index.
Nothing here builds a (B, L, M) or (B, M, M) tensor: smoothing is separable on the grid and the
plug-back uses an exact separable nearest-token search.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import grid as G
from .router import RoutingModuleOutput


@dataclass
class PackInfo:
    """What attention needs to know about a packed sequence of B segments (T tokens): built once
    per forward. `ChunkIndex` extends it with where the tokens came from."""

    cu_seqlens: torch.Tensor  # (B + 1,) int32
    max_seqlen: int
    kept_counts_host: list[int]  # M_b on the host (the one sync per forward)
    batch_idx: torch.Tensor  # (T,) sample of each token
    slot_idx: torch.Tensor  # (T,) position of each token inside its sample

    @property
    def batch_size(self) -> int:
        return len(self.kept_counts_host)

    @functools.cached_property
    def padded_rows(self) -> torch.Tensor:
        """(T,) row of each packed token in the (B * M) padded layout."""
        return self.batch_idx * self.max_seqlen + self.slot_idx

    @functools.cached_property
    def key_padding(self) -> torch.Tensor:
        """(B, 1, 1, M) True where a key is a real token."""
        lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        ar = torch.arange(self.max_seqlen, device=lengths.device)
        return (ar[None, :] < lengths[:, None])[:, None, None, :]

    @functools.cached_property
    def xformers_bias(self):
        """Built once per forward and shared by every block."""
        import xformers.ops as xops
        return xops.fmha.attn_bias.BlockDiagonalMask.from_seqlens(self.kept_counts_host)

    @property
    def uniform(self) -> bool:
        """All samples have the same length: packed == padded, no mask needed."""
        return min(self.kept_counts_host) == self.max_seqlen

    @property
    def pad_waste(self) -> float:
        """Share of the padded layout's B * M^2 attention scores that belong to padding."""
        M = self.max_seqlen
        if M == 0:
            return 0.0
        return 1.0 - sum(m * m for m in self.kept_counts_host) / (self.batch_size * M * M)

    @classmethod
    def from_lengths(cls, lengths: list[int], device=None) -> "PackInfo":
        lengths_t = torch.tensor(lengths, device=device, dtype=torch.int64)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lengths_t, 0)
        batch_idx = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths_t)
        slot_idx = torch.arange(int(cu[-1]), device=device) - cu[:-1].long()[batch_idx]
        return PackInfo(cu_seqlens=cu, max_seqlen=max(lengths), kept_counts_host=list(lengths),
                        batch_idx=batch_idx, slot_idx=slot_idx)


@dataclass
class ChunkIndex(PackInfo):
    """Which grid positions are kept and where they sit in the packed sequence (the packing
    fields are PackInfo's: no copies)."""

    grid: G.Grid
    kept_mask: torch.Tensor  # (B, L) bool, after tail dropping
    kept_counts: torch.Tensor  # (B,) int64, M_b
    flat_idx: torch.Tensor  # (T,) int64 index into the (B * L) flattened grid
    pos_idx: torch.Tensor  # (T,) int64 raster index of each packed token

    @property
    def total(self) -> int:
        return self.flat_idx.numel()

    @classmethod
    def from_mask(cls, kept: torch.Tensor, grid: G.Grid) -> "ChunkIndex":
        B, L = kept.shape
        lengths = kept.sum(1)  # (B,)
        lengths_host = lengths.tolist()  # the host sync of a forward: packing needs T and M
        T = sum(lengths_host)
        flat_idx = torch.nonzero_static(kept.reshape(-1), size=T).squeeze(1)  # raster, per sample
        cu = torch.zeros(B + 1, dtype=torch.int32, device=kept.device)
        cu[1:] = torch.cumsum(lengths, 0)
        batch_idx = torch.div(flat_idx, L, rounding_mode="floor")
        pos_idx = flat_idx - batch_idx * L
        slot_idx = torch.arange(T, device=kept.device) - cu[:-1].long()[batch_idx]
        return cls(grid=tuple(grid), kept_mask=kept, kept_counts=lengths, kept_counts_host=lengths_host,
                   cu_seqlens=cu, max_seqlen=max(lengths_host) if lengths_host else 0,
                   flat_idx=flat_idx, batch_idx=batch_idx, pos_idx=pos_idx, slot_idx=slot_idx)


def tail_drop_mask(p: torch.Tensor, natural: torch.Tensor, tail_drop, grid: G.Grid,
                   protect_forced: bool = True) -> torch.Tensor:
    """Kept mask after dropping the floor(tail_drop * |B_b|) lowest-p natural boundaries per sample
    (the budget ρ of METHOD §6).

    tail_drop: float or (B,) tensor. Forced corners are never dropped (unless `protect_forced` is
    False, reproducing [R]'s Q6). Ranking: p descending on the exact fp32 p, ties to the smaller
    raster index (a stable sort over raster order), so among equal p the later position goes first.
    """
    B, L = p.shape
    if not torch.is_tensor(tail_drop):
        if tail_drop == 0:
            return natural
        if not 0 <= tail_drop < 1:
            raise ValueError(f"tail_drop must lie in [0, 1), got {tail_drop}")
    tail_drop = torch.as_tensor(tail_drop, dtype=torch.float32, device=p.device).expand(B)
    n_nat = natural.sum(1)  # (B,)
    n_drop = torch.floor(tail_drop * n_nat.float()).long()  # fp32 product, truncated (as [R])
    forced = G.forced_mask(L, p.device)
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
