"""The toy task: synthetic shapes on any grid of rank 1-3 (see `data.py` for the generator).

It exists to exercise the whole pipeline (training, chunking at every rank, sampling, writing)
in seconds on a CPU, with data where a router has something to learn.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from dcgen import viz
from dcgen.chunking.grid import check_grid
from dcgen.task import Task

from .data import ToyDataset, flat_fraction


class ToyTask(Task):
    """Class-conditional synthetic fields, `(C, *grid)` in [-1, 1]; `num_classes=0` for
    unconditional. Deterministic given `seed`: nothing is stored on disk."""

    name = "toy"

    def __init__(self, grid: Sequence[int] = (16, 16), channels: int = 3, num_classes: int = 4,
                 num_samples: int = 2048, seed: int = 0, max_preview: int = 64):
        self.grid = check_grid(grid)
        if channels < 1:
            raise ValueError(f"toy: channels must be >= 1, got {channels}")
        if num_classes < 0:
            raise ValueError(f"toy: num_classes must be >= 0, got {num_classes}")
        if num_samples < 1:
            raise ValueError(f"toy: num_samples must be >= 1, got {num_samples}")
        self.channels = int(channels)
        self.num_classes = int(num_classes)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.max_preview = int(max_preview)

    def train_dataset(self) -> ToyDataset:
        return ToyDataset(self.grid, self.channels, self.num_classes, self.num_samples, self.seed)

    def write_samples(self, data: torch.Tensor, out_dir: str | Path,
                      labels: torch.Tensor | None = None) -> list[Path]:
        """`samples.npy` (all samples, any rank) plus one preview PNG of the first
        `max_preview`: rank 1 line plots, rank 2 an image grid (1 or 3 channels as gray/RGB,
        otherwise the first channel), rank 3 middle slices."""
        x, _, out, paths = self.save_arrays(data, out_dir, labels)
        if x.shape[0] == 0:
            return paths
        prev = x[: self.max_preview]
        titles = None
        if labels is not None:
            titles = [f"y={int(v)}" for v in viz.as_numpy(labels).reshape(-1)[: len(prev)]]
        rank = len(self.grid)
        if rank == 1:
            paths.append(viz.save_signal_plot(prev, out / "samples.png", titles=titles))
        elif rank == 2:
            img = prev if prev.shape[1] in (1, 3) else prev[:, :1]
            paths.append(viz.save_image_grid(img, out / "samples.png"))
        else:
            paths.append(viz.save_volume_slices(prev[:16], out / "samples.png",
                                                titles=titles[:16] if titles else None))
        return paths

    def evaluate(self, samples: torch.Tensor, out_dir: str | Path | None = None,
                 num_reference: int = 512, **kwargs: Any) -> dict:
        """Simple distribution statistics, NOT a quality metric: mean, std and the flat-area
        share of the samples next to the same numbers on the first `num_reference` training
        samples. Enough to see a model collapse or drift; nothing more is claimed."""
        x = torch.as_tensor(viz.as_numpy(samples))
        ref, _ = self.train_dataset().stack(num_reference)
        stats = {
            "num_samples": int(x.shape[0]),
            "mean": float(x.mean()), "ref_mean": float(ref.mean()),
            "std": float(x.std()), "ref_std": float(ref.std()),
            # Generated samples are never exactly flat; 1e-2 counts "visually flat" areas.
            "flat_fraction": float(flat_fraction(x, tol=1e-2).mean()),
            "ref_flat_fraction": float(flat_fraction(ref, tol=1e-2).mean()),
        }
        stats["abs_mean_diff"] = abs(stats["mean"] - stats["ref_mean"])
        stats["abs_std_diff"] = abs(stats["std"] - stats["ref_std"])
        if out_dir is not None:
            viz.write_stats_json(stats, Path(out_dir) / "toy_stats.json")
        return stats
