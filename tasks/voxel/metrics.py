"""Shape metrics for generated occupancy grids, and compression by region (METHOD §12).

Point-set metrics follow Achlioptas et al. 2018 / PointFlow (Yang et al. 2019) with the Chamfer
distance CD(X, Y) = mean_x min_y |x - y|^2 + mean_y min_x |y - x|^2 between surface samples:

- MMD: mean over references of the CD to the nearest sample (fidelity; lower is better).
- COV: share of references that are the nearest reference of at least one sample (diversity).
- 1-NNA: leave-one-out 1-nearest-neighbour accuracy of telling samples from references in their
  union; 50 % is ideal (indistinguishable), 100 % means every shape's nearest neighbour comes
  from its own set.

Both sets are treated identically: occupancy -> marching-cubes mesh -> `num_points` uniform
surface samples, all in the unit-cube frame. An empty occupancy has no surface; it is stood in
for by points at a far sentinel (CD ~ 300 to any shape, 0 to another empty one), so empty
samples count as far from every reference, and `num_empty` reports them.

Occupancy IoU is reported against the nearest reference by IoU (a per-shape fidelity number;
IoU between unpaired shapes means little otherwise) and from each reference to its best sample.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import occupancy_to_mesh

SENTINEL = 10.0  # stand-in point for shapes without a surface, far outside the unit cube


def as_occupancy(x: Any) -> np.ndarray:
    """(N, 1, R, R, R) or (N, R, R, R) data-space values or bools -> (N, R, R, R) bool (> 0)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 5:
        if x.shape[1] != 1:
            raise ValueError(f"voxel metrics: expected one channel, got shape {x.shape}")
        x = x[:, 0]
    if x.ndim != 4:
        raise ValueError(f"voxel metrics: expected (N, [1,] X, Y, Z), got shape {x.shape}")
    return x > 0 if x.dtype != bool else x


def surface_points(occupancy: Any, num_points: int = 2048, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, R, R, R) occupancies -> (points (N, P, 3) float32, empty (N,) bool): uniform samples
    on each marching-cubes surface. The generator is seeded by `seed` and the grid's content,
    so identical shapes get identical points (CD 0: a copied training shape is seen as one)
    and different shapes independent ones."""
    import zlib

    import trimesh

    occ = as_occupancy(occupancy)
    pts = np.full((occ.shape[0], num_points, 3), SENTINEL, dtype=np.float32)
    empty = np.zeros(occ.shape[0], dtype=bool)
    for i in range(occ.shape[0]):
        mesh = occupancy_to_mesh(occ[i])
        if mesh is None or mesh.area <= 0:
            empty[i] = True
            continue
        key = zlib.crc32(np.packbits(occ[i]).tobytes())
        p, _ = trimesh.sample.sample_surface(mesh, num_points, seed=[seed, key])
        pts[i] = p
    return torch.from_numpy(pts), torch.from_numpy(empty)


def chamfer_matrix(a: torch.Tensor, b: torch.Tensor, device: str | torch.device | None = None,
                   max_elements: int = 1 << 25) -> torch.Tensor:
    """Pairwise Chamfer distances (n, m) float64 between point sets a (n, P, 3) and b (m, Q, 3).
    Blocks of pairs go through one `torch.cdist` each, holding at most `max_elements` distances."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n, P, _ = a.shape
    m, Q, _ = b.shape
    out = torch.empty(n, m, dtype=torch.float64)
    per = max(1, int(math.sqrt(max_elements / (P * Q))))  # rows and columns per block
    for i in range(0, n, per):
        x = a[i:i + per].to(device, torch.float32)                            # (bi, P, 3)
        for j in range(0, m, per):
            y = b[j:j + per].to(device, torch.float32)                        # (bj, Q, 3)
            d = torch.cdist(x.reshape(-1, 3), y.reshape(-1, 3)).square()      # (bi P, bj Q)
            d = d.view(x.shape[0], P, y.shape[0], Q)
            ab = d.amin(3).mean(1)                                            # (bi, bj)
            ba = d.amin(1).mean(2)                                            # (bi, bj)
            out[i:i + per, j:j + per] = (ab + ba).double().cpu()
    return out


def mmd_cov_1nna(d_sr: torch.Tensor, d_ss: torch.Tensor, d_rr: torch.Tensor) -> dict:
    """MMD, COV and 1-NNA from distance matrices samples x references (n, m), samples x samples
    (n, n) and references x references (m, m)."""
    n, m = d_sr.shape
    mmd = d_sr.min(0).values.mean()
    cov = torch.unique(d_sr.argmin(1)).numel() / m
    full = torch.cat([torch.cat([d_ss, d_sr], 1), torch.cat([d_sr.T, d_rr], 1)], 0).clone()
    full.fill_diagonal_(float("inf"))
    is_sample = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(m, dtype=torch.bool)])
    nn = full.argmin(1)
    correct = is_sample[nn] == is_sample
    return {"mmd_cd": float(mmd), "cov_cd": float(cov), "1nna_cd": float(correct.float().mean()),
            "1nna_cd_samples": float(correct[:n].float().mean()),
            "1nna_cd_references": float(correct[n:].float().mean())}


