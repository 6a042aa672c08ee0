"""The voxel task: meshes -> R^3 occupancy grids, x in {-1, +1} with shape (1, R, R, R).

No codec: the model sees occupancy directly, so `decode` is the identity. Voxelising is the
expensive step and happens once, in `prepare` (also run by `train_dataset()` when the cache is
missing); see `data.py` for the normalisation and the voxelisation methods, `prepare.py` for the
cache (the shared layout of `dcgen.shards`), `metrics.py` for the metrics.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dcgen import shards, viz
from dcgen.task import Task

from .data import MESH_EXTENSIONS, METHODS, VoxelDataset, occupancy_to_mesh, unpack_occupancy
from .prepare import (CACHE_VERSION, TASK, cache_fields, cache_settings, default_cache_dir,
                      prepare_cache, rerun_command)

log = logging.getLogger("dcgen.voxel")

MESH_FORMATS = ("obj", "glb", "ply")


class VoxelTask(Task):
    """Class-conditional (or unconditional) R^3 occupancy grids from a folder of meshes.

    root: root/<class>/<any depth>/<mesh>, sorted class folder names -> label ids (a root with
        no class folders is one unlabelled class). Extensions: `extensions`.
    resolution: R (32 default; 64 supported; any R >= 2).
    cache_dir: where `prepare` writes the grids; None = a folder per setting under
        root/.dcgen_cache/. With a finished cache, training needs no `root`.
    num_classes: None = the number of class folders (0 without any); 0 = unconditional.
    margin: empty border of the unit cube, as a fraction of its side.
    method: auto | exact | vote | fill (see `data.py`); workers: voxelising processes per
    process in `prepare`; shard_size: meshes per cache shard.

    The constructor checks its arguments only: the folder and the cache are looked at on first
    use (`classes`, `num_classes`, `train_dataset()`, `prepare()`, `evaluate()`).
    """

    name = "voxel"

    def __init__(self, root: str | Path | None = None, resolution: int = 32,
                 cache_dir: str | Path | None = None, num_classes: int | None = None,
                 margin: float = 1 / 32, method: str = "auto",
                 extensions: Sequence[str] = MESH_EXTENSIONS, shard_size: int = 256,
                 workers: int = 0, max_preview: int = 16, progress: bool = True):
        if int(resolution) < 2:
            raise ValueError(f"voxel: resolution must be >= 2, got {resolution}")
        if method not in METHODS:
            raise ValueError(f"voxel: method must be one of {list(METHODS)}, got '{method}'")
        if not 0 <= float(margin) < 0.5:
            raise ValueError(f"voxel: margin must lie in [0, 0.5), got {margin}")
        if int(shard_size) < 1:
            raise ValueError(f"voxel: shard_size must be >= 1, got {shard_size}")
        if root is None and cache_dir is None:
            raise ValueError("voxel: set task.root (a folder of meshes) or task.cache_dir (a "
                             "finished cache)")
        if num_classes is not None and int(num_classes) < 0:
            raise ValueError(f"voxel: num_classes must be >= 0 or null, got {num_classes}")
        self.resolution = int(resolution)
        self.grid = (self.resolution,) * 3
        self.channels = 1
        self.root = Path(root).expanduser() if root is not None else None
        self.margin, self.method = float(margin), method
        self.extensions = tuple(extensions)
        self.shard_size, self.workers = int(shard_size), int(workers)
        self.max_preview, self.progress = int(max_preview), bool(progress)
        self.settings = cache_settings(self.resolution, self.margin, method, self.extensions)
        self.cache_dir = (Path(cache_dir).expanduser() if cache_dir is not None
                          else default_cache_dir(self.root, self.settings))
        self._num_classes_arg = None if num_classes is None else int(num_classes)
        self._classes: list[str] | None = None
        self._num_classes: int | None = None
        self._dataset: VoxelDataset | None = None

    # ------------------------------------------------------------------ lazily: folder, cache

    def _rerun(self) -> str:
        return rerun_command(self.root, self.cache_dir)

    def _finished_index(self) -> dict | None:
        """The index of the finished cache at cache_dir, None when there is none (an older
        layout or other settings are errors)."""
        try:
            manifest, index = shards.read_index(self.cache_dir, TASK, CACHE_VERSION, self._rerun())
        except FileNotFoundError:
            return None
        shards.check_manifest(manifest, self.cache_dir, TASK, CACHE_VERSION, self._rerun(),
                              self.settings, shards.field_spec(cache_fields(self.resolution)))
        return index

    def _resolve(self) -> None:
        """Classes from the data folder (one directory listing), else from the finished cache;
        a missing folder with a finished cache is used without it."""
        if self._classes is not None:
            return
        index = None
        if self.root is not None and not self.root.is_dir():
            index = self._finished_index()
            if index is None:
                raise FileNotFoundError(f"voxel: mesh folder not found: {self.root}")
            log.warning("voxel: mesh folder %s not found; using the finished cache %s",
                        self.root, self.cache_dir)
            self.root = None
        if self.root is not None:
            classes = sorted(p.name for p in self.root.iterdir()
                             if p.is_dir() and not p.name.startswith("."))
        else:
            index = index or self._finished_index()
            if index is None:
                raise FileNotFoundError(f"voxel: no root given and no finished cache in "
                                        f"{self.cache_dir}")
            classes = list(index["classes"])
        found, n = len(classes), self._num_classes_arg
        if n is not None and n != 0 and n < found:
            raise ValueError(f"voxel: num_classes={n} but {self.root or self.cache_dir} has "
                             f"{found} class folder(s)")
        self._classes, self._num_classes = classes, found if n is None else n

    @property
    def classes(self) -> list[str]:
        self._resolve()
        return list(self._classes)

    @property
    def num_classes(self) -> int:
        self._resolve()
        return self._num_classes

    # ------------------------------------------------------------------ data

    def prepare(self, seed: int = 0) -> dict:
        """Voxelise every mesh into the cache (resumable, multi-process; see prepare.py).
        `seed` is unused: voxelisation is deterministic."""
        self._resolve()
        if self.root is None:
            raise ValueError(f"voxel prepare needs task.root (the cache {self.cache_dir} can be "
                             f"read but not rebuilt without it)")
        return prepare_cache(self.root, self.cache_dir, self.resolution, self.margin, self.method,
                             self.extensions, self.shard_size, self.workers, self.progress)

    def index(self) -> dict:
        """The cache index, building the cache first when it is missing or its classes are not
        the data folder's."""
        self._resolve()
        index = self._finished_index()
        if index is None or (self.root is not None and index["classes"] != self._classes):
            index = self.prepare()
        return index

    def train_dataset(self) -> VoxelDataset:
        if self._dataset is None:
            index = self.index()
            if index["num_rows"] == 0:
                raise ValueError(f"voxel: no usable meshes in {self.cache_dir} "
                                 f"({index['num_skipped']} file(s) skipped, see "
                                 f"{self.cache_dir / shards.INDEX})")
            cache = shards.ShardReader(self.cache_dir, TASK, CACHE_VERSION, self._rerun(),
                                       fields=("occupancy", "label"))
            self._dataset = VoxelDataset(cache, self.resolution, unconditional=self.num_classes == 0)
        return self._dataset

    @property
    def skipped(self) -> list[dict]:
        """Files the last prepare could not use, each {"item", "name", "reason"}."""
        index = self._finished_index()
        return list(index["skipped"]) if index else []

    @property
    def paths(self) -> list[str]:
        """Source mesh of every training item, relative to root."""
        cache = self.train_dataset().cache
        names = cache.items()
        return [names[i][0] for i in cache.column("item")]

    def reference_occupancy(self, num: int | None = None, seed: int = 0,
                            labels: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(occupancy (n, R, R, R) bool, labels (n,)) of up to `num` cached shapes drawn without
        replacement by `seed` (all when None), optionally only of the given classes."""
        ds = self.train_dataset()
        idx = np.arange(len(ds))
        if labels is not None:
            idx = idx[np.isin(ds.labels.numpy(), np.asarray(labels))]
        if num is not None and num < len(idx):
            idx = np.sort(np.random.default_rng(seed).choice(idx, num, replace=False))
        return unpack_occupancy(ds.packed_rows(idx), self.resolution), ds.labels.numpy()[idx]

    # ------------------------------------------------------------------ outputs

    def write_samples(self, data: torch.Tensor, out_dir: str | Path,
                      labels: torch.Tensor | None = None) -> list[Path]:
        """`samples.npy` (floats as given), `labels.npy` when given, `samples.png` (middle
        slices and max projections of the first `max_preview`), and per sample
        `meshes/<i>.obj|.glb|.ply`: marching cubes on the occupancy `data > 0` padded by one
        empty voxel, in the unit-cube frame. Empty samples get no mesh (logged, listed in
        `meshes/empty.txt`)."""
        x, ys, out, paths = self.save_arrays(data, out_dir, labels)
        if x.shape[0] == 0:
            return paths
        prev = x[: self.max_preview]
        titles = [f"y={ys[i]}" for i in range(len(prev))] if ys is not None else None
        paths.append(viz.save_volume_slices(np.where(prev > 0, 1.0, -1.0), out / "samples.png",
                                            titles=titles))
        width = max(6, len(str(x.shape[0] - 1)))
        empty = []
        (out / "meshes").mkdir(exist_ok=True)
        for i in range(x.shape[0]):
            mesh = occupancy_to_mesh(x[i, 0] > 0)
            if mesh is None:
                empty.append(i)
                continue
            for fmt in MESH_FORMATS:
                p = out / "meshes" / f"{i:0{width}d}.{fmt}"
                mesh.export(str(p), file_type=fmt)
                paths.append(p)
        if empty:
            log.warning("voxel write_samples: %d of %d sample(s) are empty (no voxel > 0), no "
                        "mesh written for them: %s", len(empty), x.shape[0], empty[:20])
            paths.append(out / "meshes" / "empty.txt")
            paths[-1].write_text("".join(f"{i}\n" for i in empty))
        return paths

    def evaluate(self, samples: torch.Tensor, out_dir: str | Path | None = None,
                 reference: Any = None, num_reference: int | None = 1000,
                 num_points: int = 2048, seed: int = 0, device: Any = None,
                 **kwargs: Any) -> dict:
        """MMD / COV / 1-NNA under Chamfer distance and nearest-reference IoU (metrics.py) of
        data-space samples (N, 1, R, R, R) against `reference`: None = up to `num_reference`
        cached training shapes (drawn by `seed`); a folder of meshes (e.g. a held-out split,
        voxelised with this task's settings into its own cache); a `.npy` file or an array of
        (M, [1,] R, R, R) occupancies. Written to `voxel_metrics.json` in `out_dir` when given.
        Options meant for other tasks' metrics (the shared `evaluate:` config section holds the
        image ones) are ignored with a warning."""
        from .metrics import as_occupancy, shape_metrics

        if kwargs:
            log.warning("voxel evaluate: ignoring option(s) %s (not voxel metrics; valid: "
                        "reference, num_reference, num_points, seed, device)", sorted(kwargs))
        if samples is None:
            raise ValueError("voxel evaluate needs the samples (got None)")
        if reference is None:
            refs, _ = self.reference_occupancy(num_reference, seed)
        elif isinstance(reference, (str, Path)) and Path(reference).is_dir():
            held_out = VoxelTask(root=reference, resolution=self.resolution, margin=self.margin,
                                 method=self.method, extensions=self.extensions,
                                 progress=self.progress)
            refs, _ = held_out.reference_occupancy(num_reference, seed)
        elif isinstance(reference, (str, Path)):
            if not Path(reference).is_file():
                raise FileNotFoundError(f"voxel evaluate: reference not found: {reference}")
            refs = np.load(reference, allow_pickle=False)
        else:
            refs = reference
        stats = shape_metrics(as_occupancy(samples), refs, num_points=num_points, seed=seed,
                              device=device)
        if out_dir is not None:
            viz.write_stats_json(stats, Path(out_dir) / "voxel_metrics.json")
        return stats

    def describe(self) -> dict:
        d = super().describe()
        d.update(root=str(self.root) if self.root else None, resolution=self.resolution,
                 cache_dir=str(self.cache_dir), method=self.method, classes=self.classes)
        return d
