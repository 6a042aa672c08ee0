"""`dcgen prepare task=voxel`: meshes -> cached occupancy shards.

Layout of a cache directory:

    shard-00000.npz ...  one per `shard_size` consecutive files of the sorted file list:
                         occupancy (n, R^3/8) uint8 packed bits, labels (n,), paths (n,) relative
                         to root, methods (n,) (exact / vote / fill), the shard's full file list
                         (files, file_labels), skipped_paths / skipped_reasons, settings (JSON)
    index.json           written last, by the main process: settings, classes, shards, counts,
                         every skipped file with its reason

Shards depend on the file list, never on the number of processes: process r encodes the shards
k with k % world == r (`accelerate.PartialState`, so `torchrun`/`accelerate launch` split the
work) and is the only writer of those files. Each shard is written to a temp file then renamed,
so a killed run leaves only complete shards; a rerun skips every shard whose stored file list
and settings match and encodes the rest (resumable, and incremental when files are added).
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

import numpy as np

from dcgen.files import atomic_savez, atomic_write_text

from .data import (MESH_EXTENSIONS, MeshLoadError, pack_occupancy, scan_mesh_files,
                   voxelize_file)

log = logging.getLogger("dcgen.prepare")

INDEX = "index.json"


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npz"


def cache_settings(resolution: int, margin: float, method: str,
                   extensions: Sequence[str]) -> dict:
    return {"format": 1, "resolution": int(resolution), "margin": float(margin),
            "method": str(method), "extensions": sorted(e.lower() for e in extensions)}


def default_cache_dir(root: str | Path, settings: dict) -> Path:
    """Inside the data root, hidden (so it is never scanned as a class), one folder per setting."""
    return (Path(root) / ".dcgen_cache" /
            f"voxel-r{settings['resolution']}-{settings['method']}-m{settings['margin']:g}")


def read_index(cache_dir: str | Path) -> dict | None:
    path = Path(cache_dir) / INDEX
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def check_settings(found: dict, expected: dict, where: Path) -> None:
    if found != expected:
        diff = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
        raise ValueError(f"voxel cache {where} was built with other settings "
                         f"(key: (cached, requested)) {diff}; point task.cache_dir elsewhere or "
                         f"delete it")


def _shard_is_current(path: Path, files: list[str], labels: list[int], settings: dict) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return (json.loads(str(z["settings"])) == settings
                    and z["files"].tolist() == files and z["file_labels"].tolist() == labels)
    except Exception:  # unreadable (e.g. truncated by a disk-full error): encode again
        return False


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
                  workers: int = 0, progress: bool = True) -> dict:
    """Encode every mesh under `root` into `cache_dir` (see the module docstring); returns the
    index. `workers` > 0 voxelises in that many worker processes per process."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState()
    root, cache_dir = Path(root), Path(cache_dir)
    settings = cache_settings(resolution, margin, method, extensions)
    classes, found = scan_mesh_files(root, extensions)
    if not found:
        raise ValueError(f"voxel: no mesh files with extensions {settings['extensions']} under "
                         f"{root}" + (f" (class folders: {classes})" if classes else ""))
    cache_dir.mkdir(parents=True, exist_ok=True)
    old = read_index(cache_dir)
    if old is not None:
        check_settings(old["settings"], settings, cache_dir)
        if old.get("shard_size", shard_size) != shard_size:  # keep the layout: resume, not redo
            log.info("voxel prepare: %s uses shard_size=%d; keeping it (requested %d)",
                     cache_dir, old["shard_size"], shard_size)
            shard_size = int(old["shard_size"])
    state.wait_for_everyone()  # nobody writes before every rank has checked the old index

    rel = [p.relative_to(root).as_posix() for p, _ in found]
    labels = [int(y) for _, y in found]
    n_shards = (len(rel) + shard_size - 1) // shard_size
    spans = [(k * shard_size, min(len(rel), (k + 1) * shard_size)) for k in range(n_shards)]
    mine = [k for k in range(n_shards) if k % state.num_processes == state.process_index]
    todo = [k for k in mine if not _shard_is_current(cache_dir / shard_name(k),
                                                     rel[slice(*spans[k])],
                                                     labels[slice(*spans[k])], settings)]
    n_todo = sum(spans[k][1] - spans[k][0] for k in todo)
    if mine:
        log.info("voxel prepare (process %d/%d): %d of %d shard(s) to encode (%d meshes), %d "
                 "already cached in %s", state.process_index, state.num_processes, len(todo),
                 len(mine), n_todo, len(mine) - len(todo), cache_dir)

    bar = tqdm(total=n_todo, desc=f"voxelise {resolution}^3 [{state.process_index}]",
               unit="mesh", disable=not progress, position=state.process_index,
               dynamic_ncols=True)
    pool = (ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
            if workers > 0 and n_todo else None)
    try:
        for k in todo:
            a, b = spans[k]
            jobs = [(str(root / r), resolution, margin, method) for r in rel[a:b]]
            results = pool.map(encode_one, jobs, chunksize=4) if pool else map(encode_one, jobs)
            occ, ys, paths, methods, skipped, reasons = [], [], [], [], [], []
            for i, (_, packed, info) in enumerate(results):
                if packed is None:
                    log.warning("skipping mesh %s", info)
                    skipped.append(rel[a + i])
                    reasons.append(info)
                else:
                    occ.append(packed)
                    ys.append(labels[a + i])
                    paths.append(rel[a + i])
                    methods.append(info)
                bar.update(1)
            n_bytes = resolution ** 3 // 8 + (resolution ** 3 % 8 > 0)
            atomic_savez(
                cache_dir / shard_name(k),
                occupancy=(np.stack(occ) if occ else np.zeros((0, n_bytes), np.uint8)),
                labels=np.asarray(ys, dtype=np.int64), paths=np.asarray(paths, dtype=str),
                methods=np.asarray(methods, dtype=str), files=np.asarray(rel[a:b], dtype=str),
                file_labels=np.asarray(labels[a:b], dtype=np.int64),
                skipped_paths=np.asarray(skipped, dtype=str),
                skipped_reasons=np.asarray(reasons, dtype=str),
                settings=np.asarray(json.dumps(settings, sort_keys=True)))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    state.wait_for_everyone()

    if state.is_main_process:  # the one writer of the index
        shards, skipped, methods = [], [], {}
        for k in range(n_shards):
            with np.load(cache_dir / shard_name(k), allow_pickle=False) as z:
                shards.append({"file": shard_name(k), "count": int(z["labels"].shape[0])})
                skipped += [{"path": p, "reason": r} for p, r in
                            zip(z["skipped_paths"].tolist(), z["skipped_reasons"].tolist())]
                for m in z["methods"].tolist():
                    methods[m] = methods.get(m, 0) + 1
        for stale in cache_dir.glob("shard-*.npz"):  # left by an older, longer file list
            if stale.name not in {s["file"] for s in shards}:
                stale.unlink()
        index = {"settings": settings, "root": str(root.resolve()), "classes": classes,
                 "shard_size": shard_size,
                 "num_meshes": sum(s["count"] for s in shards), "num_files": len(rel),
                 "num_skipped": len(skipped), "methods": methods, "shards": shards,
                 "skipped": skipped}
        atomic_write_text(cache_dir / INDEX, json.dumps(index, indent=1) + "\n")
        if skipped:
            log.warning("voxel prepare: skipped %d of %d mesh file(s): %s", len(skipped), len(rel),
                        ", ".join(s["path"] for s in skipped[:20])
                        + (" ..." if len(skipped) > 20 else ""))
        log.info("voxel prepare: %d meshes at %d^3 in %s (methods: %s)", index["num_meshes"],
                 resolution, cache_dir, methods)
    state.wait_for_everyone()
    return read_index(cache_dir)


def load_cache(cache_dir: str | Path, index: dict | None = None
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(packed occupancy (N, R^3/8) uint8, labels (N,) int64, paths (N,)) of a finished cache."""
    cache_dir = Path(cache_dir)
    index = index or read_index(cache_dir)
    if index is None:
        raise FileNotFoundError(f"voxel cache {cache_dir}: no {INDEX} (run `dcgen prepare "
                                f"task=voxel ...` first)")
    occ, labels, paths = [], [], []
    for s in index["shards"]:
        path = cache_dir / s["file"]
        if not path.is_file():
            raise FileNotFoundError(f"voxel cache {cache_dir}: shard {path.name} listed in "
                                    f"{INDEX} is missing (run `dcgen prepare` again)")
        with np.load(path, allow_pickle=False) as z:
            occ.append(z["occupancy"])
            labels.append(z["labels"])
            paths += z["paths"].tolist()
    return np.concatenate(occ), np.concatenate(labels).astype(np.int64), paths
