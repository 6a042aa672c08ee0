"""Training objectives, samplers and classifier-free guidance (METHOD §2.16, §7.1, §8).

Two objectives share one interface: `training_losses(model, x0, y, t=None, noise=None,
tail_drop=0.0, generator=None) -> (terms, aux)` with per-sample terms["loss"], and
`sample(model, shape, y, steps, method, ...)`. CFG is a model wrapper (`guided_model`) so every
sampler works with it unchanged.
"""
from .flow import FlowMatching
from .gaussian import GaussianDiffusion, space_timesteps
from .guidance import GuidedModel, guided_model
from .objective import Objective


def build_objective(name: str, **kw):
    """"gaussian" -> GaussianDiffusion(**kw); "flow" -> FlowMatching(**kw)."""
    if name == "gaussian":
        return GaussianDiffusion(**kw)
    if name == "flow":
        return FlowMatching(**kw)
    raise ValueError(f"unknown objective {name!r}: expected 'gaussian' or 'flow'")


__all__ = ["GaussianDiffusion", "FlowMatching", "guided_model", "GuidedModel", "space_timesteps",
           "build_objective", "Objective"]