def iou_matrix(a: Any, b: Any, device: str | torch.device | None = None,
               block: int = 256) -> torch.Tensor:
    """Pairwise occupancy IoU (n, m) of (n, R, R, R) and (m, R, R, R) occupancies (IoU of two
    empty grids is 1)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    a = torch.from_numpy(as_occupancy(a).reshape(len(a), -1))
    b = torch.from_numpy(as_occupancy(b).reshape(len(b), -1))
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.float64)
    nb = b.sum(1).double()
    for i in range(0, a.shape[0], block):
        x = a[i:i + block].to(device, torch.float32)
        for j in range(0, b.shape[0], block):
            y = b[j:j + block].to(device, torch.float32)
            inter = (x @ y.T).double().cpu()  # counts <= R^3 <= 2^24: exact in float32
            union = x.sum(1).double().cpu()[:, None] + nb[j:j + block][None] - inter
            out[i:i + block, j:j + block] = torch.where(union > 0, inter / union.clamp_min(1),
                                                        torch.ones_like(inter))
    return out


def shape_metrics(samples: Any, references: Any, num_points: int = 2048, seed: int = 0,
                  device: str | torch.device | None = None) -> dict:
    """Everything in this module's docstring for sample and reference occupancies."""
    s_occ, r_occ = as_occupancy(samples), as_occupancy(references)
    if len(s_occ) == 0 or len(r_occ) == 0:
        raise ValueError(f"voxel metrics need samples and references, got {len(s_occ)} and "
                         f"{len(r_occ)}")
    if s_occ.shape[1:] != r_occ.shape[1:]:
        raise ValueError(f"voxel metrics: sample grid {s_occ.shape[1:]} != reference grid "
                         f"{r_occ.shape[1:]}")
    s_pts, s_empty = surface_points(s_occ, num_points, seed)
    r_pts, _ = surface_points(r_occ, num_points, seed)
    d_sr = chamfer_matrix(s_pts, r_pts, device)
    d_ss = chamfer_matrix(s_pts, s_pts, device)
    d_rr = chamfer_matrix(r_pts, r_pts, device)
    out = mmd_cov_1nna(d_sr, d_ss, d_rr)
    iou = iou_matrix(s_occ, r_occ, device)
    out.update({"iou_nearest_ref": float(iou.max(1).values.mean()),
                "iou_ref_best_sample": float(iou.max(0).values.mean()),
                "num_samples": int(len(s_occ)), "num_references": int(len(r_occ)),
                "num_empty": int(s_empty.sum()), "num_points": int(num_points),
                "occupied_fraction": float(s_occ.mean()),
                "ref_occupied_fraction": float(r_occ.mean())})
    return out


# --------------------------------------------------------------------------------------------
# Compression by region (METHOD §12: empty space should compress strongly)
# --------------------------------------------------------------------------------------------

def compression_by_region(boundary_mask: torch.Tensor, occupancy: Any,
                          patch: int | Sequence[int]) -> dict:
    """Kept-token fractions per region of the token grid.

    boundary_mask: (B, L) kept tokens (raster order over the token grid).
    occupancy: (B, [1,] X, Y, Z) bools or data-space values (> 0 = occupied).
    patch: the model's patch size P (int or per axis); the token grid is (X/P, Y/P, Z/P).

    A token cell is `empty` when none of its P^3 voxels is occupied and `occupied` otherwise;
    occupied cells split into `surface` (partly occupied) and `interior` (fully occupied).
    Returns kept_fraction_<region> (kept tokens / tokens of that region, pooled over the batch;
    NaN when the region has no cells), compression_<region> = 1 / kept fraction,
    cells_<region> (the region's share of all cells) and kept_fraction_all."""
    occ = torch.as_tensor(as_occupancy(occupancy))
    B = occ.shape[0]
    P = (patch,) * 3 if isinstance(patch, int) else tuple(int(p) for p in patch)
    if any(g % p for g, p in zip(occ.shape[1:], P)):
        raise ValueError(f"voxel grid {tuple(occ.shape[1:])} is not divisible by patch {P}")
    frac = F.avg_pool3d(occ[:, None].float(), kernel_size=P, stride=P)[:, 0]  # (B, X/P, Y/P, Z/P)
    frac = frac.reshape(B, -1)
    mask = torch.as_tensor(boundary_mask).reshape(B, -1).to(torch.bool).cpu()
    if mask.shape != frac.shape:
        raise ValueError(f"boundary_mask {tuple(mask.shape)} does not match the token grid of "
                         f"occupancy {tuple(occ.shape[1:])} at patch {P} ({frac.shape[1]} cells)")
    regions = {"empty": frac == 0, "occupied": frac > 0, "surface": (frac > 0) & (frac < 1),
               "interior": frac == 1}
    out = {"kept_fraction_all": float(mask.float().mean())}
    for name, sel in regions.items():
        n = int(sel.sum())
        kept = float((mask & sel).sum()) / n if n else float("nan")
        out[f"kept_fraction_{name}"] = kept
        out[f"compression_{name}"] = 1.0 / kept if n and kept > 0 else float("nan")
        out[f"cells_{name}"] = n / sel.numel()
    return out


@torch.no_grad()
def model_region_compression(model, objective, x0: torch.Tensor, y: torch.Tensor | None = None,
                             t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                             tail_drop: float = 0.0) -> dict:
    """Run a DC-DiT on clean voxels `x0` (B, 1, X, Y, Z) noised at `t` by `objective` (its own
    `training_losses`, so Gaussian and flow objectives both work) and split the first chunking
    stage's kept tokens by region of x0 (`compression_by_region`)."""
    model.eval()
    _, aux = objective.training_losses(model, x0, y, t=t, noise=noise, tail_drop=tail_drop)
    if not aux:
        raise ValueError("model_region_compression needs a DC-DiT (the model returned no aux)")
    grid = tuple(aux[0].grid)
    patch = tuple(g // tg for g, tg in zip(x0.shape[2:], grid))
    return compression_by_region(aux[0].kept_mask, x0, patch)
