"""Where a voxel DC-DiT keeps its tokens, by region of the clean shape: a driver of
dcgen.tasks.voxel.analysis.region_report.

    python tools/voxel_regions.py --run runs/compare_voxels/voxels_dcdit/seed0/run \
        --num-shapes 128 --out docs/results/voxels/regions
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv=None) -> int:
    from dcgen.tasks.voxel.analysis import TIMESTEPS, region_report
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a voxel DC-DiT run dir (its EMA weights)")
    ap.add_argument("--num-shapes", type=int, default=128)
    ap.add_argument("--timesteps", type=int, nargs="+", default=list(TIMESTEPS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    region_report(a.run, a.out, a.num_shapes, a.timesteps, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
