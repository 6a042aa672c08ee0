"""Gaussian (DDPM) objective: ε-prediction with learned-range σ, hybrid loss, respacing, DDPM/DDIM.

Semantics follow ADM / DiT (METHOD §2.16, §7.1, §8); the code is our own. Shape legend: B batch,
C data channels, G the token grid (rank 1, 2 or 3), so data are (B, C, *G) and a learned-σ model
emits (B, 2C, *G): channels [0, C) are ε, [C, 2C) are v ∈ [-1, 1].

Timesteps. A `GaussianDiffusion` indexes its own tables with t ∈ {0 … T−1}. A respaced diffusion
keeps a subset of the original 1000 steps; `timestep_map[t]` is the ORIGINAL step, and that is
what the model receives (no rescaling to [0, 1000), unlike ADM's `rescale_timesteps`).

Numerics. Schedule tables are float64 numpy arrays (ᾱ near 1 loses digits in float32 and the
posterior coefficients are differences of such numbers); they are gathered and cast to the
dtype of the data per call, as ADM does.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from ..rng import randint, randn
from .common import call_model, mean_flat, progress_bar

# --------------------------------------------------------------------------------------------
# Gaussian log-densities (closed forms)
# --------------------------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _std_normal_cdf_tanh(x: torch.Tensor) -> torch.Tensor:
    # ADM's tanh approximation of Φ (absolute error ~1e-4); kept for exact ADM loss parity only.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale, cdf: str = "exact") -> torch.Tensor:
    """Elementwise log P(x) of data in [-1, 1] quantised to 256 bins of width 2/255 (ADM decoder).

    The bin of x is [x − 1/255, x + 1/255]; the two edge bins extend to ∓∞. `cdf="exact"` uses
    log Φ (torch.special.log_ndtr, accurate in the tails); `cdf="tanh"` reproduces ADM's
    approximation. Probabilities are floored at 1e-12 as in ADM so a far-off mean stays finite.
    """
    if cdf not in ("exact", "tanh"):
        raise ValueError(f"cdf must be 'exact' or 'tanh', got {cdf!r}")
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    if cdf == "exact":
        log_cdf_upper = torch.special.log_ndtr(upper)                 # log Φ(upper)
        log_sf_lower = torch.special.log_ndtr(-lower)                 # log (1 − Φ(lower))
        delta = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    else:
        cdf_upper = _std_normal_cdf_tanh(upper)
        cdf_lower = _std_normal_cdf_tanh(lower)
        log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
        log_sf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
        delta = cdf_upper - cdf_lower
    log_mid = torch.log(delta.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_mid))


# --------------------------------------------------------------------------------------------
# Schedules and respacing
# --------------------------------------------------------------------------------------------


def make_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> np.ndarray:
    """β_t in float64.

    "linear": ADM's linspace(beta_start, beta_end) scaled by 1000/T, so a T ≠ 1000 schedule keeps
    roughly the same ᾱ_T (identity at T = 1000, the paper setting). "cosine": Nichol & Dhariwal's
    squared-cosine ᾱ with β capped at 0.999.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if schedule == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)
    if schedule == "cosine":
        def abar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1.0 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), 0.999)
                         for i in range(num_timesteps)], dtype=np.float64)
    raise ValueError(f"beta_schedule must be 'linear' or 'cosine', got {schedule!r}")


