"""What the training loop, the samplers, evaluation and upcycling ask of an objective.

`GaussianDiffusion` and `FlowMatching` both satisfy `Objective`; code that takes "an objective"
checks `isinstance(obj, Objective)` (a runtime-checkable Protocol: the members must exist) and
then calls these members only, never guessing the kind from other attributes.

Time: a training time t is whatever `draw_timesteps` returns (integer steps in [0, T) for the
Gaussian objective, flow times s in [0, 1] for flow matching); `time_range` is its upper end
(for bucketing statistics), `model_timesteps(t)` is what the network receives, and
`noised(x0, t, noise)` is the training input x_t.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Objective(Protocol):
    learn_sigma: bool  # the network emits 2C channels [prediction | variance]

    @property
    def time_range(self) -> float: ...

    def draw_timesteps(self, B: int, generator=None, shape=None) -> torch.Tensor: ...

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor: ...

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor: ...

    def training_losses(self, model, x0: torch.Tensor, y=None, t=None, noise=None,
                        tail_drop=0.0, generator=None, model_kwargs=None): ...

    def sample(self, model, shape, y=None, steps: int = 50, method: str = "", noise=None,
               generator=None, **kwargs) -> torch.Tensor: ...

    def model_calls(self, steps: int, method: str) -> int: ...

    def check_sampler(self, steps, method: str) -> None: ...


def check_objective(obj, where: str = "objective") -> None:
    """Raise ValueError unless `obj` is an Objective."""
    if not isinstance(obj, Objective):
        missing = [m for m in ("learn_sigma", "time_range", "draw_timesteps", "noised", "model_timesteps",
                               "training_losses", "sample", "model_calls", "check_sampler")
                   if not hasattr(obj, m)]
        raise ValueError(f"{where}: a {type(obj).__name__} is not an objective (missing {', '.join(missing)})")
