"""Voxel studies as library functions (tools/voxel_regions.py and tools/voxel_data_baseline.py
drive them):

- `region_report`: where a voxel DC-DiT keeps its tokens: training shapes noised at several
  timesteps, the first chunking stage's kept fraction split by region of the clean shape (empty,
  surface and interior token cells; metrics.model_region_compression). JSON and a plot.
- `data_baseline`: held-out shapes scored as if they were samples, against the same training
  references `dcgen compare` uses, so a model's 1-NNA / COV / MMD can be read against what the
  data itself scores at the same sample size.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TIMESTEPS = (0, 100, 250, 500, 750, 999)
REGIONS = ("empty", "surface", "interior", "all")


def region_report(run_dir, out, num_shapes: int = 128, timesteps=TIMESTEPS, seed: int = 0) -> dict:
    """Kept fraction by region at each t for `num_shapes` training shapes; regions.json and
    regions.png in `out`."""
    from dcgen.io import load_run

    from .metrics import model_region_compression
    model, objective, task, _ = load_run(run_dir, "cpu")
    ds = task.train_dataset()
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), min(num_shapes, len(ds)), replace=False))
    items = [ds[int(i)] for i in idx]
    x0 = torch.stack([x for x, _ in items])
    y = torch.stack([torch.as_tensor(label) for _, label in items]) if task.num_classes else None
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    rows = []
    for t in timesteps:
        r = model_region_compression(model, objective, x0, y, t=torch.full((len(x0),), t, dtype=torch.long),
                                     noise=noise)
        rows.append({"t": t, **r})
        print(f"t {t:4d}: " + ", ".join(f"{k} {r[f'kept_fraction_{k}']:.3f}" for k in REGIONS), flush=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"run": str(run_dir), "num_shapes": len(x0), "seed": seed, "rows": rows}
    (out / "regions.json").write_text(json.dumps(report, indent=2, default=float))
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
    fig.savefig(out / "regions.png", dpi=120)
    plt.close(fig)
    return report


def data_baseline(train_root, heldout_root, resolution: int = 16, num_samples: int = 200,
                  num_reference: int = 300, num_points: int = 2048, seed: int = 0) -> dict:
    """The voxel metrics of `num_samples` held-out shapes against the training references."""
    from .task import VoxelTask
    train = VoxelTask(root=train_root, resolution=resolution, progress=False)
    held = VoxelTask(root=heldout_root, resolution=resolution, progress=False)
    occ, _ = held.reference_occupancy(num_samples, seed=seed + 1)  # bools: evaluate takes them as they are
    stats = train.evaluate(occ, num_reference=num_reference, num_points=num_points, seed=seed)
    stats.update(num_samples=len(occ), num_reference=num_reference, train=str(train_root),
                 heldout=str(heldout_root), resolution=resolution)
    return stats
