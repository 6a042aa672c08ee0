"""The voxel metrics of real shapes (held-out shapes scored as samples against the training
references): a driver of dcgen.tasks.voxel.analysis.data_baseline.

    python tools/make_shapes.py --out data/shapes_heldout --per-class 34 --seed 1
    python tools/voxel_data_baseline.py --train data/shapes --heldout data/shapes_heldout \
        --num-samples 200 --num-reference 300 --num-points 512 --out docs/results/voxels/data_baseline.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=Path, required=True, help="the training meshes (compare's task.root)")
    ap.add_argument("--heldout", type=Path, required=True, help="other meshes of the same classes")
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--num-samples", type=int, default=200)
    ap.add_argument("--num-reference", type=int, default=300)
    ap.add_argument("--num-points", type=int, default=2048, help="surface points per shape (compare's num_points)")
    ap.add_argument("--seed", type=int, default=0, help="draws the references, as compare's evaluation does")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    from dcgen.tasks.voxel.analysis import data_baseline
    stats = data_baseline(a.train, a.heldout, a.resolution, a.num_samples, a.num_reference, a.num_points, a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(stats, indent=2, default=float))
    print(json.dumps(stats, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
