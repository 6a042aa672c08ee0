"""Ratio loss ([H] Eq. 10, METHOD §6): pushes the fraction of kept tokens towards 1/N.

Shape legend: B batch, L grid positions. Uses the NATURAL mask (before tail dropping); forced
corners are included in both means.
"""
from __future__ import annotations

import torch


def ratio_loss(boundary_prob: torch.Tensor, boundary_mask: torch.Tensor, target_n: float = 4.0,
               group_size: int = 16) -> torch.Tensor:
    """L = mean_g N/(N-1) * ((N-1) F_g G_g + (1 - F_g)(1 - G_g)), over groups of consecutive
    samples; a smaller last group is weighted by its size (identical to [R] when B % 16 == 0).

    F_g (mean of the mask) carries no gradient; G_g (mean of p) does:
    dL/dG = N/(N-1) (N F - 1). Minimum 1 at F = G = 1/N.
    """
    if target_n <= 1:
        raise ValueError(f"ratio loss target N must be > 1, got {target_n}")
    B = boundary_prob.shape[0]
    p = boundary_prob.float()
    f = boundary_mask.float()
    total = p.new_zeros(())
    for start in range(0, B, group_size):
        pg, fg = p[start:start + group_size], f[start:start + group_size]
        F_g, G_g = fg.mean(), pg.mean()
        term = target_n / (target_n - 1) * ((target_n - 1) * F_g * G_g + (1 - F_g) * (1 - G_g))
        total = total + term * pg.shape[0] / B
    return total


def ratio_loss_from_aux(aux, target_n: float = 4.0, group_size: int = 16) -> torch.Tensor:
    """Average of the ratio loss over the chunking stages in a model's `aux`."""
    if not aux:
        raise ValueError("ratio loss needs the model's aux (per-stage router outputs); got none")
    losses = [ratio_loss(s.boundary_prob, s.boundary_mask, target_n, group_size) for s in aux]
    return torch.stack(losses).mean()
