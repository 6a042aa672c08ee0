"""Sampling: generation with optional CFG / Lite-CFG / elastic tail dropping, recording what the
router did at every step, and the `dcgen sample` command (METHOD §8).

Shape legend: N samples, B batch, C channels, G grid, L token-grid positions, K model calls.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .diffusion.objective import check_objective
from .io import load_run  # noqa: F401  (re-exported: dcgen.sample.load_run)
from .rng import host_to_device
from .run import SAMPLE_CONFIG_FILE, Run
from .diffusion.common import StepRecorder
from .diffusion.guidance import conditional_net

log = logging.getLogger("dcgen.sample")


def pick_device(choice: str = "auto") -> torch.device:
    """"auto" (the GPU when there is one), "cpu", "cuda" or "cuda:N"; anything else, or CUDA on a
    machine without it, is a one-line ValueError."""
    choice = str(choice)
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(choice)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={choice}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={choice}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={choice}: no CUDA GPU is available here (use device=cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={choice}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def check_memory(num_samples: int, task, what: str = "num_samples") -> None:
    """Refuse a request whose samples (model space, float32, held until written) would take more
    than half of this machine's memory."""
    per = 4 * task.channels * math.prod(task.grid)
    need = per * int(num_samples)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > total // 2:
        raise ValueError(f"{what}={num_samples}: the samples would take {need / 2**30:.1f} GiB "
                         f"({per} bytes each), more than half of this machine's "
                         f"{total / 2**30:.0f} GiB; sample fewer (or use dcgen evaluate)")


class NonFiniteSamplesError(ValueError):
    """A sampler produced NaN or inf: reported in one line (exit 2), no sample written."""


def check_request(objective, task, num_samples: int, steps, sampler: str, labels=None,
                  seed: int = 0) -> None:
    """Raise ValueError for a sampling request that cannot work, before anything is computed or
    written: the sampler and its step limit (`objective.check_sampler`), labels in [0,
    num_classes) and no more of them than samples, a seed torch accepts."""
    if not (isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples >= 1):
        raise ValueError(f"num_samples={num_samples!r}: expected an integer >= 1")
    check_objective(objective)
    objective.check_sampler(steps, sampler)
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2 ** 63):
        raise ValueError(f"seed={seed!r}: expected an integer in [0, 2**63)")
    if labels is not None:
        lab = torch.as_tensor(labels).reshape(-1)
        nc = task.num_classes
        if nc == 0:
            raise ValueError("labels given, but the model is unconditional (num_classes=0)")
        if lab.numel() == 0 or lab.dtype.is_floating_point or int(lab.min()) < 0 or int(lab.max()) >= nc:
            raise ValueError(f"labels must be class ids in [0, {nc}), got {lab.tolist()}")
        if lab.numel() > num_samples:
            raise ValueError(f"{lab.numel()} labels for num_samples={num_samples}: give at most one "
                             "label per sample (fewer are repeated in turn)")


SAMPLING_KEYS = ("num_samples", "batch_size", "steps", "sampler", "cfg_scale", "cfg_channels",
                 "tail_drop", "tail_drop_uncond", "cache_threshold", "cfg_interval", "guide_tail_drop")


def sampling_args(node, export_cfg: dict | None = None, **changes) -> dict:
    """The keyword arguments of `generate` from a sampling node (configs/sampling/default.yaml,
    as composed into sample.yaml, evaluate.yaml or train.yaml's `sample:`). cfg_channels null
    takes the export's setting. `changes` replace keys (e.g. a process's share of num_samples)."""
    args = {k: node[k] for k in SAMPLING_KEYS if k in node}
    if args.get("cfg_channels") is None:
        args["cfg_channels"] = ((export_cfg or {}).get("sample") or {}).get("cfg_channels", "all")
    args.update(changes)
    return args


