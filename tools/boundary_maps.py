#!/usr/bin/env python
"""Boundary maps over timesteps at one or several tail-drop budgets: a driver of
dcgen.analysis.boundary_maps (see its docstring).

    python tools/boundary_maps.py --run-dir runs/dcdit_b --out maps --labels 207 360 387 974 \\
        --tail-drop 0 0.3 0.6 --steps 250 --timesteps 8
"""
from __future__ import annotations

import argparse
import sys


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
    a = ap.parse_args(argv)
    from dcgen.analysis import boundary_maps
    try:
        summary = boundary_maps(a.run_dir, a.out, a.num_samples, a.labels, a.tail_drop, a.steps, a.sampler,
                                a.timesteps, a.cfg_scale, a.seed, a.device)
    except (ValueError, FileNotFoundError) as e:
        print(f"boundary_maps: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    for rho, b in summary["budgets"].items():
        trend = " -> ".join(f"{100 * k:.1f}%" for k in b["kept_fraction_noisy_to_clean"])
        print(f"rho {rho}: kept noisy -> clean {trend}  ({b['dir']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
