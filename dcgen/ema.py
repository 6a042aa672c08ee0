"""Exponential moving average of the weights, updated once per optimiser step (METHOD §7.1)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    """Keeps a frozen copy of the model; starts as an exact copy (decay 0.9999 in the paper)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0 <= decay < 1:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module):
        ema_p = list(self.model.parameters())
        src_p = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_p)]
        torch._foreach_lerp_(ema_p, src_p, 1 - self.decay)  # e += (1 - decay) (p - e)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd)
