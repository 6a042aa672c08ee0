"""Classifier-free guidance as a model wrapper (METHOD §8, D18-D20).

`guided_model(model, s, null_label)` returns a callable with the model interface
`(x, t, y, tail_drop=None) -> (out, aux)` that the samplers use unchanged. For s ≠ 1 it runs ONE
forward on the doubled batch — inputs [x; x], labels [y; null], per-sample budgets [ρ_c; ρ_u] —
and returns the conditional half with the guided prediction

    ε̂ = ε_u + s·(ε_c − ε_u)

on all C prediction channels (`cfg_channels="all"`, the default) or on channels 0-2 only, with
channel 3.. taken from the conditional branch (`"legacy3"`, DiT's quirk kept for comparisons with
published DiT numbers; for C ≤ 3 the two modes coincide). The learned-variance channels
[C, 2C) always come from the conditional branch (D20). The same combination applies to the
velocity of the flow objective.

Lite-CFG ([P2] §3.5). Because DC-DiT takes a per-sample tail-drop fraction ρ, the two halves of
the guided batch can run at different budgets: the conditional branch at full compute
(ρ_c = 0.0) and the unconditional branch heavily pruned (ρ_u = 0.9), at s = 1.25. The
unconditional prediction only has to supply a coarse direction to push away from, so it
tolerates the pruning, and guidance costs far less than a second full forward. Use
`guided_model(model, 1.25, null, tail_drop=0.0, tail_drop_uncond=0.9)`; FLOPs are counted per
branch at its own ρ (§7.3). With ordinary CFG both halves share ρ (tail_drop_uncond=None).

The returned aux is the model's, untouched, for the doubled batch of 2B rows: rows [0, B) are
the conditional branch, [B, 2B) the unconditional one.
"""
from __future__ import annotations

import torch


def _per_sample(rho, B: int, device) -> torch.Tensor:
    """Scalar or (B,) tail-drop fraction -> (B,) float32 tensor."""
    rho = torch.as_tensor(rho, dtype=torch.float32, device=device)
    if rho.dim() == 0:
        return rho.expand(B)
    if rho.shape != (B,):
        raise ValueError(f"tail_drop must be a float or a ({B},) tensor, got shape {tuple(rho.shape)}")
    return rho


def check_tail_drop(rho, name: str = "tail_drop") -> None:
    """A budget is a number or a tensor with every value in [0, 1) (checked once, when a sampling
    wrapper is made, so a tensor budget is range-checked like a float one)."""
    vals = torch.as_tensor(rho, dtype=torch.float64).reshape(-1)
    if vals.numel() == 0 or not bool(((vals >= 0) & (vals < 1)).all()):
        shown = rho if not torch.is_tensor(rho) else vals.tolist()
        raise ValueError(f"{name} must lie in [0, 1), got {shown}")


def cfg_branches(num_classes: int, cfg_scale: float) -> int:
    """Model rows per sample in one sampling step: 2 when classifier-free guidance doubles the
    batch (a class-conditional model at cfg_scale != 1), else 1. The one place that decides it:
    the guided call, the sampling FLOP count and the evaluation's memory plan all ask here."""
    return 2 if num_classes > 0 and float(cfg_scale) != 1.0 else 1


class GuidedModel:
    """Callable with the model interface; see the module docstring and `guided_model`."""

    def __init__(self, model, cfg_scale: float, null_label: int, cfg_channels: str = "all",
                 tail_drop=0.0, tail_drop_uncond=None):
        if cfg_channels not in ("all", "legacy3"):
            raise ValueError(f"cfg_channels must be 'all' or 'legacy3', got {cfg_channels!r}")
        if null_label is None or int(null_label) < 0:
            raise ValueError(f"null_label must be a non-negative class index, got {null_label!r}")
        self.model, self.cfg_scale, self.null_label = model, float(cfg_scale), int(null_label)
        self.cfg_channels = cfg_channels
        check_tail_drop(tail_drop, "tail_drop")
        if tail_drop_uncond is not None:
            check_tail_drop(tail_drop_uncond, "tail_drop_uncond")
        self.tail_drop, self.tail_drop_uncond = tail_drop, tail_drop_uncond

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs):
        """The budgets are the wrapper's (ρ_c, and ρ_u for Lite-CFG): the one route by which
        tail_drop reaches the model while sampling."""
        if "tail_drop" in kwargs:
            raise TypeError("the tail-drop budget of a guided model is set when it is wrapped "
                            "(guided_model(..., tail_drop=, tail_drop_uncond=)), not per call")
        if cfg_branches(self.null_label + 1, self.cfg_scale) == 1:  # conditional by construction
            return self.model(x, t, y, tail_drop=self.tail_drop, **kwargs)
        if y is None:
            raise ValueError("classifier-free guidance needs labels y (model is unconditional?)")
        B, C = x.shape[0], x.shape[1]
        tail_drop_uncond = self.tail_drop if self.tail_drop_uncond is None else self.tail_drop_uncond
        x2 = torch.cat([x, x], dim=0)                                             # (2B, C, *G)
        t2 = torch.cat([t, t], dim=0)                                             # (2B,)
        y2 = torch.cat([y, torch.full_like(y, self.null_label)], dim=0)           # (2B,)
        tail_drop2 = torch.cat([_per_sample(self.tail_drop, B, x.device), _per_sample(tail_drop_uncond, B, x.device)])
        out2, aux = self.model(x2, t2, y2, tail_drop=tail_drop2, **kwargs)              # (2B, C|2C, *G)
        cond, uncond = out2[:B], out2[B:]
        k = C if self.cfg_channels == "all" else min(3, C)
        guided = uncond[:, :k] + self.cfg_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1), aux                       # (B, C|2C, *G)


def guided_model(model, cfg_scale: float, null_label: int, cfg_channels: str = "all",
                 tail_drop=0.0, tail_drop_uncond=None) -> GuidedModel:
    """Wrap `model` for classifier-free guidance at scale `cfg_scale` (1 = plain forward).

    null_label: the null class index (num_classes). tail_drop: ρ_c, float or (B,) tensor.
    tail_drop_uncond: ρ_u for the unconditional half (None = ρ_c; Lite-CFG: 0.9 with ρ_c = 0).
    """
    return GuidedModel(model, cfg_scale, null_label, cfg_channels, tail_drop, tail_drop_uncond)


def conditional_net(model, num_classes: int, cfg_scale: float = 1.0, cfg_channels: str = "all",
                    tail_drop=0.0, tail_drop_uncond=None):
    """The callable the samplers run: CFG / Lite-CFG for a class-conditional model, a plain call
    at `tail_drop` for an unconditional one (which cannot be guided)."""
    if num_classes > 0:
        return guided_model(model, cfg_scale, null_label=num_classes, cfg_channels=cfg_channels,
                            tail_drop=tail_drop, tail_drop_uncond=tail_drop_uncond)
    if float(cfg_scale) != 1.0:
        raise ValueError("guidance (cfg_scale != 1) needs a class-conditional model (this one has "
                         "num_classes=0)")
    check_tail_drop(tail_drop, "tail_drop")
    return lambda x, t, y=None, **kw: model(x, t, None, tail_drop=tail_drop)
