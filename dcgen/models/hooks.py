"""What a model family adds to a training step, declared by the model (`model.training_hooks(dc)`)
so the loop never asks which model it trains.

- `budget(step)`: the tail-drop ρ of this step and the ratio loss's target N (METHOD §6).
- `auxiliary_loss(aux, n)`: a loss beside the objective's (DC-DiT: the ratio loss over its
  stages), added with weight `aux_weight`; None when there is none.

The plain DiT keeps every token and adds nothing (`TrainingHooks`); DC-DiT's multi-budget
schedule and ratio loss are `ChunkingHooks`. Distillation from an upcycling teacher is not a
model hook but a phase of the run (`dcgen.train.Distillation`).
"""
from __future__ import annotations

import torch


def dc_schedule(dc, step: int) -> tuple[float, float]:
    """(tail-drop rho, effective target N) for optimiser step `step`.

    rho: 0 before `multi_budget_start_step`, then one budget per step drawn uniformly from
    `budgets` by a CPU generator seeded with the step index ([R]'s draw): every rank and
    micro-step agrees without communication, and the sequence is reproducible.
    N: optional linear warm-up from n_start to target_n over n_warmup_steps."""
    rho = 0.0
    if dc.multi_budget and step >= dc.multi_budget_start_step and len(dc.budgets):
        g = torch.Generator().manual_seed(step)
        rho = float(dc.budgets[int(torch.randint(len(dc.budgets), (1,), generator=g))])
    n = float(dc.target_n)
    if dc.n_warmup_steps and dc.n_warmup_steps > 0:
        n = dc.n_start + (dc.target_n - dc.n_start) * min(1.0, step / dc.n_warmup_steps)
    return rho, n


class TrainingHooks:
    """A model that keeps every token: no tail drop, no auxiliary loss."""

    aux_weight = 0.0

    def __init__(self, dc):
        self.dc = dc

    def budget(self, step: int) -> tuple[float, float]:
        return 0.0, self.dc.target_n

    def auxiliary_loss(self, aux, target_n: float) -> torch.Tensor | None:
        return None


class ChunkingHooks(TrainingHooks):
    """DC-DiT: the multi-budget tail-drop schedule and the ratio loss of every stage."""

    @property
    def aux_weight(self) -> float:
        return self.dc.ratio_weight

    def budget(self, step: int) -> tuple[float, float]:
        return dc_schedule(self.dc, step)

    def auxiliary_loss(self, aux, target_n: float) -> torch.Tensor:
        from ..chunking import ratio_loss
        return torch.stack([ratio_loss(s.boundary_prob, s.boundary_mask, target_n, self.dc.ratio_group_size)
                            for s in aux]).mean()
