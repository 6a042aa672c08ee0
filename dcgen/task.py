"""The Task contract (docs/adding_a_task.md).

A task turns its data into model-space tensors and back. It is the only variation point besides
the model and the objective; `dcgen` never imports a concrete task, the config names it by
`_target_` and Hydra builds it.

Shapes: model space is `(C, *grid)` per sample, `grid` of rank 1, 2 or 3 (the spatial shape the
model sees *before* patching; the model's patch size turns it into its token grid).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset


def item_key(key) -> tuple[int, int]:
    """A dataset key: an index, or (index, epoch) from a sampler that passes epochs."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), 0


class Task:
    """Base class. Subclasses give `grid`, `channels`, `num_classes`: set in `__init__` from the
    arguments, or as properties read on first use. A constructor checks its arguments and does no
    I/O (no file read, no folder listed, no cache opened): a task is built to sample from an
    export or to print a config as well as to train."""

    name: str = "task"
    grid: tuple[int, ...] = ()
    channels: int = 0
    num_classes: int = 0  # 0 = unconditional
    # write_samples(..., start_index=k) numbers its files from k, so the processes of one
    # evaluation can write disjoint, chunked parts into one folder (the streamed `dcgen evaluate`)
    numbered_samples: bool = False

    def train_dataset(self) -> Dataset:
        """A map-style dataset of `(x, y)`: x float32 `(C, *grid)` in model space, y int64 scalar
        (0 for unconditional tasks)."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> data space (identity for pixels and voxels, a VAE for latents)."""
        return x

    def write_samples(self, data: torch.Tensor, out_dir: str | Path,
                      labels: torch.Tensor | None = None) -> list[Path]:
        """Write decoded samples in the modality's native format; return the files written.

        Tasks that set `numbered_samples = True` also take `start_index=` and number their files
        from it, so several processes can write into one folder (the streamed `dcgen evaluate`)."""
        raise NotImplementedError

    def save_arrays(self, data, out_dir: str | Path, labels=None):
        """The common start of `write_samples`: check that `data` is (N, C, *grid), write
        `samples.npy` (and `labels.npy` when labels are given).

        Returns (samples as a numpy array, labels as int64 numpy or None, out dir, paths)."""
        import numpy as np

        from . import viz
        x = viz.as_numpy(data)
        expect = (self.channels, *self.grid)
        if x.ndim != len(expect) + 1 or tuple(x.shape[1:]) != expect:
            raise ValueError(f"{self.name} write_samples: expected (N, {', '.join(map(str, expect))}),"
                             f" got {tuple(x.shape)}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / "samples.npy"]
        np.save(paths[0], x)
        ys = None
        if labels is not None:
            ys = np.asarray(viz.as_numpy(labels), dtype=np.int64).reshape(-1)
            paths.append(out / "labels.npy")
            np.save(paths[-1], ys)
        return x, ys, out, paths

    def evaluate(self, samples: torch.Tensor, out_dir: str | Path, **kwargs: Any) -> dict:
        """Metrics of decoded samples against the task's reference data. `samples=None` means
        "read what `write_samples` wrote into `out_dir`"."""
        return {}

    def prepare(self, seed: int = 0) -> dict | None:
        """Offline encoding into the task's cache (`dcgen prepare`, every process of the launch;
        dcgen.shards is the sharded cache): returns a summary, or None for tasks that need no
        preparation. `seed` is the command's seed (for draws baked into the cache)."""
        return None

    def describe(self) -> dict:
        return {"name": self.name, "grid": list(self.grid), "channels": self.channels,
                "num_classes": self.num_classes}


