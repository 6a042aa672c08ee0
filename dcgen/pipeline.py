"""A diffusers `DiffusionPipeline` for dcgen's class-conditional DiT / DC-DiT (METHOD §8, §2.16).

`DCDiTPipeline(transformer, scheduler, vae=None, latent_scale=0.18215)` samples a dcgen model with
any diffusers scheduler: DDPM with the learned variance, DDIM, DPM-Solver++, UniPC. Guidance is
dcgen's own `guided_model` (CFG on the doubled batch, Lite-CFG through per-branch tail-drop
budgets, null label = num_classes), so the pipeline and dcgen's samplers share one definition of
ε̂. `DCDiTPipeline.from_dcgen(path, scheduler=...)` builds it from an export or run directory.

Agreement with dcgen's own DDPM (`GaussianDiffusion.sample(method="ddpm")`):

* Timesteps. With a `DDPMScheduler` the pipeline uses dcgen's ADM respacing
  (`space_timesteps(T, K)`, reversed) as the scheduler's custom timesteps. For custom timesteps
  the scheduler's previous step is the next entry of the list (−1 after the last, with ᾱ = 1), so
  its β'_t = 1 − ᾱ_t/ᾱ_prev and its posterior variance β̃'_t are exactly the respaced ones, and
  `learned_range` interpolates their logs as §2.16 does. ADM clips log β̃ at the first respaced
  step (its entry 0 becomes entry 1) and diffusers clamps β̃_0 = 0 to 1e-20; both only matter at
  t = 0, where neither adds noise (the last step returns the posterior mean, which at ᾱ_prev = 1
  is x̂_0 in both). Every respacing keeps step 0, so the last step is t = 0 in both.
* Model timesteps. The scheduler's timesteps ARE the original training steps; the transformer
  gets them unchanged (integer t in [0, T)).
* Noise. The initial noise and the per-step noise come from `generator` in dcgen's order: the
  initial (B, C, *G) draw first (when `latents` is not given), then one (B, C, *G) draw per step
  except the last. diffusers' `randn_tensor` draws on a CPU generator's device, as dcgen's
  `randn` does, so one CPU generator gives the same numbers on every device.
* Tables. diffusers keeps ᾱ in float32 (a cumulative product of float32 β); dcgen, like ADM,
  in float64. The float32 table alone moves O(1) samples by ~1e-5, so the DDPM and DDIM schedulers
  built here (`make_scheduler`) carry dcgen's float64 ᾱ (their `step` only reads
  `alphas_cumprod`; products with float32 tensors stay float32). The two samplers then agree to
  ~1e-6 in fp32, the rounding of algebraically equal formulas.

DDIM: diffusers' `DDIMScheduler` has no custom timesteps and always steps back by
T // K, so it matches dcgen's DDIM for the uniform respacing "ddimK" when K divides into T the
same way (e.g. K = 10, 20, 25, 50, 100, 250 of 1000), not for dcgen's rounded `steps=K` spacing.

Sampling through schedulers from the `dcgen sample` command: `with_diffusers_samplers(objective)`
wraps a Gaussian objective so that `dcgen.sample.generate(model, objective, task, sampler="dpm++",
steps=20, ...)` runs unchanged (same return dict, same recording of boundary maps).

Shape legend: B batch, C data channels, G the model-space grid (rank 1-3), L token positions,
K model calls.
"""
from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                       UniPCMultistepScheduler)
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .codec import SD_SCALE
from .diffusion.common import StepRecorder
from .diffusion.gaussian import GaussianDiffusion, space_timesteps
from .diffusion.guidance import conditional_net

log = logging.getLogger("dcgen.pipeline")

SCHEDULERS = ("ddpm", "ddim", "dpm++", "unipc")
# the scheduler classes a saved pipeline folder may name (an exact table: nothing else is built)
PIPELINE_SCHEDULERS = {c.__name__: c for c in (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler,
                                                 UniPCMultistepScheduler)}
