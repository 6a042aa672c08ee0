"""Where a voxel DC-DiT keeps its tokens: training shapes noised at several timesteps, the first
chunking stage's kept fraction split by region of the clean shape (empty, surface and interior
token cells; `tasks/voxel/metrics.py: model_region_compression`). Writes a JSON and a plot.

    python tools/voxel_regions.py --run runs/compare_voxels/voxels_dcdit/seed0/run \
        --num-shapes 128 --out docs/results/voxels/regions
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

TIMESTEPS = (0, 100, 250, 500, 750, 999)
REGIONS = ("empty", "surface", "interior", "all")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a voxel DC-DiT run dir (its EMA weights)")
    ap.add_argument("--num-shapes", type=int, default=128)
    ap.add_argument("--timesteps", type=int, nargs="+", default=list(TIMESTEPS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from dcgen.sample import load_run
    from dcgen.tasks.voxel.metrics import model_region_compression

    model, objective, task, _ = load_run(args.run, "cpu")
    ds = task.train_dataset()
    idx = np.sort(np.random.default_rng(args.seed).choice(len(ds), min(args.num_shapes, len(ds)), replace=False))
    items = [ds[int(i)] for i in idx]
    x0 = torch.stack([x for x, _ in items])
    y = torch.stack([torch.as_tensor(label) for _, label in items]) if task.num_classes else None
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(x0.shape, generator=g)
    rows = []
    for t in args.timesteps:
        r = model_region_compression(model, objective, x0, y, t=torch.full((len(x0),), t, dtype=torch.long),
                                     noise=noise)
        rows.append({"t": t, **r})
        print(f"t {t:4d}: " + ", ".join(f"{k} {r[f'kept_fraction_{k}']:.3f}" for k in REGIONS), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "regions.json").write_text(json.dumps(
        {"run": str(args.run), "num_shapes": len(x0), "seed": args.seed, "rows": rows}, indent=2, default=float))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k in REGIONS:
        ax.plot([r["t"] for r in rows], [r[f"kept_fraction_{k}"] for r in rows], "o-", label=k)
    ax.invert_xaxis()
    ax.set(xlabel="timestep t (noisy → clean)", ylabel="kept fraction", ylim=(0, 1),
           title="kept tokens by region of the clean shape")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "regions.png", dpi=120)
    plt.close(fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
