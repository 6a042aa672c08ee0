"""`dcgen prepare task=video`: encode every clip of every video into the latent cache.

Cache layout (one folder per clip geometry + VAE, see `VideoTask.cache_path`):

    meta.json                      what the cache holds (geometry, VAE, latent shape, classes)
    shard-r{rank}-{seq}.safetensors  mean, logvar (N, C, T', h, w) in `cache_dtype`, label, video,
                                   start (N,); metadata "videos": the relative paths it covers
    report-r{rank}.json            what rank `rank` skipped in the last run (unreadable, too short)
    index.json                     written last by rank 0: the complete cache (shards, clips,
                                   skipped files); training refuses a cache without it

Sharding: `accelerate.PartialState()` gives the processes; the videos not yet in any shard are
dealt round-robin, and each rank writes only files carrying its own rank in the name (atomically:
temp file, then rename). A shard always holds whole videos, so a killed run resumes by skipping
the videos already in a shard, with any number of processes.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from dcgen.files import atomic_write_json

from .data import (INDEX_FILE, META_FILE, VideoReadError, clips_to_model, read_clips,
                   scan_videos, shard_paths, shard_videos)

log = logging.getLogger("dcgen.data")


class _Decoded(torch.utils.data.Dataset):
    """Video k of this process's share, read, cut into clips and resized (in a DataLoader worker):
    (path, label, clip starts, uint8 clips, None), or (path, label, [], None, the error) for an
    unreadable file."""

    def __init__(self, videos, task):
        # the clip geometry only: the task holds the VAE, which the workers must not copy
        self.videos = videos
        self.geometry = (task.frames, task.stride, task.resolution, task.clip_hop, task.max_clips_per_video)

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, k):
        path, label = self.videos[k]
        try:
            starts, clips = read_clips(path, None, *self.geometry)
        except VideoReadError as e:
            return path, label, [], None, str(e)
        return path, label, starts, clips, None


def _flush(cache: Path, rank: int, seq: int, buf: dict, dtype: torch.dtype) -> Path:
    from safetensors.torch import save_file
    path = cache / f"shard-r{rank:03d}-{seq:05d}.safetensors"
    tmp = cache / f".{path.name}.tmp"
    tensors = {"mean": torch.cat(buf["mean"]).to(dtype),
               "logvar": torch.cat(buf["logvar"]).to(dtype),
               "label": torch.tensor(buf["label"], dtype=torch.int64),
               "video": torch.tensor(buf["video"], dtype=torch.int64),
               "start": torch.tensor(buf["start"], dtype=torch.int64)}
    save_file(tensors, str(tmp), metadata={"videos": json.dumps(buf["videos"])})
    os.replace(tmp, path)
    return path


def _new_buffer() -> dict:
    return {"mean": [], "logvar": [], "label": [], "video": [], "start": [], "videos": [], "n": 0}


def prepare_cache(task, seed: int = 0) -> dict:
    """Encode the task's videos into `task.cache_path`; returns a summary (on every rank)."""
    from accelerate import PartialState
    from tqdm.auto import tqdm

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # cpu=True where there is no GPU: otherwise accelerate leaves a torchrun'd CPU job
    # undistributed (every process would think it is rank 0 of 1 and encode everything)
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world, is_main = state.process_index, state.num_processes, state.is_main_process
    root, cache = task.root, task.cache_path
    t0 = time.time()

    # 1. What there is, and what the cache already holds -------------------------------------
    videos, classes = scan_videos(root, task.extensions)
    rel = {p: p.relative_to(root).as_posix() for p, _ in videos}
    meta = task.cache_meta(classes)
    old = cache / META_FILE
    if old.is_file():
        have = json.loads(old.read_text())
        if have.get("classes") != meta["classes"]:
            raise ValueError(f"video cache {cache} was built for classes {have.get('classes')} "
                             f"but {root} now has {meta['classes']}: label ids would change; "
                             f"delete the cache folder or set task.cache_dir elsewhere")
    if is_main:
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_json(old, meta)
        (cache / INDEX_FILE).unlink(missing_ok=True)  # incomplete until this run ends
    state.wait_for_everyone()
    done = set()
    for s in shard_paths(cache):
        done.update(shard_videos(s))
    state.wait_for_everyone()  # every rank has read the same shard set before anyone writes
    pending = [(p, label) for p, label in videos if rel[p] not in done]
    mine = pending[rank::world]
    if is_main:
        log.info("video prepare: %d video(s) in %s, %d already cached, %d to encode on %d "
                 "process(es) into %s", len(videos), root, len(videos) - len(pending),
                 len(pending), world, cache)

    # 2. Encode this rank's share, shard by shard ----------------------------------------------
    mine_done = cache.glob(f"shard-r{rank:03d}-*.safetensors")
    seq = 1 + max([int(p.stem.rsplit("-", 1)[1]) for p in mine_done], default=-1)
    codec = task.codec(device=state.device) if mine else None
    dtype = getattr(torch, task.cache_dtype)
    buf, skipped, too_short, n_clips, n_videos, written = _new_buffer(), [], [], 0, 0, []
    # decoding and resizing run in DataLoader workers, in order, while this process encodes
    loader = torch.utils.data.DataLoader(_Decoded(mine, task), batch_size=None,
                                         num_workers=min(int(task.decode_workers), len(mine)))
    bar = tqdm(loader, total=len(mine), desc=f"encode videos (rank {rank})", unit="video",
               disable=not is_main, dynamic_ncols=True)
    for path, label, starts, clips, error in bar:
        if error is not None:
            log.warning("skipping unreadable video: %s", error)
            skipped.append(rel[path])
            continue
        if not starts:
            log.info("skipping %s: shorter than one clip (%d frames at stride %d)", path,
                     task.frames, task.stride)
            too_short.append(rel[path])
            continue
        v = len(buf["videos"])
        buf["videos"].append(rel[path])
        for part in clips.split(task.encode_clips):
            mean, logvar = codec.encode_moments(clips_to_model(part))  # (n, C, T', h, w)
            buf["mean"].append(mean)
            buf["logvar"].append(logvar)
        buf["label"] += [label] * len(starts)
        buf["video"] += [v] * len(starts)
        buf["start"] += starts
        buf["n"] += len(starts)
        n_clips += len(starts)
        n_videos += 1
        bar.set_postfix(clips=n_clips, skipped=len(skipped))
        if buf["n"] >= task.shard_clips:
            written.append(_flush(cache, rank, seq, buf, dtype))
            seq, buf = seq + 1, _new_buffer()
    if buf["n"]:
        written.append(_flush(cache, rank, seq, buf, dtype))
    bar.close()
    atomic_write_json(cache / f"report-r{rank:03d}.json",
                {"skipped": skipped, "too_short": too_short, "videos": n_videos, "clips": n_clips})
    state.wait_for_everyone()

    # 3. Rank 0 writes the index: the cache is complete ----------------------------------------
    summary = {"cache": str(cache), "processes": world, "to_encode": len(pending)}
    if is_main:
        index = build_index(cache, meta, world)
        summary.update({k: index[k] for k in ("num_videos", "num_clips", "skipped", "too_short")})
        summary["seconds"] = time.time() - t0
        if index["skipped"]:
            log.warning("video prepare: skipped %d unreadable video(s) of %d: %s",
                        len(index["skipped"]), len(videos), ", ".join(index["skipped"][:20])
                        + (" ..." if len(index["skipped"]) > 20 else ""))
        if index["too_short"]:
            log.warning("video prepare: skipped %d video(s) shorter than one clip",
                        len(index["too_short"]))
        log.info("video prepare: %d clip(s) from %d video(s) cached in %s (%.1f s)",
                 index["num_clips"], index["num_videos"], cache, summary["seconds"])
    state.wait_for_everyone()
    return summary


def build_index(cache: Path, meta: dict, world: int) -> dict:
    """Collect every shard and this run's rank reports into `index.json` (atomically)."""
    from safetensors import safe_open
    shards, clips, videos = [], [], []
    for p in shard_paths(cache):
        with safe_open(str(p), framework="pt") as f:
            names = json.loads(f.metadata()["videos"])
            vid, start = f.get_tensor("video").tolist(), f.get_tensor("start").tolist()
        base = len(videos)
        videos += names
        clips += [[base + v, s] for v, s in zip(vid, start)]
        shards.append({"file": p.name, "clips": len(vid)})
    skipped, too_short = [], []
    for r in range(world):
        rep = cache / f"report-r{r:03d}.json"
        if rep.is_file():
            d = json.loads(rep.read_text())
            skipped += d["skipped"]
            too_short += d["too_short"]
    index = {"meta": meta, "shards": shards, "videos": videos, "clips": clips,
             "num_videos": len(videos), "num_clips": len(clips),
             "skipped": sorted(skipped), "too_short": sorted(too_short)}
    atomic_write_json(cache / INDEX_FILE, index)
    return index
