"""`dcgen prepare task=voxel`: meshes -> occupancy grids in the shared sharded cache.

The layout, the split over processes, resume and the index are `dcgen.shards` (its docstring):
items are the sorted mesh files (name relative to root, label), shard s holds files
[s·S, (s+1)·S) and is written by process s mod W; a rerun skips every shard whose files are
unchanged (resume after a kill, or add files and rerun: only the shards whose file list changed
are encoded again). This module does the voxelising. Per shape (one row per readable file):

    occupancy.npy   (n, ceil(R³/8)) uint8, the packed bits of the R³ grid (C order)
    method.npy      (n,) uint8, METHOD_CODES index of the method used (exact / vote / fill)
    item.npy, label.npy  the file (line of items.tsv) and its class

meta.json of a shard counts its methods; the index sums them ("methods") and lists every
skipped file with its reason. A cache built with other settings (resolution, margin, method,
extensions) is refused with the keys named, never overwritten.
"""
from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import numpy as np

from dcgen import shards

from .data import MESH_EXTENSIONS, MeshLoadError, pack_occupancy, scan_mesh_files, voxelize_file

log = logging.getLogger("dcgen.prepare")

TASK = "voxel"
CACHE_VERSION = 2  # 1: shard-NNNNN.npz files (before dcgen.shards)
METHOD_CODES = ("exact", "vote", "fill")  # the `method` field: an index into this


def cache_settings(resolution: int, margin: float, method: str,
                   extensions: Sequence[str]) -> dict:
    return {"resolution": int(resolution), "margin": float(margin), "method": str(method),
            "extensions": sorted(e.lower() for e in extensions)}


def cache_fields(resolution: int) -> dict:
    return {"occupancy": (np.uint8, (-(-int(resolution) ** 3 // 8),)), "method": (np.uint8, ())}


def default_cache_dir(root: str | Path, settings: dict) -> Path:
    """Inside the data root, hidden (so it is never scanned as a class), one folder per setting."""
    return (Path(root) / ".dcgen_cache" /
            f"voxel-r{settings['resolution']}-{settings['method']}-m{settings['margin']:g}")


def rerun_command(root, cache_dir) -> str:
    return f"dcgen prepare task=voxel task.root={root or '...'} task.cache_dir={cache_dir}"


def encode_one(args: tuple) -> tuple[str, np.ndarray | None, str]:
    """(path, resolution, margin, method) -> (path, packed occupancy or None, method used or the
    reason for skipping). Module-level so worker processes can import it."""
    path, resolution, margin, method = args
    try:
        occ, used = voxelize_file(path, resolution, margin, method)
    except MeshLoadError as e:
        return path, None, str(e)
    except Exception as e:  # one odd mesh must not end a long run; it is reported by name
        return path, None, f"{path}: voxelisation failed ({type(e).__name__}: {e})"
    if not occ.any():
        return path, None, f"{path}: voxelises to an empty grid at {resolution}^3"
    return path, pack_occupancy(occ), used


def prepare_cache(root: str | Path, cache_dir: str | Path, resolution: int = 32,
                  margin: float = 1 / 32, method: str = "auto",
                  extensions: Sequence[str] = MESH_EXTENSIONS, shard_size: int = 256,
                  workers: int = 0, progress: bool = True,
                  processes: shards.Processes | None = None) -> dict:
    """Voxelise every mesh under `root` into `cache_dir` on every process of the launch (see the
    module docstring); returns the index. `workers` > 0 voxelises in that many worker processes
    per process."""
    from tqdm.auto import tqdm

    root, cache_dir = Path(root), Path(cache_dir)
    settings = cache_settings(resolution, margin, method, extensions)

    def list_items():
        classes, found = scan_mesh_files(root, extensions)
        if not found:
            raise ValueError(f"voxel: no mesh files with extensions {settings['extensions']} "
                             f"under {root}" + (f" (class folders: {classes})" if classes else ""))
        return ([(p.relative_to(root).as_posix(), y) for p, y in found],
                {"classes": classes, "root": str(root.resolve())})

    prep = shards.start(cache_dir, task=TASK, version=CACHE_VERSION, settings=settings,
                        fields=cache_fields(resolution), shard_size=int(shard_size),
                        list_items=list_items, rerun=rerun_command(root, cache_dir),
                        processes=processes, logger=log)
    rank = prep.processes.rank

    def encode(todo: list[int]) -> None:
        n_todo = prep.todo_items()
        bar = tqdm(total=n_todo, desc=f"voxelise {resolution}^3 [{rank}]", unit="mesh",
                   disable=not progress, position=rank, dynamic_ncols=True)
        pool = (ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
                if workers > 0 and n_todo else None)
        try:
            for s in todo:
                a, b = prep.span(s)
                jobs = [(str(root / name), resolution, margin, method) for name, _ in prep.items[a:b]]
                results = pool.map(encode_one, jobs, chunksize=4) if pool else map(encode_one, jobs)
                writer, counts = prep.writer(s), {}
                try:
                    for i, (_, packed, info) in zip(range(a, b), results):
                        if packed is None:
                            log.warning("skipping mesh %s", info)
                            writer.skip(i, info)
                        else:
                            writer.add(i, occupancy=packed[None],
                                       method=np.array([METHOD_CODES.index(info)], np.uint8))
                            counts[info] = counts.get(info, 0) + 1
                        bar.update(1)
                    writer.finish(methods=counts)
                except BaseException:
                    writer.abort()
                    raise
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown()

    def summarize(metas: list[dict]) -> dict:
        methods: dict[str, int] = {}
        for m in metas:
            for k, v in m["methods"].items():
                methods[k] = methods.get(k, 0) + v
        return {"methods": methods}

    index = prep.run(encode, summarize)
    if prep.processes.is_main:
        skipped = index["skipped"]
        if skipped:
            log.warning("voxel prepare: skipped %d of %d mesh file(s): %s", len(skipped),
                        index["num_items"], ", ".join(k["name"] for k in skipped[:20])
                        + (" ..." if len(skipped) > 20 else ""))
        log.info("voxel prepare: %d meshes at %d^3 in %s (methods: %s)", index["num_rows"],
                 resolution, cache_dir, index["methods"])
    return index
