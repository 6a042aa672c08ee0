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


TARGETS = ("v", "eps", "x")
DIFFUSIONS = ("sbdm", "sigma", "constant")
SAMPLE_METHODS = ("euler", "heun", "sde")
EDGE = 1e-3  # the ε and x targets are turned into a velocity with 1/(1-s) or 1/s: kept off the ends


def shift_time(s: torch.Tensor | float, shift: float):
    """SD3's timestep shift: s -> shift·s / (1 + (shift − 1)·s). shift > 1 moves training times
    and the sampling grid towards noise (s = 1); shift = 1 is the identity."""
    if shift == 1.0:
        return s
    return shift * s / (1.0 + (shift - 1.0) * s)


class FlowMatching:
    """Rectified flow x_s = (1 − s)·x_0 + s·ε, trained and sampled as the field does in 2026.

    Args:
        time_sampling: "uniform" s ~ U(0, 1), or "logit_normal" s = sigmoid(m + σ·z), z ~ N(0, 1)
            (SD3's choice: more weight on intermediate s, where the velocity is hardest).
        logit_mean, logit_std: m and σ of the logit-normal option.
        shift: SD3 / LightningDiT timestep shift applied to the training times and the sampling
            grid (`shift_time`); 1 = none (dcgen's behaviour before the option existed).
        shift_base_numel: make the shift resolution-dependent (the SD3 paper, section 5.3.2): the effective shift
            is shift·sqrt(n / shift_base_numel), n = C·prod(grid) of the data, so a shift chosen
            at one resolution carries to another with the same signal-to-noise at equal s; None:
            `shift` as given.
        target: what the model predicts: "v" the velocity ε − x_0 (default), "eps" the noise ε,
            "x" the data x_0. The loss is the MSE on the chosen target; sampling turns any of
            them into the velocity (`velocity_from`).
        sde_diffusion, sde_norm: the SDE sampler's diffusion g² = sde_norm · w(s) (see `sample`).
    """

    def __init__(self, time_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, shift: float = 1.0, shift_base_numel: int | None = None,
                 target: str = "v", sde_diffusion: str = "sigma", sde_norm: float = 1.0):
        if time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {time_sampling!r}")
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        if not (isinstance(shift, (int, float)) and not isinstance(shift, bool) and shift > 0):
            raise ValueError(f"shift must be a number > 0, got {shift!r}")
        if shift_base_numel is not None and int(shift_base_numel) < 1:
            raise ValueError(f"shift_base_numel must be a positive integer or null, got {shift_base_numel!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
        self.time_sampling, self.logit_mean, self.logit_std = time_sampling, logit_mean, logit_std
        self.shift = float(shift)
        self.shift_base_numel = None if shift_base_numel is None else int(shift_base_numel)
        self.target = target
        if sde_diffusion not in DIFFUSIONS:
            raise ValueError(f"sde_diffusion must be one of {list(DIFFUSIONS)}, got {sde_diffusion!r}")
        if not (isinstance(sde_norm, (int, float)) and not isinstance(sde_norm, bool) and sde_norm >= 0):
            raise ValueError(f"sde_norm must be a number >= 0, got {sde_norm!r}")
        self.sde_diffusion, self.sde_norm = sde_diffusion, float(sde_norm)

    def effective_shift(self, shape) -> float:
        """The shift for data of `shape` (B, C, *G)."""
        if self.shift_base_numel is None:
            return self.shift
        n = 1
        for d in tuple(shape)[1:]:
            n *= int(d)
        return self.shift * (n / self.shift_base_numel) ** 0.5

    def target_of(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The regression target of the chosen parameterisation."""
        return {"v": lambda: noise - x0, "eps": lambda: noise, "x": lambda: x0}[self.target]()

    def velocity_from(self, pred: torch.Tensor, x: torch.Tensor, s: float) -> torch.Tensor:
        """The velocity ε − x_0 implied by the model's prediction at x_s, s: from ε̂,
        x̂_0 = (x_s − s ε̂)/(1 − s) and v = (ε̂ − x_s)/(1 − s); from x̂_0, ε̂ = (x_s − (1 − s) x̂_0)/s and
        v = (x_s − x̂_0)/s (the divisors kept at least EDGE; the sampler evaluates these targets at
        s in [EDGE, 1 − EDGE])."""
        if self.target == "v":
            return pred
        if self.target == "eps":
            return (pred - x) / max(1.0 - s, EDGE)
        return (x - pred) / max(s, EDGE)

    def __repr__(self) -> str:
        return (f"FlowMatching(time_sampling={self.time_sampling!r}, shift={self.shift:g}, "
                f"target={self.target!r})")

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

    def draw_timesteps(self, B: int, generator=None, shape=None) -> torch.Tensor:
        """The training times of B samples, (B,) float, drawn through `generator` and shifted
        (`shape`: the data's (B, C, *G), needed for a resolution-dependent shift)."""
        s = self.sample_s(B, generator)
        if self.shift_base_numel is not None and shape is None:
            raise ValueError("a resolution-dependent shift needs the data shape")
        return shift_time(s, self.effective_shift(shape) if shape is not None else self.shift)

    def noised(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """The training input x_s at flow times s = t (`interpolate`)."""
        return self.interpolate(x0, torch.as_tensor(t, device=x0.device, dtype=x0.dtype), noise)

    @staticmethod
    def model_calls(steps: int, method: str) -> int:
        """Model calls of one sampling run: Euler and the SDE one per step, Heun two (the last
        at s = 0)."""
        return int(steps) * (2 if method == "heun" else 1)

    @staticmethod
    def check_sampler(steps, method: str) -> None:
        """Raise ValueError unless `method` (euler, heun, sde) can sample in `steps` (an integer >= 1)."""
        if method not in SAMPLE_METHODS:
            raise ValueError(f"sampler={method}: the flow objective samples with euler, heun or sde")
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
        (target − prediction)² on the first C output channels (target: ε − x_0, ε or x_0).
        """
        B, C = x0.shape[0], x0.shape[1]
        if x0.dim() < 3 or x0.dim() > 5:
            raise ValueError(f"x0 must be (B, C, *grid) with grid rank 1-3, got {tuple(x0.shape)}")
        if t is None:
            s = shift_time(self.sample_s(B, generator, x0.device, x0.dtype), self.effective_shift(x0.shape))
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
        mse = mean_flat((self.target_of(x0, noise) - out[:, :C]) ** 2)
        return {"loss": mse, "mse": mse}, aux

    def sample(self, model, shape, y=None, steps: int = 50, method: str = "euler", noise=None,
               generator=None, model_kwargs=None, progress: bool = False,
               callback: Callable | None = None, device=None,
               dtype=torch.float32) -> torch.Tensor:
        """Integrate from s = 1 (noise) to s = 0 on `steps` steps of the grid 1 − k/steps, shifted
        by `shift_time` (identity for shift 1).

        "euler": one model call per step; "heun": Heun's 2nd-order (trapezoid) corrector, two
        calls per step, including the final one at s = 0 (the velocity is finite there, unlike
        an EDM-style σ-parameterisation); "sde": Euler–Maruyama on the reverse SDE with the same
        marginals, dx = [v − ½ g²(s) ∇log p_s(x)] ds + g(s) dW̄, score ∇log p_s = −(x + (1 − s) v)/s,
        diffusion g² = sde_norm · w(s) with SiT's choices w = s ("sigma", SiT's default),
        2s/(1 − s) ("sbdm", the VP-SDE's) or 1 ("constant"); the last step is taken without noise
        (SiT's "Mean" last step); sde_norm = 0 is the Euler ODE exactly. The noise comes from
        `generator`. `callback(i, t_model, x_t, out, aux)` runs after every model call (i counts
        calls from 0; t_model = s·999 as a float); the budget ρ travels with `model`, as in the
        Gaussian samplers.
        """
        if method not in SAMPLE_METHODS:
            raise ValueError(f"method must be one of {list(SAMPLE_METHODS)}, got {method!r}")
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
        shift = self.effective_shift(x.shape)
        grid = [shift_time(v, shift) for v in torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()]
        calls = 0

        def velocity(x, s: float):
            nonlocal calls
            # an ε prediction says nothing of x_0 at s = 1, an x_0 prediction nothing of ε at
            # s = 0: those targets are evaluated just inside the interval (SiT's sample_eps)
            if self.target == "eps":
                s = min(s, 1.0 - EDGE)
            elif self.target == "x":
                s = max(s, EDGE)
            t = torch.full((B,), s * T_SCALE, dtype=x.dtype, device=x.device)
            out, aux = call_model(model, x, t, y, model_kwargs)
            if callback is not None:
                callback(calls, s * T_SCALE, x, out, aux)
            calls += 1
            return self.velocity_from(out[:, :C], x, s)

        for k in progress_bar(range(steps), progress, steps):
            s, s_next = grid[k], grid[k + 1]
            ds = s_next - s                                                       # < 0
            v = velocity(x, s)
            if method == "euler":
                x = x + ds * v
            elif method == "heun":
                x_pred = x + ds * v
                x = x + ds * 0.5 * (v + velocity(x_pred, s_next))
            else:
                g2 = self.sde_norm * self.diffusion_weight(s)
                if g2 == 0:
                    x = x + ds * v
                    continue
                score = -(x + (1.0 - s) * v) / max(s, EDGE)
                x = x + ds * (v - 0.5 * g2 * score)
                if k < steps - 1:  # the last step lands on the mean
                    x = x + (g2 * -ds) ** 0.5 * randn(x.shape, generator, x.device, x.dtype)
        return x

    def diffusion_weight(self, s: float) -> float:
        """w(s) of the SDE sampler's g² = sde_norm · w(s)."""
        if self.sde_diffusion == "sigma":
            return s
        if self.sde_diffusion == "sbdm":
            return 2.0 * s / max(1.0 - s, EDGE)
        return 1.0
