"""The voxel metrics of real shapes: held-out shapes scored as if they were samples, against the
same training references `tools/compare.py` uses, so that a model's 1-NNA / COV / MMD can be read
against what the data itself scores at the same sample size.

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
    ap.add_argument("--num-points", type=int, default=2048, help="surface points per shape (compare's --num-points)")
    ap.add_argument("--seed", type=int, default=0, help="draws the references, as compare's evaluation does")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from dcgen.tasks.voxel.task import VoxelTask
    train = VoxelTask(root=args.train, resolution=args.resolution, progress=False)
    held = VoxelTask(root=args.heldout, resolution=args.resolution, progress=False)
    occ, _ = held.reference_occupancy(args.num_samples, seed=args.seed + 1)  # bools: evaluate takes them as they are
    stats = train.evaluate(occ, num_reference=args.num_reference, num_points=args.num_points, seed=args.seed)
    stats.update(num_samples=len(occ), num_reference=args.num_reference,
                 train=str(args.train), heldout=str(args.heldout), resolution=args.resolution)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(stats, indent=2, default=float))
    print(json.dumps(stats, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