_LEARNED = ("learned", "learned_range")
_FIXED = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}


# --------------------------------------------------------------------------------------------
# Schedulers with dcgen's training schedule
# --------------------------------------------------------------------------------------------


def objective_from_config(node: dict | None) -> GaussianDiffusion:
    """The Gaussian objective of an export's `objective:` node (None: the §7.1 defaults)."""
    from .trust import build, check_node
    node = check_node(node or {"_target_": "dcgen.diffusion.GaussianDiffusion"}, "objective",
                      "the objective node")
    target = node["_target_"]
    if target.endswith("FlowMatching"):
        raise ValueError("the export was trained with the flow objective; diffusers' DDPM-family "
                         "schedulers need the Gaussian one (sample it with dcgen's euler/heun)")
    objective = build(node, "objective", "the objective node")
    if not isinstance(objective, GaussianDiffusion):
        raise ValueError(f"objective {target!r} is not a GaussianDiffusion")
    return objective


def _training_schedule(objective: GaussianDiffusion) -> np.ndarray:
    if not np.array_equal(objective.timestep_map, np.arange(objective.num_timesteps)):
        raise ValueError("pass the training objective, not a respaced one: the schedulers respace "
                         "the full schedule themselves")
    return objective.betas


def _float64_schedule(scheduler, betas):
    """Give a DDPM/DDIM scheduler dcgen's float64 ᾱ table of `betas` (see the module docstring;
    the same arithmetic as GaussianDiffusion's: the cumulative product of 1 − β in float64)."""
    scheduler.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    return scheduler


def make_scheduler(kind: str, objective: GaussianDiffusion | dict | None = None):
    """A diffusers scheduler with the objective's betas (`trained_betas`), ε-prediction and no
    clipping. kind: "ddpm" (learned_range when σ is learned, else dcgen's fixed variance), "ddim"
    (η from the call, ᾱ_prev = 1 at the end), "dpm++" (DPM-Solver++ 2M), "unipc" (UniPC bh2).
    `objective` may be a GaussianDiffusion, an export's objective node, or None (defaults)."""
    if not isinstance(objective, GaussianDiffusion):
        objective = objective_from_config(objective)
    betas = _training_schedule(objective).tolist()
    common = dict(num_train_timesteps=objective.num_timesteps, trained_betas=betas,
                  prediction_type="epsilon")
    if kind == "ddpm":
        vt = "learned_range" if objective.learn_sigma else _FIXED[objective.fixed_variance]
        return _float64_schedule(DDPMScheduler(**common, variance_type=vt, clip_sample=False),
                                 objective.betas)
    if kind == "ddim":
        return _float64_schedule(DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True,
                                               steps_offset=0, timestep_spacing="leading"),
                                 objective.betas)
    if kind in ("dpm++", "dpmsolver++"):
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                           thresholding=False)
    if kind == "unipc":
        return UniPCMultistepScheduler(**common, solver_order=2, predict_x0=True, thresholding=False)
    raise ValueError(f"unknown scheduler {kind!r}: expected one of {', '.join(SCHEDULERS)} "
                     "or a diffusers scheduler instance")


def _check_scheduler(scheduler, objective: GaussianDiffusion) -> None:
    """Warn when a given scheduler's schedule is not the one the model was trained with."""
    T = int(scheduler.config.num_train_timesteps)
    abar = getattr(scheduler, "alphas_cumprod", None)
    if T != objective.num_timesteps or abar is None or \
            float(np.abs(abar.double().cpu().numpy() - objective.alphas_cumprod).max()) > 1e-5:
        log.warning("the scheduler's noise schedule differs from the model's training schedule "
                    "(T=%d, %s); build it with dcgen.pipeline.make_scheduler", objective.num_timesteps,
                    objective.beta_schedule)


# --------------------------------------------------------------------------------------------
# The denoising loop (shared by the pipeline and the `generate` adapter)
# --------------------------------------------------------------------------------------------