def space_timesteps(num_timesteps: int, section_counts) -> list[int]:
    """Timesteps kept by ADM-style respacing, sorted ascending.

    `section_counts` is "K" or "K1,K2,..." (or an int / list of ints): the T steps are cut into
    len(counts) near-equal sections (the first T mod n sections one longer) and section j keeps
    K_j steps evenly strided over it, positions rounded with Python's round() after accumulating
    the fractional stride (exactly ADM's arithmetic): "250" of 1000 gives 0, 4, 8, …, 160, 164,
    169, 173, …, 995, 999 (246 gaps of 4, 3 of 5). "ddimN" keeps range(0, T, stride) for the
    smallest stride that gives exactly N steps (DDIM's uniform skip). ADM returns a set; a sorted
    list carries the same information.
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                want = int(spec[4:])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}: expected 'ddimN'") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            if want == num_timesteps:
                return list(range(num_timesteps))
            raise ValueError(f"cannot take exactly {want} evenly strided steps from {num_timesteps}")
        try:
            counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise ValueError(f"bad respacing {section_counts!r}: expected 'K', 'K1,K2,...' "
                             "or 'ddimN'") from None
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"section counts must be positive, got {section_counts!r}")

    base, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for j, count in enumerate(counts):
        size = base + (1 if j < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps "
                             f"(respacing {section_counts!r} of {num_timesteps})")
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride   # accumulated, not k*stride: ADM's rounding at .5 ties depends on it
        start += size
    return sorted(set(kept))


# --------------------------------------------------------------------------------------------
# The diffusion
# --------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """DDPM with ε-prediction (ADM/DiT semantics), optionally with learned-range σ (§2.16).

    Args:
        num_timesteps, beta_schedule, beta_start, beta_end: the training schedule (§7.1 defaults).
        learn_sigma: the model emits 2C channels [ε | v]; log Σ = f·log β_t + (1−f)·log β̃_t with
            f = (v+1)/2 and β̃_t the posterior variance clipped at t = 0 to its t = 1 value.
        loss: "hybrid" (mse + vb; needs learn_sigma) or "mse" (ε MSE only).
        fixed_variance: "fixedlarge" (β_t, first entry β̃_1) or "fixedsmall" (β̃_t, clipped):
            the sampling variance when σ is not learned.
        decoder_cdf: "exact" Φ or ADM's "tanh" approximation in the t = 0 decoder NLL.
        betas, timestep_map: set by `respaced`; betas overrides the named schedule.
    """

    def __init__(self, num_timesteps: int = 1000, beta_schedule: str = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02, learn_sigma: bool = True,
                 loss: str = "hybrid", fixed_variance: str = "fixedlarge",
                 decoder_cdf: str = "exact", betas: Sequence[float] | None = None,
                 timestep_map: Sequence[int] | None = None):
        if loss not in ("hybrid", "mse"):
            raise ValueError(f"loss must be 'hybrid' or 'mse', got {loss!r}")
        if loss == "hybrid" and not learn_sigma:
            raise ValueError("loss='hybrid' trains the learned variance; with learn_sigma=False "
                             "use loss='mse'")
        if fixed_variance not in ("fixedlarge", "fixedsmall"):
            raise ValueError(f"fixed_variance must be 'fixedlarge' or 'fixedsmall', "
                             f"got {fixed_variance!r}")
        if decoder_cdf not in ("exact", "tanh"):
            raise ValueError(f"decoder_cdf must be 'exact' or 'tanh', got {decoder_cdf!r}")
        if betas is None:
            betas = make_betas(beta_schedule, num_timesteps, beta_start, beta_end)
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 1 or np.any(betas <= 0) or np.any(betas > 1):
            raise ValueError("betas must be a non-empty 1-D array in (0, 1]")
        T = len(betas)
        if timestep_map is None:
            timestep_map = np.arange(T)
        timestep_map = np.asarray(timestep_map, dtype=np.int64)
        if timestep_map.shape != (T,):
            raise ValueError(f"timestep_map needs {T} entries, got {timestep_map.shape}")

        self.num_timesteps = T
        self.beta_schedule, self.beta_start, self.beta_end = beta_schedule, beta_start, beta_end
        self.learn_sigma, self.loss_type = learn_sigma, loss
        self.fixed_variance, self.decoder_cdf = fixed_variance, decoder_cdf
        self.timestep_map = timestep_map
        self._respaced_cache: dict[tuple[int, ...], GaussianDiffusion] = {}
        self._device_tables: dict[tuple[int, str], torch.Tensor] = {}

        # ---- float64 tables ----
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0) = N(c1·x_0 + c2·x_t, β̃_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0: clip its log to the t = 1 value (ADM) so log Σ stays finite at t = 0.
        first = self.posterior_variance[1] if T > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        one_minus_abar = 1.0 - self.alphas_cumprod
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus_abar
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / one_minus_abar
        self.log_betas = np.log(betas)
        if fixed_variance == "fixedlarge":
            # β_t but β̃_1 at t = 0 (ADM): the t = 0 decoder variance must be small for a good NLL.
            var = np.append(first, betas[1:]) if T > 1 else betas.copy()
            self.fixed_log_variance = np.log(var)
        else:
            self.fixed_log_variance = self.posterior_log_variance_clipped.copy()

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(T={self.num_timesteps}, schedule={self.beta_schedule!r}, "
                f"learn_sigma={self.learn_sigma}, loss={self.loss_type!r})")

    # ---- table gathering ----

    def _table(self, table: np.ndarray, device) -> torch.Tensor:
        """The float64 table as a tensor on `device`, cached (saves a host copy per step on GPU)."""
        key = (id(table), str(device))
        if key not in self._device_tables:
            self._device_tables[key] = torch.from_numpy(table).to(device)
        return self._device_tables[key]

    def _gather(self, table: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] as (B, 1, ..., 1) in like's dtype/device, broadcastable against like."""
        dtype = like.dtype if like.is_floating_point() else torch.float32
        vals = self._table(table, t.device)[t].to(dtype=dtype, device=like.device)
        return vals.view(-1, *([1] * (like.dim() - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original (un-respaced) timesteps fed to the model, (B,) long."""
        return self._table(self.timestep_map, t.device)[t]

    def _check_t(self, t: torch.Tensor, B: int) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        if t.is_floating_point():
            raise ValueError("t must be integer timesteps for the Gaussian objective")
        # the range check reads values: only for host tensors, where it costs no device sync
        if t.numel() and t.device.type == "cpu" and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"t must lie in [0, {self.num_timesteps})")
        return t.long()

    # ---- forward process ----

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε."""
        return (self._gather(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior(self, x0, x_t, t):
        """Mean and clipped log-variance of q(x_{t−1} | x_t, x_0)."""
        mean = (self._gather(self.posterior_mean_coef1, t, x_t) * x0
                + self._gather(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, self._gather(self.posterior_log_variance_clipped, t, x_t)

    def predict_x0(self, x_t, t, eps):
        """x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t, written with the stable reciprocals."""
        return (self._gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def _split(self, out: torch.Tensor, C: int):
        """(B, 2C|C, *G) -> ε (B, C, *G), v (B, C, *G) or None."""
        want = 2 * C if self.learn_sigma else C
        if out.shape[1] != want:
            raise ValueError(f"model output has {out.shape[1]} channels; expected {want} "
                             f"(C={C}, learn_sigma={self.learn_sigma})")
        return (out[:, :C], out[:, C:]) if self.learn_sigma else (out, None)

    def model_log_variance(self, v: torch.Tensor | None, t: torch.Tensor, like: torch.Tensor):
        """log Σ_θ: learned-range interpolation (§2.16) or the fixed choice, (B, C, *G)|(B,1,..)."""
        if v is None:
            return self._gather(self.fixed_log_variance, t, like)
        frac = (v + 1.0) / 2.0
        max_log = self._gather(self.log_betas, t, like)
        min_log = self._gather(self.posterior_log_variance_clipped, t, like)
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_variance(self, model, x, t, y=None, model_kwargs=None, clip_denoised: bool = False):
        """One model call and p_θ(x_{t−1} | x_t). t indexes THIS diffusion's tables.

        Returns a dict: mean, log_variance, pred_x0, eps, out (raw model output), aux.
        """
        C = x.shape[1]
        out, aux = call_model(model, x, self.model_timesteps(t), y, model_kwargs)
        eps, v = self._split(out, C)
        pred_x0 = self.predict_x0(x, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _ = self.q_posterior(pred_x0, x, t)
        log_var = self.model_log_variance(v, t, x)
        return {"mean": mean, "log_variance": log_var, "pred_x0": pred_x0, "eps": eps,
                "out": out, "aux": aux}

    # ---- training ----

    def training_losses(self, model, x0: torch.Tensor, y=None, t=None, noise=None,
                        tail_drop=0.0, generator=None, model_kwargs=None):
        """Per-sample loss terms and the model's aux (§7.1).

        Returns (terms, aux) with terms of shape (B,): "mse" = mean over (C, *G) of (ε − ε_θ)²;
        with loss="hybrid" also "vb" (bits/dim; KL(q ‖ p_θ) for t > 0, decoder NLL at t = 0) and
        "loss" = mse + vb, else "loss" = mse. vb sees ε_θ through a stop-gradient, so it trains
        only the variance channels and mse trains only the ε channels.
        """
        B, C = x0.shape[0], x0.shape[1]
        if x0.dim() < 3 or x0.dim() > 5:
            raise ValueError(f"x0 must be (B, C, *grid) with grid rank 1-3, got {tuple(x0.shape)}")
        if t is None:
            t = randint(self.num_timesteps, (B,), generator, x0.device)
        else:
            t = self._check_t(t, B).to(x0.device)   # validated only when given: the check syncs
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")

        x_t = self.q_sample(x0, t, noise)                                         # (B, C, *G)
        out, aux = call_model(model, x_t, self.model_timesteps(t), y,
                              {**(model_kwargs or {}), "tail_drop": tail_drop})
        eps, v = self._split(out, C)                                              # (B, C, *G) each
        terms = {"mse": mean_flat((noise - eps) ** 2)}
        if self.loss_type == "hybrid":
            terms["vb"] = self._vb_bits(x0, x_t, t, eps.detach(), v)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms, aux

    def _vb_bits(self, x0, x_t, t, eps, v):
        """L_vb per sample in bits/dim (eps is already detached by the caller)."""
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        mean, _ = self.q_posterior(self.predict_x0(x_t, t, eps), x_t, t)
        log_var = self.model_log_variance(v, t, x_t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x0, mean, 0.5 * log_var, cdf=self.decoder_cdf)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ---- respacing ----

    def respaced(self, steps) -> "GaussianDiffusion":
        """A diffusion over the kept steps of `space_timesteps(T, steps)`.

        β'_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}} so ᾱ' equals ᾱ at the kept steps; `timestep_map` composes
        with this diffusion's own map, so the model always receives the original t. `steps` may
        be an int, "K", "K1,K2,...", "ddimN" or None (no respacing: returns self).
        """
        if steps is None:
            return self
        if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
            steps = str(int(steps))
        kept = tuple(space_timesteps(self.num_timesteps, steps))
        if len(kept) == self.num_timesteps:
            return self
        if kept not in self._respaced_cache:
            abar = self.alphas_cumprod[list(kept)]
            prev = np.append(1.0, abar[:-1])
            self._respaced_cache[kept] = GaussianDiffusion(
                beta_schedule=self.beta_schedule, beta_start=self.beta_start,
                beta_end=self.beta_end, learn_sigma=self.learn_sigma, loss=self.loss_type,
                fixed_variance=self.fixed_variance, decoder_cdf=self.decoder_cdf,
                betas=1.0 - abar / prev, timestep_map=self.timestep_map[list(kept)])
        return self._respaced_cache[kept]

    # ---- sampling ----

    @staticmethod
    def _init_noise(shape, noise, generator, device, dtype):
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != requested {tuple(shape)}")
            return noise
        if len(shape) < 3 or len(shape) > 5:
            raise ValueError(f"shape must be (B, C, *grid) with grid rank 1-3, got {tuple(shape)}")
        return randn(shape, generator, device, dtype)

    def p_sample_loop(self, model, shape, y=None, steps=250, noise=None, generator=None,
                      model_kwargs=None, progress: bool = False,
                      callback: Callable | None = None, clip_denoised: bool = False,
                      device=None, dtype=torch.float32) -> torch.Tensor:
        """Ancestral DDPM sampling over `respaced(steps)` (§8: 250 steps, clip off).

        The learned variance is used at every step (fixed variance when σ is not learned); no
        noise is added at the last step, which returns the posterior mean at t = 0.
        `callback(i, t_orig, x_t, out, aux)` runs after each model call: i = 0 … K−1 counts
        sampling steps from the noisiest, t_orig the original timestep (int), x_t the model's
        input, out its raw output. The budget ρ travels with `model` (a guided_model wrapper, or
        any callable): one route. All randomness comes from `generator` (drawn on its device).
        """
        diff = self.respaced(steps)
        device = noise.device if (device is None and noise is not None) else device
        x = self._init_noise(shape, noise, generator, device, dtype)              # (B, C, *G)
        B, K = x.shape[0], diff.num_timesteps
        for i, ti in enumerate(progress_bar(range(K - 1, -1, -1), progress, K)):
            t = torch.full((B,), ti, dtype=torch.long, device=x.device)
            p = diff.p_mean_variance(model, x, t, y, model_kwargs, clip_denoised)
            if callback is not None:
                callback(i, int(diff.timestep_map[ti]), x, p["out"], p["aux"])
            if ti > 0:
                z = randn(x.shape, generator, x.device, x.dtype)
                x = p["mean"] + torch.exp(0.5 * p["log_variance"]) * z
            else:
                x = p["mean"]
        return x

    def ddim_sample_loop(self, model, shape, y=None, steps=50, eta: float = 0.0, noise=None,
                         generator=None, model_kwargs=None,
                         progress: bool = False, callback: Callable | None = None,
                         clip_denoised: bool = False, device=None,
                         dtype=torch.float32) -> torch.Tensor:
        """DDIM over `respaced(steps)` (int K: evenly strided with rounding; or "ddimK").

        Uses the ε channels only. With η = 0 it is deterministic given the initial noise; the
        last step returns x̂_0. Callback as in `p_sample_loop`.
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        diff = self.respaced(steps)
        device = noise.device if (device is None and noise is not None) else device
        x = self._init_noise(shape, noise, generator, device, dtype)
        B, C, K = x.shape[0], x.shape[1], diff.num_timesteps
        for i, ti in enumerate(progress_bar(range(K - 1, -1, -1), progress, K)):
            t = torch.full((B,), ti, dtype=torch.long, device=x.device)
            out, aux = call_model(model, x, diff.model_timesteps(t), y, model_kwargs)
            if callback is not None:
                callback(i, int(diff.timestep_map[ti]), x, out, aux)
            eps = out[:, :C]
            pred_x0 = diff.predict_x0(x, t, eps)
            if clip_denoised:
                pred_x0 = pred_x0.clamp(-1.0, 1.0)
                # ε consistent with the clipped x̂_0 (ADM)
                eps = ((diff._gather(diff.sqrt_recip_alphas_cumprod, t, x) * x - pred_x0)
                       / diff._gather(diff.sqrt_recipm1_alphas_cumprod, t, x))
            abar = diff._gather(diff.alphas_cumprod, t, x)
            abar_prev = diff._gather(diff.alphas_cumprod_prev, t, x)
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
            x = pred_x0 * torch.sqrt(abar_prev) + torch.sqrt((1 - abar_prev - sigma ** 2).clamp(min=0)) * eps
            if eta > 0 and ti > 0:
                x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
        return x

    # ---- what the training loop and the sampler ask of an objective (shared with FlowMatching) ----

    @property
    def time_range(self) -> float:
        """Training timesteps lie in [0, time_range): integer t < num_timesteps."""
        return float(self.num_timesteps)

    def draw_timesteps(self, B: int, generator=None, shape=None) -> torch.Tensor:
        """The training timesteps of B samples, (B,) int64, drawn through `generator` (`shape`,
        the data's, is not needed here)."""
        return randint(self.num_timesteps, (B,), generator)

    def noised(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """The training input x_t at integer timesteps t (`q_sample`)."""
        return self.q_sample(x0, torch.as_tensor(t, device=x0.device).long(), noise)

    @staticmethod
    def model_calls(steps: int, method: str) -> int:
        """Model calls of one sampling run: one per step for ddpm and ddim."""
        return int(steps)

    def check_sampler(self, steps, method: str) -> None:
        """Raise ValueError unless `method` (ddpm, ddim) can sample in `steps` steps: an integer
        in [1, num_timesteps], or a respacing string ("K1,K2,...", "ddimN")."""
        if method not in ("ddpm", "ddim"):
            raise ValueError(f"sampler={method}: the Gaussian objective samples with ddpm or ddim "
                             "(dpm++ and unipc through diffusers; euler and heun need the flow objective)")
        T = self.num_timesteps
        if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
            if not 1 <= int(steps) <= T:
                raise ValueError(f"steps={steps}: {method} takes 1 to {T} steps (the model was "
                                 f"trained with {T} timesteps)")
            return
        kept = space_timesteps(T, steps)
        if len(set(kept)) != len(kept) or (kept and (min(kept) < 0 or max(kept) >= T)):
            raise ValueError(f"steps={steps!r}: not a respacing of {T} timesteps")

    def sample(self, model, shape, y=None, steps=250, method: str = "ddpm", **kw) -> torch.Tensor:
        """Uniform entry point shared with FlowMatching: method "ddpm" or "ddim"."""
        if method == "ddpm":
            return self.p_sample_loop(model, shape, y, steps=steps, **kw)
        if method == "ddim":
            return self.ddim_sample_loop(model, shape, y, steps=steps, **kw)
        raise ValueError(f"method must be 'ddpm' or 'ddim' for the Gaussian objective, got {method!r}")
