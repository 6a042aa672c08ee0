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

Guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval"; EDM2,
REPA and LightningDiT sample this way): `interval=(τ_lo, τ_hi)` guides only the calls whose noise
level τ = t / t_max (t the model timestep, t_max the noisiest one: 999 for both of dcgen's
objectives; 1 = pure noise) lies in [τ_lo, τ_hi]; the other calls run the conditional branch
alone, B rows instead of 2B. [0, 1] is plain CFG.

Autoguidance (Karras et al. 2024, EDM2): `guide=` a weaker model (smaller, or trained for fewer
steps) replaces the unconditional branch: ε̂ = ε_g + s·(ε_c − ε_g), both conditional on y. The
guide runs at its own budget `guide_tail_drop` (default: the main branch's), so a DC-DiT can guide
itself at a higher tail drop, the Lite-CFG of autoguidance: with `guide` the model itself the two
branches run in one forward of 2B rows, as CFG's do. With the model as its own guide at the same
budget, ε̂ = ε_c: no guidance.

The returned aux is the model's, untouched, for the rows it ran: 2B rows (rows [0, B) the
conditional branch, [B, 2B) the unconditional or self-guide one) or B rows (one branch: outside
the interval, or a separate guide model, whose own rows are not in aux).
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


def cfg_branches(num_classes: int, cfg_scale: float, guided: bool = False) -> int:
    """Model rows per sample in one guided sampling step: 2 when guidance doubles the batch (a
    class-conditional model, or any model with a guide, at cfg_scale != 1), else 1. The one place
    that decides it: the guided call, the sampling FLOP count and the evaluation's memory plan
    all ask here (a call outside a guidance interval runs one branch: `GuidedModel.guided_rows`)."""
    return 2 if (num_classes > 0 or guided) and float(cfg_scale) != 1.0 else 1


def noise_level(t: torch.Tensor, t_max: float) -> torch.Tensor:
    """τ = t / t_max in [0, 1] per row (1 = pure noise)."""
    return torch.as_tensor(t, dtype=torch.float64).reshape(-1) / float(t_max)


def check_interval(interval) -> tuple[float, float] | None:
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"cfg_interval must be [lo, hi] with 0 <= lo <= hi <= 1, got {interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"cfg_interval must be [lo, hi] with 0 <= lo <= hi <= 1, got {interval!r}")
    return lo, hi