def _learns_variance(scheduler) -> bool:
    """True when the scheduler takes [ε | v] (DDPM with learned variance); False: ε only."""
    vt = getattr(scheduler.config, "variance_type", None)
    if vt not in _LEARNED:
        return False
    if not isinstance(scheduler, DDPMScheduler):
        raise ValueError(f"{type(scheduler).__name__} with variance_type={vt!r}: only "
                         "DDPMScheduler steps with the learned variance here; build it with "
                         "variance_type=None (it is given the ε channels only)")
    return True


def set_timesteps(scheduler, num_inference_steps, timesteps=None) -> list[int]:
    """Set the scheduler's timesteps; returns them (descending, original training steps).

    timesteps None: ADM respacing `space_timesteps(T, num_inference_steps)` for a DDPMScheduler
    (dcgen's DDPM; num_inference_steps may then also be "K1,K2,..." or "ddimK"), the scheduler's
    own spacing otherwise. "adm": ADM respacing for any scheduler that takes custom timesteps.
    A sequence: those timesteps, descending."""
    T = int(scheduler.config.num_train_timesteps)
    if timesteps is None and isinstance(scheduler, DDPMScheduler):
        timesteps = "adm"
    if timesteps is None:
        scheduler.set_timesteps(int(num_inference_steps))
    else:
        if isinstance(timesteps, str):
            if timesteps != "adm":
                raise ValueError(f"timesteps must be None, 'adm' or a list, got {timesteps!r}")
            steps = num_inference_steps
            if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
                steps = str(int(steps))
            timesteps = space_timesteps(T, steps)[::-1]
        timesteps = [int(t) for t in timesteps]
        if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(f"{type(scheduler).__name__} takes no custom timesteps; use its own "
                             "spacing (timesteps=None)")
        scheduler.set_timesteps(timesteps=timesteps)
    ts = [int(round(float(t))) for t in scheduler.timesteps]
    if len(set(ts)) != len(ts):  # a repeated timestep: the multistep solvers divide by zero
        raise ValueError(f"{type(scheduler).__name__}: {num_inference_steps} steps give only "
                         f"{len(set(ts))} distinct timesteps of {T}; use fewer steps")
    return ts


def denoise(net, scheduler, x: torch.Tensor, y: torch.Tensor | None, num_inference_steps,
            timesteps=None, generator=None, eta: float = 0.0, callback: Callable | None = None,
            progress: Callable | None = None) -> torch.Tensor:
    """Run `scheduler` from the initial noise x (B, C, *G) to a sample in model space.

    `net(x, t, y) -> (out, aux)` is the model interface (e.g. a `guided_model`); t is the original
    integer timestep, (B,) long. The scheduler is given [ε | v] when it steps with the learned
    variance, else the ε channels [0, C). `callback(i, t, x_t, out, aux)` runs after each model
    call, as in dcgen's samplers (i counts calls from the noisiest, out is the raw output).
    `progress` wraps the timestep iterable (e.g. a progress bar)."""
    ts = set_timesteps(scheduler, num_inference_steps, timesteps)
    T = int(scheduler.config.num_train_timesteps)
    if min(ts) < 0 or max(ts) >= T:
        raise ValueError(f"scheduler timesteps must lie in [0, {T}), got {min(ts)} .. {max(ts)}")
    learned = _learns_variance(scheduler)
    params = inspect.signature(scheduler.step).parameters
    step_kw = {}
    if "generator" in params:
        step_kw["generator"] = generator
    if "eta" in params:
        step_kw["eta"] = eta
    elif eta:
        raise ValueError(f"{type(scheduler).__name__} has no eta")
    B, C = x.shape[0], x.shape[1]
    x = x * scheduler.init_noise_sigma
    it = list(zip(scheduler.timesteps, ts))
    for i, (t, t_int) in enumerate(progress(it) if progress is not None else it):
        x_in = scheduler.scale_model_input(x, t)
        out, aux = net(x_in, torch.full((B,), t_int, dtype=torch.long, device=x.device), y)
        if callback is not None:
            callback(i, t_int, x_in, out, aux)
        if learned:
            if out.shape[1] != 2 * C:
                raise ValueError(f"the scheduler steps with the learned variance but the model "
                                 f"gives {out.shape[1]} channels, not 2C = {2 * C}")
            model_output = out
        else:
            model_output = out[:, :C]
        # in the sample's dtype: a bf16 model's output must not make the step draw bf16 noise
        x = scheduler.step(model_output.to(x.dtype), t, x, **step_kw).prev_sample
    return x


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