@torch.no_grad()
def generate(model, objective, task, num_samples: int = 16, steps: int = 250, sampler: str = "ddpm",
             cfg_scale: float = 1.0, cfg_channels: str = "all", tail_drop: float = 0.0,
             tail_drop_uncond: float | None = None, labels=None, seed: int = 0, batch_size: int = 64,
             device=None, record: bool = True, map_samples: int = 4, map_timesteps: int = 8,
             progress: bool = False, flop_fn=None, cache_threshold: float | None = None,
             cfg_interval=None, guide=None, guide_tail_drop: float | None = None) -> dict:
    """Sample `num_samples` in model space. With `record`, also collect per model call the kept
    fraction of every (conditional) sample, the mean p, and for the first `map_samples` samples
    the boundary-probability maps and x_t at `map_timesteps` evenly spaced calls.

    Returns dict: samples (N, C, *G) cpu, labels (N,) or None, and with `record`: ts (K,),
    kept (N, K), mean_p (N, K), maps {call index: (probs (S, L), x_t (S, C, *G))}, grid,
    step_flops (N, K) if `flop_fn` is given (MACs per sample per call), seconds.
    `cache_threshold`: step caching (dcgen.diffusion.caching; None: off, 0: on but never reusing);
    with it, backbone_calls and backbone_reused (forwards, summed over batches) and, with
    `record`, reused (N, K) bool: the calls whose backbone was skipped, per sample.
    `cfg_interval` [lo, hi]: guide only at noise levels t / t_max in it (dcgen.diffusion.guidance);
    with `record`, guided_calls (K,) bool. `guide`, `guide_tail_drop`: autoguidance by `guide` (a
    weaker model, or `model` itself at a higher tail drop) instead of the unconditional branch.
    """
    from .diffusion.caching import StepCache, check_threshold, step_caching
    device = device or next(model.parameters()).device
    model.eval()
    nc = task.num_classes
    check_request(objective, task, num_samples=num_samples, steps=steps, sampler=sampler,
                  labels=labels, seed=seed)
    check_threshold(cache_threshold)
    cache = StepCache(cache_threshold) if cache_threshold is not None else None
    calls = reused = 0
    gen = torch.Generator().manual_seed(seed)
    if labels is None and nc > 0:
        labels = torch.randint(0, nc, (num_samples,), generator=gen)
    elif labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.numel() != num_samples:  # fewer labels than samples: repeated in turn
            labels = labels.repeat(math.ceil(num_samples / labels.numel()))[:num_samples]
    if guide is not None and guide is not model and flop_fn is not None:
        raise ValueError("FLOP counting with a separate guide model is not implemented (its rows are "
                         "not in the model's aux); count with the model as its own guide, or without flop_fn")
    # the noisiest model timestep: 999 for both objectives (Gaussian: T - 1; flow: s * 999)
    t_max = float(getattr(objective, "num_timesteps", 1000) - 1)
    net = conditional_net(model, nc, cfg_scale, cfg_channels, tail_drop, tail_drop_uncond,
                          interval=cfg_interval, t_max=t_max, guide=guide, guide_tail_drop=guide_tail_drop)
    shape_one = (task.channels, *task.grid)
    outs, rec = [], {"ts": None, "kept": [], "mean_p": [], "maps": {}, "step_flops": []}
    map_calls = None
    if record:
        n_calls = objective.model_calls(steps, sampler)
        map_calls = set(np.linspace(0, max(n_calls - 1, 0), map_timesteps).round().astype(int).tolist())
    t0 = time.time()
    for start in range(0, num_samples, batch_size):
        B = min(batch_size, num_samples - start)
        y = host_to_device(labels[start:start + B], device) if labels is not None else None
        noise = host_to_device(torch.randn(B, *shape_one, generator=gen), device)
        recorder = StepRecorder(B, map_rows=min(map_samples, B) if start == 0 else 0, map_calls=map_calls,
                                flop_fn=flop_fn, cache=cache) if record else None
        if cache is not None:
            cache.reset()  # nothing carries over between batches
        with step_caching(model, cache):
            x = objective.sample(net, (B, *shape_one), y=y, steps=steps, method=sampler, noise=noise,
                                 generator=gen, callback=recorder, progress=progress, device=device)
        outs.append(x.float().cpu())
        if cache is not None:
            calls, reused = calls + cache.calls, reused + cache.reused
            if record:
                rec.setdefault("reused", []).append(torch.tensor(recorder.reused).expand(B, -1))
        if record:
            rec["ts"] = recorder.ts
            rec["kept"].append(recorder.kept_matrix())
            rec["mean_p"].append(recorder.mean_p_matrix())
            rec["maps"].update(recorder.maps)
            if recorder.flops_matrix() is not None:
                rec["step_flops"].append(recorder.flops_matrix())
    samples = torch.cat(outs)
    bad = int((~torch.isfinite(samples)).sum())
    if bad:
        raise NonFiniteSamplesError(
            f"sampling produced {bad} non-finite values of {samples.numel()} (sampler={sampler}, "
            f"steps={steps}, cfg_scale={cfg_scale}); nothing was written")
    result = {"samples": samples, "labels": labels, "seconds": time.time() - t0,
              "token_grid": tuple(model.token_grid)}
    if record and hasattr(net, "guided_rows"):
        result["guided_calls"] = torch.tensor([bool(net.guided_rows(torch.tensor([t]))[0]) for t in rec["ts"] or []],
                                              dtype=torch.bool)
    if cache is not None:
        result.update(backbone_calls=calls, backbone_reused=reused)
        if record:
            result["reused"] = torch.cat(rec["reused"])
    if record:
        result.update(ts=rec["ts"], kept=torch.cat(rec["kept"]), mean_p=torch.cat(rec["mean_p"]),
                      maps=rec["maps"])
        if rec["step_flops"]:
            result["step_flops"] = torch.cat(rec["step_flops"])
    return result


