#!/usr/bin/env python
"""Boundary maps over timesteps, at one or several tail-drop budgets (METHOD §8, §10.4).

For the same noise and labels at every budget: per sample, the decoded x_t and the router's
boundary-probability map at `--timesteps` evenly spaced sampling steps (noisy -> clean), the
kept-fraction-vs-t plot of each budget, one plot comparing the budgets, and summary.json with the
kept fraction per timestep (the trend of [P2] Fig. 3: fewer tokens at noisy t).

    python tools/boundary_maps.py --run-dir runs/dcdit_b --out maps --labels 207 360 387 974 \\
        --tail-drop 0 0.3 0.6 --steps 250 --timesteps 8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

try:
    import dcgen  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def budget_plot(curves: dict, path: Path) -> Path:
    """Mean kept fraction against t, one line per budget (x axis noisy -> clean)."""
    from matplotlib.figure import Figure

    from dcgen.viz import save_figure
    fig = Figure(figsize=(5.0, 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for rho, (ts, kept) in sorted(curves.items()):
        ax.plot(ts, kept, marker="o", ms=2, lw=1.5, label=f"ρ = {rho:g}")
    ts_all = [t for ts, _ in curves.values() for t in ts]
    if ts_all and max(ts_all) > min(ts_all):
        ax.set_xlim(max(ts_all), min(ts_all))
    ax.set_ylim(0, 1)
    ax.set_xlabel("timestep t  (noisy → clean)")
    ax.set_ylabel("kept token fraction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="run or export directory of a DC-DiT")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--labels", type=int, nargs="+", default=None, help="class ids (default: uniform)")
    ap.add_argument("--tail-drop", type=float, nargs="+", default=[0.0], help="budgets rho")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--timesteps", type=int, default=8, help="maps per sample, noisy to clean")
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    from dcgen.sample import generate, load_run, pick_device, write_boundary_outputs
    try:
        device = pick_device(args.device)
        model, objective, task, ecfg = load_run(args.run_dir, device)
        if not hasattr(model, "router"):
            raise ValueError(f"{args.run_dir}: boundary maps need a DC-DiT, this is a {type(model).__name__}")
        cfg_channels = ecfg.get("sample", {}).get("cfg_channels", "all")
        out = Path(args.out)
        summary, curves = {"run_dir": str(args.run_dir), "budgets": {}}, {}
        for rho in args.tail_drop:
            res = generate(model, objective, task, num_samples=args.num_samples, steps=args.steps,
                           sampler=args.sampler, cfg_scale=args.cfg_scale, cfg_channels=cfg_channels,
                           tail_drop=rho, labels=args.labels, seed=args.seed, device=device, record=True,
                           map_samples=args.num_samples, map_timesteps=args.timesteps)
            d = out / f"rho{rho:.2f}"
            files = write_boundary_outputs(res, task, d)
            kept = res["kept"].numpy().mean(0)
            curves[rho] = (res["ts"], kept.tolist())
            # five evenly spaced steps from noisy to clean, as [P2] Fig. 3 reports
            five = [round(i * (len(kept) - 1) / 4) for i in range(5)] if len(kept) >= 5 else list(range(len(kept)))
            summary["budgets"][f"{rho:g}"] = {
                "dir": str(d), "files": [str(f) for f in files],
                "kept_fraction_overall": float(kept.mean()),
                "kept_fraction_noisy_to_clean": [float(kept[i]) for i in five],
                "timesteps_noisy_to_clean": [res["ts"][i] for i in five]}
        budget_plot(curves, out / "kept_fraction_vs_t_budgets.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    except (ValueError, FileNotFoundError) as e:
        print(f"boundary_maps: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    for rho, b in summary["budgets"].items():
        trend = " -> ".join(f"{100 * k:.1f}%" for k in b["kept_fraction_noisy_to_clean"])
        print(f"rho {rho}: kept noisy -> clean {trend}  ({b['dir']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
