"""Synthetic class-conditional fields on a grid of rank 1-3, generated per index.

Why this shape of data: a learned router only has something to learn when a sample mixes flat
areas (cheap: merge them) and detail (expensive: keep boundaries). Each sample is a constant
background plus one or two shapes with sharp edges whose type, pattern frequency and colour depend
on the class, so the router's decisions are both data- and class-dependent.

Reproducibility without storage: sample `i` is drawn from a `torch.Generator` seeded from
`(seed, i)` only, so any process, worker or rank regenerates the same sample.

Class k (when num_classes > 0):
    shape type  = k % 4: 0 solid box, 1 solid ball, 2 stripes inside a box, 3 concentric rings
                  inside a ball (rank 1-2; a 3-D checker inside the ball for rank 3)
    frequency   = 2 + k // 4 (stripe / checker / ring count across the shape)
    colour      = a fixed per-class colour, jittered per sample
Background values lie in [-0.95, -0.6], shape values in [-0.35, 1], so the two never coincide
and every sample has a sharp edge.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

SHAPE_TYPES = ("box", "ball", "stripes", "rings")
_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates (seed, index) pairs


def sample_generator(seed: int, index: int) -> torch.Generator:
    """A generator that depends on (seed, index) only."""
    g = torch.Generator()
    g.manual_seed((int(seed) * _SEED_MIX + int(index) * 2654435761 + 12345) % (2 ** 63))
    return g


def class_colour(k: int, channels: int) -> torch.Tensor:
    """A fixed colour per class (independent of the dataset seed), values in [0.1, 1]."""
    g = torch.Generator()
    g.manual_seed(1_000_003 + int(k))
    return 0.1 + 0.9 * torch.rand(channels, generator=g)


def _unit_coords(grid: tuple[int, ...]) -> list[torch.Tensor]:
    """Per-axis pixel-centre coordinates in [0, 1], broadcastable over the grid."""
    n = len(grid)
    out = []
    for a, g in enumerate(grid):
        c = (torch.arange(g, dtype=torch.float32) + 0.5) / g
        shape = [1] * n
        shape[a] = g
        out.append(c.reshape(shape))
    return out


def make_sample(index: int, grid: tuple[int, ...], channels: int, num_classes: int,
                seed: int) -> tuple[torch.Tensor, int]:
    """Sample `index`: x float32 (C, *grid) in [-1, 1] and its label (0 if unconditional)."""
    g = sample_generator(seed, index)
    rnd = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    if num_classes > 0:
        y = int(index) % num_classes  # balanced classes, label recoverable from the index
        kind, freq = y % 4, 2 + y // 4
        colour = class_colour(y, channels)
    else:
        y = 0
        kind = int(torch.randint(0, 4, (1,), generator=g))
        freq = 2 + int(torch.randint(0, 3, (1,), generator=g))
        colour = 0.1 + 0.9 * rnd(channels)
    n = len(grid)
    coords = _unit_coords(grid)
    bg = -0.95 + 0.35 * rnd(1)  # background in [-0.95, -0.6]
    x = bg.expand(channels, *grid).clone()

    n_shapes = 1 + int(rnd(1) < 0.35)
    for j in range(n_shapes):
        # Centre on a pixel centre so the shape always covers at least that pixel (tiny grids).
        centre = [(int(rnd(1) * (0.5 * s)) + int(0.25 * s) + 0.5) / s for s in grid]
        # Half-extent per axis; the optional second shape is smaller so that even in rank 1 at
        # least about half of the positions stay background.
        # Higher ranks get slightly larger extents so shapes still fill a visible volume.
        scale = (1.0, 1.25, 1.5)[n - 1] * (0.6 if j else 1.0)
        half = [(0.08 + 0.08 * float(rnd(1))) * scale for _ in range(n)]
        d = [(c - m) / h for c, m, h in zip(coords, centre, half)]  # normalised offsets
        if kind in (0, 2):
            region = torch.stack(torch.broadcast_tensors(*[di.abs() for di in d])).amax(0) <= 1
        else:
            r2 = sum(di ** 2 for di in d)
            region = r2 <= 1
        col = (colour * (0.8 + 0.2 * rnd(channels))).clamp(0.1, 1.0)
        fill = col.view(-1, *([1] * n)).expand(channels, *grid)
        if kind == 2:  # stripes along a class-dependent axis, confined to the box
            axis = freq % n
            phase = torch.floor((d[axis] + 1) * freq)
            alt = torch.remainder(phase, 2).expand(*grid)
            fill = torch.where(alt.bool(), fill, -0.35 + 0.25 * fill)
        elif kind == 3:  # rings for rank 1/2 read as a checker in rank 3; both are detail
            rr = torch.sqrt(sum(di ** 2 for di in d)) if n < 3 else None
            band = (torch.floor(rr * freq) if rr is not None
                    else sum(torch.floor((di + 1) * freq) for di in d))
            alt = torch.remainder(band, 2).expand(*grid)
            fill = torch.where(alt.bool(), fill, -0.35 + 0.25 * fill)
        x = torch.where(region.expand(*grid), fill, x)
    return x.float(), y


class ToyDataset(Dataset):
    """Map-style dataset of `(x float32 (C, *grid), y int64)`; nothing is stored."""

    def __init__(self, grid: tuple[int, ...], channels: int, num_classes: int,
                 num_samples: int, seed: int = 0):
        self.grid, self.channels, self.num_classes = tuple(grid), int(channels), int(num_classes)
        self.num_samples, self.seed = int(num_samples), int(seed)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"toy index {index} out of range for {self.num_samples} samples")
        index = index % self.num_samples
        x, y = make_sample(index, self.grid, self.channels, self.num_classes, self.seed)
        return x, torch.tensor(y, dtype=torch.int64)

    def stack(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `n` samples as one batch (reference statistics, previews)."""
        n = len(self) if n is None else min(int(n), len(self))
        xs, ys = zip(*(self[i] for i in range(n)))
        return torch.stack(xs), torch.stack(ys)


def flat_fraction(x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Per sample, the share of positions whose value equals the next one along every axis
    (all channels): how much of the field a router could merge. x: (N, C, *grid) -> (N,)."""
    n = x.dim() - 2
    flat = torch.ones(x.shape[0], *x.shape[2:], dtype=torch.bool, device=x.device)
    for a in range(n):
        diff = (x.diff(dim=2 + a).abs() <= tol).all(1)
        pad = torch.ones_like(diff.narrow(1 + a, 0, 1))  # last slice has no successor
        flat &= torch.cat([diff, pad], dim=1 + a)
    return flat.flatten(1).float().mean(1)


def sharp_edge_count(x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Per sample, the number of neighbouring pairs that differ (any axis, any channel)."""
    n = x.dim() - 2
    total = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for a in range(n):
        total += (x.diff(dim=2 + a).abs() > tol).any(1).flatten(1).sum(1)
    return total


__all__ = ["ToyDataset", "make_sample", "sample_generator", "class_colour", "flat_fraction",
           "sharp_edge_count", "SHAPE_TYPES"]