@dataclass
class DCDiTPipelineOutput(BaseOutput):
    """images: per `output_type`. With `return_boundary_maps`: boundary_maps, one (B, L) map of
    the conditional rows per model call (None for a DiT); kept_fraction (B, K) (ones for a DiT);
    timesteps, the K original timesteps; token_grid, to reshape L."""

    images: torch.Tensor | np.ndarray | list
    boundary_maps: list | None = None
    kept_fraction: torch.Tensor | None = None
    timesteps: list | None = None
    token_grid: tuple | None = None


class DCDiTPipeline(DiffusionPipeline):
    """Class-conditional sampling of a dcgen DiT / DC-DiT with a diffusers scheduler.

    Components: transformer (a dcgen model: `model(x, t, y, tail_drop=...) -> (out, aux)`, out
    with 2C channels [ε | v] when σ is learned), scheduler (any diffusers scheduler; see
    `make_scheduler` for ones with the training schedule), vae (optional AutoencoderKL; None for
    pixel-space models, whose samples are the images). latent_scale: model-space latents are
    `latent_scale · z`; with `latent_mean`, `latent_std` (C,) they are (z − mean_c) / std_c
    instead (a task trained with latent_norm=channel). cfg_channels: the default of `__call__` ("all", or "legacy3" for
    converted DiT weights)."""

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer, scheduler, vae=None, latent_scale: float = SD_SCALE,
                 cfg_channels: str = "all", latent_mean=None, latent_std=None):
        from .codec import given_statistics
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        stats = given_statistics(latent_mean, latent_std, "DCDiTPipeline")
        self.register_to_config(latent_scale=float(latent_scale), cfg_channels=str(cfg_channels),
                                latent_mean=stats and stats[0], latent_std=stats and stats[1])

    # dcgen models are plain nn.Modules (no .device/.dtype): device handling of our own

    @property
    def device(self) -> torch.device:
        p = next(self.transformer.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.transformer.parameters(), None)
        return p.dtype if p is not None else torch.float32

    @property
    def _execution_device(self) -> torch.device:
        return self.device

    def to(self, *args, **kwargs) -> "DCDiTPipeline":
        """Move (and cast) the transformer and the VAE like `nn.Module.to`."""
        for m in (self.transformer, self.vae):
            if m is not None:
                m.to(*args, **kwargs)
        return self

    # ---- construction from dcgen ----

    @classmethod
    def from_dcgen(cls, path, scheduler="ddpm", vae=None, device="cpu",
                   dtype: torch.dtype | None = None) -> "DCDiTPipeline":
        """The pipeline of a dcgen export or run directory.

        scheduler: "ddpm" | "ddim" | "dpm++" | "unipc" (built with the export's objective
        schedule by `make_scheduler`) or a diffusers scheduler instance (used as given).
        vae: None loads the task's VAE (its `vae` key: hub id or local directory) for a latent
        task; an AutoencoderKL or a path uses that one; False skips decoding (then call with
        output_type="latent"). A pixel-space task takes no VAE."""
        from .io import load_model, read_export_config
        ecfg = read_export_config(path)
        objective = objective_from_config(ecfg.get("objective"))
        model = load_model(path, device=device, dtype=dtype)
        C = model.in_channels
        if model.out_channels != (2 * C if objective.learn_sigma else C):
            raise ValueError(f"{path}: the model gives {model.out_channels} channels but the "
                             f"objective has learn_sigma={objective.learn_sigma} (C={C})")
        if isinstance(scheduler, str):
            scheduler = make_scheduler(scheduler, objective)
        else:
            _check_scheduler(scheduler, objective)
        task = ecfg.get("task") or {}
        latent_scale = float(task.get("latent_scale") or SD_SCALE)
        stats = {}
        if task.get("latent_norm") == "channel":
            if task.get("latent_mean") is None:
                from .validate import ConfigError
                raise ConfigError(f"{path}: the model was trained on per-channel normalised latents "
                                  "(task.latent_norm=channel) but its export does not record the statistics "
                                  "(exports written before 2026-12-07); sample it with dcgen sample, which "
                                  "reads them from the cache, or export it again from a run dir")
            stats = {"latent_mean": task["latent_mean"], "latent_std": task["latent_std"]}
        if task.get("vae"):
            if vae is None or isinstance(vae, (str, Path)):
                from .codec import VAECodec
                vae = VAECodec(vae or task["vae"], scale=latent_scale, device=device).vae
            elif vae is False:
                vae = None
        elif vae not in (None, False):
            raise ValueError(f"{path}: the task is in pixel space (no 'vae' in its config); "
                             "it takes no VAE")
        else:
            vae = None
        cfg_channels = (ecfg.get("sample") or {}).get("cfg_channels") or "all"
        pipe = cls(transformer=model, scheduler=scheduler, vae=vae, latent_scale=latent_scale,
                   cfg_channels=cfg_channels, **stats)
        return pipe.to(device)

    # ---- the pipeline folder: save and load, symmetric ----

    def save_pretrained(self, save_directory, **kwargs) -> Path:
        """Write the pipeline folder: `model_index.json`, `transformer/` (a dcgen export:
        config.json with `_target_`, model.safetensors), `scheduler/` and `vae/` (when there is
        one). `dcgen.load_model(folder)` and `DCDiTPipeline.from_pretrained(folder)` read it back
        bit for bit. Keyword arguments of diffusers' method (push_to_hub, variant, ...) are not
        supported: push with `dcgen export ... push_to_hub=` or `huggingface_hub.upload_folder`."""
        import diffusers

        from .io import PIPELINE_INDEX, PIPELINE_TRANSFORMER, export_model
        from .models import unwrap
        from .files import atomic_write_text
        if kwargs:
            raise TypeError(f"DCDiTPipeline.save_pretrained takes no {', '.join(sorted(kwargs))}")
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        export_model(self.transformer, out / PIPELINE_TRANSFORMER)
        self.scheduler.save_pretrained(str(out / "scheduler"))
        if self.vae is not None:
            self.vae.save_pretrained(str(out / "vae"))
        index = {"_class_name": type(self).__name__, "_diffusers_version": diffusers.__version__,
                 "latent_scale": float(self.config.latent_scale),
                 "latent_mean": self.config.latent_mean, "latent_std": self.config.latent_std,
                 "cfg_channels": str(self.config.cfg_channels),
                 "transformer": ["dcgen", type(unwrap(self.transformer)).__name__],
                 "scheduler": ["diffusers", type(self.scheduler).__name__],
                 "vae": ["diffusers", type(self.vae).__name__] if self.vae is not None else [None, None]}
        atomic_write_text(out / PIPELINE_INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: torch.dtype | None = None,
                        **kwargs) -> "DCDiTPipeline":
        """The pipeline `save_pretrained` wrote (a local folder). The folder is untrusted: the
        index must name DCDiTPipeline, one of the schedulers of `PIPELINE_SCHEDULERS` and an
        AutoencoderKL or no VAE; the transformer loads through `dcgen.load_model` (dcgen's model
        classes only, keys and shapes checked)."""
        from diffusers import AutoencoderKL

        from .io import PIPELINE_INDEX, PIPELINE_TRANSFORMER, load_model, read_config_file
        from .validate import ConfigError
        if kwargs:
            raise TypeError(f"DCDiTPipeline.from_pretrained takes no {', '.join(sorted(kwargs))}")
        root = Path(path)
        where = root / PIPELINE_INDEX
        index = read_config_file(where, "json")

        def refuse(key):
            return ConfigError(f"{where}: refusing {key}={index.get(key)!r}")
        if index.get("_class_name") != cls.__name__:
            raise refuse("_class_name")
        sched = index.get("scheduler")
        if not (isinstance(sched, list) and len(sched) == 2 and sched[0] == "diffusers"
                and sched[1] in PIPELINE_SCHEDULERS):
            raise refuse("scheduler")
        vae_entry = index.get("vae", [None, None])
        if vae_entry not in ([None, None], ["diffusers", "AutoencoderKL"]):
            raise refuse("vae")
        scale, channels = index.get("latent_scale"), index.get("cfg_channels")
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < 1e4):
            raise refuse("latent_scale")
        if channels not in ("all", "legacy3"):
            raise refuse("cfg_channels")
        from .codec import given_statistics
        try:
            stats = given_statistics(index.get("latent_mean"), index.get("latent_std"), str(where))
        except ValueError as e:
            raise ConfigError(f"refusing latent_mean/latent_std: {e}") from None
        model = load_model(root / PIPELINE_TRANSFORMER, device=device, dtype=dtype)
        scheduler = PIPELINE_SCHEDULERS[sched[1]].from_pretrained(str(root / "scheduler"))
        betas = scheduler.config.get("trained_betas")
        if isinstance(scheduler, (DDPMScheduler, DDIMScheduler)) and betas is not None:
            _float64_schedule(scheduler, betas)  # make_scheduler's table (the config keeps the betas only)
        vae = AutoencoderKL.from_pretrained(str(root / "vae")) if vae_entry[0] else None
        pipe = cls(transformer=model, scheduler=scheduler, vae=vae, latent_scale=float(scale),
                   cfg_channels=channels, latent_mean=stats and stats[0], latent_std=stats and stats[1])
        return pipe.to(device)

    # ---- sampling ----

    def _sample_shape(self, B: int) -> tuple[int, ...]:
        m = self.transformer
        return (B, m.in_channels, *(g * p for g, p in zip(m.token_grid, m.patch)))

    @torch.no_grad()
    def decode_latents(self, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Model space -> images in [-1, 1] (the VAE decoder at x / latent_scale, or at
        x · std_c + mean_c with per-channel statistics; identity without a VAE)."""
        if self.vae is None:
            return x
        p = next(self.vae.parameters())
        if self.config.latent_mean is not None:
            from .codec import unnormalise_channels
            x = unnormalise_channels(x.float(), self.config.latent_mean, self.config.latent_std)
            scale = 1.0
        else:
            scale = self.config.latent_scale
        outs = [self.vae.decode(chunk.to(p.device, p.dtype) / scale).sample.float() for chunk in x.split(batch_size)]
        return torch.cat(outs)

    @torch.no_grad()
    def __call__(self, class_labels=None, num_inference_steps=250, guidance_scale: float = 1.0,
                 tail_drop=0.0, tail_drop_uncond=None, generator=None,
                 latents: torch.Tensor | None = None, return_boundary_maps: bool = False,
                 output_type: str = "pt", return_dict: bool = True, timesteps=None,
                 cfg_channels: str | None = None, eta: float = 0.0, batch_size: int | None = None,
                 callback: Callable | None = None, cfg_interval=None):
        """Generate class-conditional samples.

        class_labels: int, list or (B,) tensor in [0, num_classes) (None for an unconditional
            model, with batch_size or latents giving B).
        num_inference_steps: model calls (for DDPM also an ADM respacing string); timesteps:
            see `set_timesteps` (None: ADM respacing for DDPM, the scheduler's own otherwise).
        guidance_scale: CFG scale s (1 = off); ε̂ = ε_u + s(ε_c − ε_u) on the channels of
            cfg_channels (None: the pipeline's), the variance from the conditional branch.
        tail_drop: ρ_c, float or (B,) tensor; tail_drop_uncond: ρ_u (None = ρ_c). Lite-CFG:
            guidance_scale=1.25, tail_drop=0.0, tail_drop_uncond=0.9.
        cfg_interval: [lo, hi]: guide only the calls at noise levels t / (T − 1) in it (None: all).
        generator: draws the initial noise (unless `latents` is given) and the schedulers'
            per-step noise, in dcgen's order. latents: the initial noise (B, C, *G).
        return_boundary_maps: also return, per model call, the router's p of the conditional
            rows (B, L) and the kept fraction (a DC-DiT's first stage).
        output_type: "latent" (model-space samples (B, C, *G)), "pt" (images in [0, 1],
            (B, C_img, *G')), "np" (channels last) or "pil" (2-D, 1 or 3 channels).
        callback(i, t, x_t, out, aux): after every model call (see `denoise`)."""
        if output_type not in ("latent", "pt", "np", "pil"):
            raise ValueError(f"output_type must be 'latent', 'pt', 'np' or 'pil', got {output_type!r}")
        model, device = self.transformer, self._execution_device
        nc = int(getattr(model, "num_classes", 0) or 0)
        if class_labels is not None:
            if nc == 0:
                raise ValueError("class_labels given but the model is unconditional")
            y = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if y.numel() == 0 or int(y.min()) < 0 or int(y.max()) >= nc:
                raise ValueError(f"class_labels must lie in [0, {nc}), got {y.tolist()}")
            B = y.numel()
            y = y.to(device)
        else:
            if nc > 0:
                raise ValueError("class_labels are required for a class-conditional model")
            y = None
            B = latents.shape[0] if latents is not None else batch_size
            if B is None:
                raise ValueError("an unconditional model needs batch_size or latents")
        shape = self._sample_shape(B)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
            latents = latents.to(device=device, dtype=torch.float32)

        net = conditional_net(model, int(getattr(model, "num_classes", 0) or 0), guidance_scale,
                              cfg_channels or self.config.cfg_channels, tail_drop, tail_drop_uncond,
                              interval=cfg_interval, t_max=self.scheduler.config.num_train_timesteps - 1)
        # the recording of dcgen.sample.generate: every call's kept fraction, and with
        # return_boundary_maps every call's map of the B (conditional) rows
        record = StepRecorder(B, map_rows=B if return_boundary_maps else 0, then=callback)
        x = denoise(net, self.scheduler, latents, y, num_inference_steps, timesteps=timesteps,
                    generator=generator, eta=eta, callback=record, progress=self.progress_bar)

        if output_type == "latent":
            images = x
        else:
            images = (self.decode_latents(x) / 2 + 0.5).clamp(0, 1)
            if output_type in ("np", "pil"):
                images = images.cpu().permute(0, *range(2, images.dim()), 1).float().numpy()
            if output_type == "pil":
                if images.ndim != 4 or images.shape[-1] not in (1, 3):
                    raise ValueError(f"output_type='pil' needs 2-D images with 1 or 3 channels, "
                                     f"got {images.shape[1:]}")
                images = self.numpy_to_pil(images)

        result = DCDiTPipelineOutput(images=images)
        if return_boundary_maps:
            maps = [record.maps[i][0] for i in sorted(record.maps)]
            result = DCDiTPipelineOutput(images=images, boundary_maps=maps if maps else None,
                                         kept_fraction=record.kept_matrix(), timesteps=record.ts,
                                         token_grid=tuple(getattr(model, "token_grid", ())))
        return result if return_dict else result.to_tuple()


# --------------------------------------------------------------------------------------------
# dcgen.sample.generate through diffusers schedulers
# --------------------------------------------------------------------------------------------


class DiffusersSamplers:
    """A Gaussian objective whose `sample` also runs diffusers schedulers.

    `methods` maps a sampler name to a `make_scheduler` kind (default: "dpm++" and "unipc");
    other methods ("ddpm", "ddim") go to the wrapped objective unchanged, as does every other
    attribute. `dcgen.sample.generate(model, DiffusersSamplers(objective), task, sampler="dpm++",
    steps=20, ...)` therefore returns what it always does: samples in model space (N, C, *G) on
    the CPU, labels, and with `record` the per-call kept fractions, mean p and boundary maps. The
    model calls of a scheduler run are `steps` (one per timestep)."""

    DEFAULT_METHODS = {"dpm++": "dpm++", "unipc": "unipc"}

    def __init__(self, objective: GaussianDiffusion, methods: dict | None = None):
        if not isinstance(objective, GaussianDiffusion):
            raise ValueError(f"diffusers schedulers need the Gaussian objective, got "
                             f"{type(objective).__name__}")
        self.objective = objective
        self.methods = dict(self.DEFAULT_METHODS if methods is None else methods)

    def __getattr__(self, name):
        if name == "objective":  # not set yet (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.objective, name)

    def model_calls(self, steps, method: str) -> int:
        if method in self.methods:
            return len(set_timesteps(make_scheduler(self.methods[method], self.objective), steps))
        return self.objective.model_calls(steps, method)

    def check_sampler(self, steps, method: str) -> None:
        """Raise ValueError unless `method` can sample in `steps`: the diffusers samplers take 1 to
        T − 1 steps (T training timesteps; at T their spacing repeats a timestep and the
        multistep solvers divide by zero), each distinct (checked on the real scheduler)."""
        if method not in self.methods:
            if method not in ("ddpm", "ddim"):
                raise ValueError(f"sampler={method}: the Gaussian objective samples with ddpm, ddim, "
                                 f"{', '.join(self.methods)} (euler and heun need the flow objective)")
            return self.objective.check_sampler(steps, method)
        T = self.objective.num_timesteps
        if not (isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and 1 <= steps < T):
            raise ValueError(f"steps={steps}: {method} takes 1 to {T - 1} steps (the model was "
                             f"trained with {T} timesteps)")
        set_timesteps(make_scheduler(self.methods[method], self.objective), int(steps))

    def sample(self, model, shape, y=None, steps=250, method: str = "ddpm", noise=None,
               generator=None, model_kwargs=None, progress: bool = False,
               callback: Callable | None = None, device=None, dtype=torch.float32,
               eta: float = 0.0, **kw) -> torch.Tensor:
        """As `GaussianDiffusion.sample`; methods in `self.methods` run `denoise` with a fresh
        scheduler (the initial noise from `noise` or `generator`, then the per-step noise from
        `generator`)."""
        if method not in self.methods:
            return self.objective.sample(model, shape, y, steps=steps, method=method, noise=noise,
                                         generator=generator, model_kwargs=model_kwargs, progress=progress,
                                         callback=callback, device=device, dtype=dtype, **kw)
        if kw.get("clip_denoised"):
            raise ValueError("clip_denoised is not supported by the diffusers samplers")
        device = noise.device if (device is None and noise is not None) else device
        x = self.objective._init_noise(shape, noise, generator, device, dtype)
        extra = dict(model_kwargs or {})

        def net(x_, t_, y_):
            return model(x_, t_, y_, **extra)

        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm
        return denoise(net, make_scheduler(self.methods[method], self.objective), x, y, steps,
                       generator=generator, eta=eta, callback=callback, progress=bar)


def with_diffusers_samplers(objective, methods: dict | None = None):
    """`DiffusersSamplers(objective)` for a Gaussian objective; any other objective unchanged."""
    if isinstance(objective, GaussianDiffusion):
        return DiffusersSamplers(objective, methods)
    return objective


__all__ = ["DCDiTPipeline", "DCDiTPipelineOutput", "DiffusersSamplers", "with_diffusers_samplers",
           "make_scheduler", "objective_from_config", "set_timesteps", "denoise", "SCHEDULERS"]