def guide_model(guide_run_dir, run_dir, model, task, device):
    """The autoguidance model of `guide_run_dir` (a run dir or export, loaded as untrusted as any
    other; its task must have the model's shape), `model` itself when it names the same run, or
    None."""
    if guide_run_dir is None:
        return None
    if Path(guide_run_dir).resolve() == Path(run_dir).resolve():
        return model
    guide, _, gtask, _ = load_run(guide_run_dir, device)
    if (tuple(gtask.grid), gtask.channels, gtask.num_classes) != (tuple(task.grid), task.channels, task.num_classes):
        raise ValueError(f"guide_run_dir={guide_run_dir}: its task has grid {tuple(gtask.grid)}, {gtask.channels} "
                         f"channels and {gtask.num_classes} classes; the model's has {tuple(task.grid)}, "
                         f"{task.channels} and {task.num_classes}")
    return guide.eval()


def write_boundary_outputs(result: dict, task, out_dir: Path) -> list[Path]:
    """Boundary maps across timesteps (one figure per mapped sample), the kept-fraction-vs-t plot
    and the statistics JSON."""
    from . import viz
    out_dir = Path(out_dir)
    written = []
    if result.get("maps"):
        calls = sorted(result["maps"])
        n_maps = result["maps"][calls[0]][0].shape[0]
        grid = tuple(result["token_grid"])
        kept_all = result["kept"]
        for s in range(n_maps):
            probs = [result["maps"][c][0][s].numpy() for c in calls]
            frames = [task.decode(result["maps"][c][1][s:s + 1])[0].numpy() for c in calls]
            ts = [result["maps"][c][2] for c in calls]
            kf = [float(kept_all[s, c]) for c in calls]
            written.append(viz.boundary_map_figure(frames, probs, grid, out_dir / f"boundary_map_{s:02d}.png",
                                                   ts=ts, kept_fraction=kf))
    stats = {}
    if result.get("ts"):
        kept = result["kept"].numpy()  # (N, K)
        ts = result["ts"]
        written.append(viz.kept_fraction_plot(ts, kept.mean(0), out_dir / "kept_fraction_vs_t.png",
                                              per_sample=kept))
        L = int(np.prod(result["token_grid"]))
        stats = {"timesteps": ts, "kept_fraction_mean": kept.mean(0).tolist(),
                 "kept_fraction_std": kept.std(0).tolist(),
                 "mean_p": result["mean_p"].numpy().mean(0).tolist(),
                 "compression_mean": (1.0 / np.clip(kept, 1.0 / L, None)).mean(0).tolist(),
                 "kept_fraction_overall": float(kept.mean()), "tokens_per_sample_grid": L}
    stats.update({"num_samples": int(result["samples"].shape[0]), "seconds": result["seconds"],
                  "seconds_per_sample": result["seconds"] / max(1, result["samples"].shape[0])})
    written.append(viz.write_stats_json(stats, out_dir / "stats.json"))
    return written


def sample_command(cfg: DictConfig) -> Path:
    """`dcgen sample run_dir=... [num_samples steps sampler cfg_scale tail_drop seed ...]`.
    Everything is checked, and the samples made, before the output folder is created."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = pick_device(cfg.device)
    model, objective, task, ecfg = load_run(cfg.run_dir, device)
    from .pipeline import with_diffusers_samplers
    objective = with_diffusers_samplers(objective)  # sampler=dpm++ | unipc through diffusers
    args = sampling_args(cfg, ecfg)
    labels = OmegaConf.to_container(cfg.labels) if cfg.labels is not None else None
    check_request(objective, task, num_samples=args["num_samples"], steps=args["steps"],
                  sampler=args["sampler"], labels=labels, seed=cfg.seed)
    check_memory(args["num_samples"], task)
    guide = guide_model(cfg.get("guide_run_dir"), cfg.run_dir, model, task, device)
    if args.get("cfg_interval") is not None:
        args["cfg_interval"] = list(args["cfg_interval"])
    conditional_net(model, task.num_classes, args["cfg_scale"], args["cfg_channels"],
                    args["tail_drop"], args.get("tail_drop_uncond"), interval=args.get("cfg_interval"),
                    guide=guide, guide_tail_drop=args.get("guide_tail_drop"))  # checks the guidance settings
    result = generate(model, objective, task, **args, labels=labels, guide=guide,
                      seed=cfg.seed, device=device, record=True, map_samples=cfg.boundary_maps,
                      map_timesteps=cfg.map_timesteps, progress=True)
    data = task.decode(result["samples"].to(device)).cpu()
    out_dir = Path(cfg.out_dir or Run(cfg.run_dir).samples_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    files = task.write_samples(data, out_dir, labels=result["labels"])
    np.save(out_dir / "samples_model_space.npy", result["samples"].numpy())
    files += write_boundary_outputs(result, task, out_dir)
    OmegaConf.save(cfg, out_dir / SAMPLE_CONFIG_FILE)
    log.info("wrote %d files to %s", len(files), out_dir)
    print(out_dir)
    return out_dir
