"""Flow-matching (rectified-flow) objective, dcgen's second objective.

Path x_s = (1 − s)·x_0 + s·ε with s ∈ [0, 1] (s = 0 data, s = 1 noise); the model predicts the
constant velocity dx_s/ds = ε − x_0 in its first C output channels (a learned-σ head's other C
channels are ignored, so DiT/DC-DiT checkpoints with 2C outputs can be trained either way). The
model receives t = s·999 as a float tensor, i.e. the range of the Gaussian objective's integer
timesteps, so the same sinusoidal timestep embedder serves both objectives.

Shape legend: B batch, C data channels, G the token grid (rank 1-3); data are (B, C, *G).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..rng import rand, randn
from .common import call_model, mean_flat, progress_bar

T_SCALE = 999.0  # s ∈ [0, 1] -> model timestep s·999 ∈ [0, 999]


class FlowMatching:
    """Rectified flow with velocity target ε − x_0.

    Args:
        time_sampling: "uniform" s ~ U(0, 1), or "logit_normal" s = sigmoid(m + σ·z), z ~ N(0, 1)
            (SD3's choice: more weight on intermediate s, where the velocity is hardest).
        logit_mean, logit_std: m and σ of the logit-normal option.
    """

    def __init__(self, time_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0):
        if time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {time_sampling!r}")
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, logit_mean, logit_std

    def __repr__(self) -> str:
        return f"FlowMatching(time_sampling={self.time_sampling!r})"

    @staticmethod
    def model_timesteps(s: torch.Tensor) -> torch.Tensor:
        """Float model timestep s·999, (B,)."""
        return s * T_SCALE

    def sample_s(self, B: int, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """Training times s, (B,)."""
        if self.time_sampling == "uniform":
            return rand((B,), generator, device, dtype)
        z = randn((B,), generator, device, dtype)
        return torch.sigmoid(self.logit_mean + self.logit_std * z)

    # ---- what the training loop and the sampler ask of an objective (shared with GaussianDiffusion) ----

    time_range = 1.0  # training times s lie in [0, 1]

    learn_sigma = False  # flow predicts the velocity alone

    def draw_timesteps(self, B: int, generator=None) -> torch.Tensor:
        """The training times of B samples, (B,) float, drawn through `generator`."""
        return self.sample_s(B, generator)

    def noised(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """The training input x_s at flow times s = t (`interpolate`)."""
        return self.interpolate(x0, torch.as_tensor(t, device=x0.device, dtype=x0.dtype), noise)

    @staticmethod
    def model_calls(steps: int, method: str) -> int:
        """Model calls of one sampling run: Euler one per step, Heun two (the last at s = 0)."""
        return int(steps) * (2 if method == "heun" else 1)

    @staticmethod
    def check_sampler(steps, method: str) -> None:
        """Raise ValueError unless `method` (euler, heun) can sample in `steps` (an integer >= 1)."""
        if method not in ("euler", "heun"):
            raise ValueError(f"sampler={method}: the flow objective samples with euler or heun")
        if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
            raise ValueError(f"steps={steps!r}: expected an integer >= 1")

    @staticmethod
    def interpolate(x0: torch.Tensor, s: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_s = (1 − s)·x_0 + s·ε."""
        s = s.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return (1.0 - s) * x0 + s * noise

    def training_losses(self, model, x0: torch.Tensor, y=None, t=None, noise=None,
                        tail_drop=0.0, generator=None, model_kwargs=None):
        """Per-sample loss terms and the model's aux; same signature as GaussianDiffusion's.

        `t` here is the flow time s ∈ [0, 1], (B,) float (drawn by `time_sampling` if None).
        Returns ({"loss", "mse"} of shape (B,), aux), mse = mean over (C, *G) of
        (ε − x_0 − v_θ)² on the first C output channels.
        """
        B, C = x0.shape[0], x0.shape[1]
        if x0.dim() < 3 or x0.dim() > 5:
            raise ValueError(f"x0 must be (B, C, *grid) with grid rank 1-3, got {tuple(x0.shape)}")
        if t is None:
            s = self.sample_s(B, generator, x0.device, x0.dtype)
        else:
            s = torch.as_tensor(t, device=x0.device)
            if s.shape != (B,) or not s.is_floating_point():
                raise ValueError(f"flow time t must be a float tensor of shape ({B},), got "
                                 f"{tuple(s.shape)} {s.dtype}")
            if float(s.min()) < 0 or float(s.max()) > 1:
                raise ValueError("flow time t must lie in [0, 1]")
            s = s.to(x0.dtype)
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")

        x_s = self.interpolate(x0, s, noise)                                      # (B, C, *G)
        out, aux = call_model(model, x_s, self.model_timesteps(s), y,
                              {**(model_kwargs or {}), "tail_drop": tail_drop})
        if out.shape[1] < C:
            raise ValueError(f"model output has {out.shape[1]} channels, needs at least C={C}")
        mse = mean_flat((noise - x0 - out[:, :C]) ** 2)
        return {"loss": mse, "mse": mse}, aux

    def sample(self, model, shape, y=None, steps: int = 50, method: str = "euler", noise=None,
               generator=None, model_kwargs=None, progress: bool = False,
               callback: Callable | None = None, device=None,
               dtype=torch.float32) -> torch.Tensor:
        """Integrate dx/ds = v_θ from s = 1 (noise) to s = 0 on a uniform grid of `steps` steps.

        "euler": one model call per step; "heun": Heun's 2nd-order (trapezoid) corrector, two
        calls per step, including the final one at s = 0 (the velocity is finite there, unlike
        an EDM-style σ-parameterisation). `callback(i, t_model, x_t, out, aux)` runs after every
        model call (i counts calls from 0; t_model = s·999 as a float); the budget ρ travels
        with `model`, as in the Gaussian samplers.
        """
        if method not in ("euler", "heun"):
            raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        steps = int(steps)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested {tuple(shape)}")
            x = noise
        else:
            if len(shape) < 3 or len(shape) > 5:
                raise ValueError(f"shape must be (B, C, *grid) with grid rank 1-3, got {tuple(shape)}")
            x = randn(shape, generator, device, dtype)                            # (B, C, *G)
        B, C = x.shape[0], x.shape[1]
        # Grid in float64 then cast: s_k = 1 − k/steps exactly representable at the ends.
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        calls = 0

        def velocity(x, s: float):
            nonlocal calls
            t = torch.full((B,), s * T_SCALE, dtype=x.dtype, device=x.device)
            out, aux = call_model(model, x, t, y, model_kwargs)
            if callback is not None:
                callback(calls, s * T_SCALE, x, out, aux)
            calls += 1
            return out[:, :C]

        for k in progress_bar(range(steps), progress, steps):
            s, s_next = grid[k], grid[k + 1]
            ds = s_next - s                                                       # < 0
            v = velocity(x, s)
            if method == "euler":
                x = x + ds * v
            else:
                x_pred = x + ds * v
                x = x + ds * 0.5 * (v + velocity(x_pred, s_next))
        return x