class GuidedModel:
    """Callable with the model interface; see the module docstring and `guided_model`."""

    def __init__(self, model, cfg_scale: float, null_label: int | None, cfg_channels: str = "all",
                 tail_drop=0.0, tail_drop_uncond=None, interval=None, t_max: float = 999.0,
                 guide=None, guide_tail_drop=None):
        if cfg_channels not in ("all", "legacy3"):
            raise ValueError(f"cfg_channels must be 'all' or 'legacy3', got {cfg_channels!r}")
        if guide is None and (null_label is None or int(null_label) < 0):
            raise ValueError(f"null_label must be a non-negative class index, got {null_label!r}")
        if guide is not None and tail_drop_uncond is not None:
            raise ValueError("autoguidance takes guide_tail_drop, not tail_drop_uncond (there is no "
                             "unconditional branch)")
        self.model, self.cfg_scale = model, float(cfg_scale)
        self.null_label = None if null_label is None else int(null_label)
        self.cfg_channels = cfg_channels
        check_tail_drop(tail_drop, "tail_drop")
        if tail_drop_uncond is not None:
            check_tail_drop(tail_drop_uncond, "tail_drop_uncond")
        if guide_tail_drop is not None:
            check_tail_drop(guide_tail_drop, "guide_tail_drop")
        self.tail_drop, self.tail_drop_uncond = tail_drop, tail_drop_uncond
        self.interval, self.t_max = check_interval(interval), float(t_max)
        self.guide = guide
        self.guide_tail_drop = tail_drop if guide_tail_drop is None else guide_tail_drop

    @property
    def branches(self) -> int:
        """Model rows per sample of a guided call (`cfg_branches`)."""
        return cfg_branches(0 if self.null_label is None else self.null_label + 1, self.cfg_scale,
                            self.guide is not None)

    def guided_rows(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the rows of a call at model timesteps `t` that are guided."""
        if self.branches == 1:
            return torch.zeros(torch.as_tensor(t).numel(), dtype=torch.bool)
        if self.interval is None:
            return torch.ones(torch.as_tensor(t).numel(), dtype=torch.bool)
        tau = noise_level(t, self.t_max)
        return (tau >= self.interval[0]) & (tau <= self.interval[1])

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs):
        """The budgets are the wrapper's (ρ_c, and ρ_u for Lite-CFG): the one route by which
        tail_drop reaches the model while sampling."""
        if "tail_drop" in kwargs:
            raise TypeError("the tail-drop budget of a guided model is set when it is wrapped "
                            "(guided_model(..., tail_drop=, tail_drop_uncond=)), not per call")
        if self.branches == 1:  # conditional by construction
            return self.model(x, t, y, tail_drop=self.tail_drop, **kwargs)
        rows = self.guided_rows(t).to(x.device)
        if not bool(rows.any()):  # outside the guidance interval: the conditional branch alone
            return self.model(x, t, y, tail_drop=self.tail_drop, **kwargs)
        if y is None and self.guide is None:
            raise ValueError("classifier-free guidance needs labels y (model is unconditional?)")
        B, C = x.shape[0], x.shape[1]
        if self.guide is not None and self.guide is not self.model:  # autoguidance, another model
            cond, aux = self.model(x, t, y, tail_drop=self.tail_drop, **kwargs)
            other, _ = self.guide(x, t, y, tail_drop=self.guide_tail_drop, **kwargs)
        else:
            if self.guide is None:  # CFG: [x; x], [y; null], [rho_c; rho_u]
                rho2 = self.tail_drop if self.tail_drop_uncond is None else self.tail_drop_uncond
                y2 = torch.cat([y, torch.full_like(y, self.null_label)], dim=0)           # (2B,)
            else:  # the model guiding itself at its own budget: [y; y], [rho_c; rho_g]
                rho2 = self.guide_tail_drop
                y2 = None if y is None else torch.cat([y, y], dim=0)
            x2 = torch.cat([x, x], dim=0)                                             # (2B, C, *G)
            t2 = torch.cat([t, t], dim=0)                                             # (2B,)
            tail_drop2 = torch.cat([_per_sample(self.tail_drop, B, x.device), _per_sample(rho2, B, x.device)])
            out2, aux = self.model(x2, t2, y2, tail_drop=tail_drop2, **kwargs)        # (2B, C|2C, *G)
            cond, other = out2[:B], out2[B:]
        k = C if self.cfg_channels == "all" else min(3, C)
        guided = other[:, :k] + self.cfg_scale * (cond[:, :k] - other[:, :k])
        if not bool(rows.all()):  # rows outside the interval keep the conditional prediction
            keep = rows.view(-1, *([1] * (x.dim() - 1)))
            guided = torch.where(keep, guided, cond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1), aux                       # (B, C|2C, *G)


def guided_model(model, cfg_scale: float, null_label: int | None, cfg_channels: str = "all",
                 tail_drop=0.0, tail_drop_uncond=None, interval=None, t_max: float = 999.0,
                 guide=None, guide_tail_drop=None) -> GuidedModel:
    """Wrap `model` for classifier-free guidance at scale `cfg_scale` (1 = plain forward).

    null_label: the null class index (num_classes). tail_drop: ρ_c, float or (B,) tensor.
    tail_drop_uncond: ρ_u for the unconditional half (None = ρ_c; Lite-CFG: 0.9 with ρ_c = 0).
    interval: guide only at noise levels τ = t / t_max in [lo, hi] (None: everywhere).
    guide, guide_tail_drop: autoguidance by `guide` (may be `model` itself) at its own budget.
    """
    return GuidedModel(model, cfg_scale, null_label, cfg_channels, tail_drop, tail_drop_uncond,
                       interval, t_max, guide, guide_tail_drop)


def conditional_net(model, num_classes: int, cfg_scale: float = 1.0, cfg_channels: str = "all",
                    tail_drop=0.0, tail_drop_uncond=None, interval=None, t_max: float = 999.0,
                    guide=None, guide_tail_drop=None):
    """The callable the samplers run: CFG / Lite-CFG / autoguidance, optionally within a guidance
    interval, for a class-conditional model (autoguidance also for an unconditional one), a plain
    call at `tail_drop` otherwise."""
    if num_classes > 0 or guide is not None:
        return guided_model(model, cfg_scale, null_label=num_classes if num_classes > 0 else None,
                            cfg_channels=cfg_channels, tail_drop=tail_drop, tail_drop_uncond=tail_drop_uncond,
                            interval=interval, t_max=t_max, guide=guide, guide_tail_drop=guide_tail_drop)
    if float(cfg_scale) != 1.0:
        raise ValueError("guidance (cfg_scale != 1) needs a class-conditional model (this one has "
                         "num_classes=0) or a guide model (autoguidance)")
    check_tail_drop(tail_drop, "tail_drop")
    return lambda x, t, y=None, **kw: model(x, t, None, tail_drop=tail_drop)
