"""`dcgen prepare task=video`: encode every clip of every video into the latent cache.

The layout, the split over processes, resume and the index are `dcgen.shards` (its docstring),
in the folder `VideoTask.cache_path` (one per clip geometry, VAE and storage dtype). Items are
the sorted videos (path relative to root, label); shard s holds videos [s·S, (s+1)·S) and is
written by process s mod W. Rows are clips, in video then start order:

    mean.npy, logvar.npy   (n, C, T', h, w) posterior moments in `cache_dtype` (bfloat16 is
                           stored as its int16 bit pattern: numpy has no bfloat16)
    start.npy              (n,) int64 first source frame of the clip
    item.npy, label.npy    the video (line of items.tsv) and its class

S (videos per shard) is fixed when the cache is created: about `shard_clips` clips per shard,
from the clip counts of up to 8 evenly spaced videos. An unreadable video or one shorter than a
clip gives no row; its shard's meta.json names it ("unreadable" / "too_short") and the index
lists them all. A rerun with any number of processes encodes only the shards not yet complete.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from dcgen import shards

from .data import (VideoReadError, clip_starts, clips_to_model, probe_frames, read_clips,
                   scan_videos, to_storage)

log = logging.getLogger("dcgen.data")

TASK = "video"
CACHE_VERSION = 2  # 1: shard-r{rank}-{seq}.safetensors files (before dcgen.shards)
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.int16}
PROBE_VIDEOS = 8


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


def cache_fields(task) -> dict:
    shape = (task.vae_channels, *task.vae_grid)
    dtype = STORAGE_DTYPES[task.cache_dtype]
    return {"mean": (dtype, shape), "logvar": (dtype, shape), "start": (np.int64, ())}


def videos_per_shard(task, items: list) -> int:
    """About `task.shard_clips` clips per shard: the clips per video of up to PROBE_VIDEOS evenly
    spaced readable videos (frame counts only, nothing decoded) set the videos per shard."""
    pick = sorted(set(np.linspace(0, len(items) - 1, min(PROBE_VIDEOS, len(items))).round().astype(int)))
    counts = []
    for k in pick:
        try:
            n = probe_frames(task.root / items[k][0])
        except VideoReadError:
            continue
        counts.append(len(clip_starts(n, task.frames, task.stride, task.clip_hop,
                                      task.max_clips_per_video)))
    per_video = max(1.0, float(np.mean(counts))) if counts else 1.0
    return max(1, int(round(task.shard_clips / per_video)))


def posterior_statistics(cache_dir, num_shards: int, cache_dtype: str, chunk: int = 64) -> dict:
    """Per-channel mean and std of the latents the training draws (a posterior sample of every
    cached clip), streamed shard by shard: mean_c = E[mu], var_c = Var(mu) + E[exp(logvar)] over
    every clip, frame and position (float64 sums). {"latent_mean": [C], "latent_std": [C]}, or {}
    for an empty cache; `task.latent_norm=channel` normalises with them."""
    from .data import from_storage
    n, s1, s2, sv = 0, None, None, None
    for s in range(num_shards):
        d = Path(cache_dir) / shards.shard_name(s)
        mean, logvar = (np.load(d / f"{f}.npy", mmap_mode="r") for f in ("mean", "logvar"))
        for a in range(0, mean.shape[0], chunk):
            mu = from_storage(np.asarray(mean[a:a + chunk]), cache_dtype).double()  # (n, C, T, h, w)
            var = torch.exp(from_storage(np.asarray(logvar[a:a + chunk]), cache_dtype).double())
            mu, var = (z.transpose(0, 1).reshape(z.shape[1], -1) for z in (mu, var))  # (C, m)
            s1 = mu.sum(1) if s1 is None else s1 + mu.sum(1)
            s2 = (mu * mu).sum(1) if s2 is None else s2 + (mu * mu).sum(1)
            sv = var.sum(1) if sv is None else sv + var.sum(1)
            n += mu.shape[1]
    if not n:
        return {}
    m = s1 / n
    std = ((s2 / n - m * m).clamp_min(0) + sv / n).sqrt()
    return {"latent_mean": m.float().tolist(), "latent_std": std.float().tolist()}


def prepare_cache(task, processes: shards.Processes | None = None) -> dict:
    """Encode the task's videos into `task.cache_path` on every process of the launch; returns
    the index (on every rank)."""
    from tqdm.auto import tqdm

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    root, cache = task.root, task.cache_path
    procs = processes or shards.Processes.current()

    def list_items():
        videos, classes = scan_videos(root, task.extensions)
        return ([(p.relative_to(root).as_posix(), label) for p, label in videos],
                {"classes": classes, "root": str(root)})

    prep = shards.start(cache, task=TASK, version=CACHE_VERSION, settings=task.cache_settings(),
                        fields=cache_fields(task), list_items=list_items,
                        shard_size=lambda items: videos_per_shard(task, items),
                        rerun=task.rerun_command(), processes=procs, logger=log)

    def encode(todo: list[int]) -> None:
        if not todo:
            return
        codec = task.codec(device=procs.device)
        idx = [i for s in todo for i in range(*prep.span(s))]
        videos = [(root / prep.items[i][0], prep.items[i][1]) for i in idx]
        # decoding and resizing run in DataLoader workers, in order, while this process encodes
        loader = torch.utils.data.DataLoader(_Decoded(videos, task), batch_size=None,
                                             num_workers=min(int(task.decode_workers), len(videos)))
        bar = tqdm(loader, total=len(videos), desc=f"encode videos (rank {procs.rank})",
                   unit="video", disable=not procs.is_main, dynamic_ncols=True)
        writer, extra, n_clips = None, {}, 0
        try:
            for i, (path, _, starts, clips, error) in zip(idx, bar):
                s = i // prep.shard_size
                if writer is None:
                    writer, extra = prep.writer(s), {"unreadable": [], "too_short": [], "clips": 0}
                name = prep.items[i][0]
                if error is not None:
                    log.warning("skipping unreadable video: %s", error)
                    writer.skip(i, error)
                    extra["unreadable"].append(name)
                elif not starts:
                    log.info("skipping %s: shorter than one clip (%d frames at stride %d)", path,
                             task.frames, task.stride)
                    writer.skip(i, f"shorter than one clip ({task.frames} frames at stride "
                                   f"{task.stride})")
                    extra["too_short"].append(name)
                else:
                    for k, part in enumerate(clips.split(task.encode_clips)):
                        mean, logvar = codec.encode_moments(clips_to_model(part))  # (n, C, T', h, w)
                        first = k * task.encode_clips
                        writer.add(i, mean=to_storage(mean, task.cache_dtype),
                                   logvar=to_storage(logvar, task.cache_dtype),
                                   start=np.asarray(starts[first:first + len(part)], np.int64))
                    extra["clips"] += len(starts)
                    n_clips += len(starts)
                    bar.set_postfix(clips=n_clips)
                if i == prep.span(s)[1] - 1:  # the shard's last video
                    writer.finish(**extra)
                    writer = None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            bar.close()

    def summarize(metas: list[dict]) -> dict:
        unreadable = sorted(n for m in metas for n in m["unreadable"])
        too_short = sorted(n for m in metas for n in m["too_short"])
        videos = sum(m["stop"] - m["start"] for m in metas) - len(unreadable) - len(too_short)
        return {"unreadable": unreadable, "too_short": too_short, "num_videos": int(videos),
                **posterior_statistics(prep.dir, prep.num_shards, task.cache_dtype)}

    index = prep.run(encode, summarize)
    if procs.is_main:
        if index["unreadable"]:
            log.warning("video prepare: skipped %d unreadable video(s) of %d: %s",
                        len(index["unreadable"]), index["num_items"],
                        ", ".join(index["unreadable"][:20]) + (" ..." if len(index["unreadable"]) > 20 else ""))
        if index["too_short"]:
            log.warning("video prepare: skipped %d video(s) shorter than one clip",
                        len(index["too_short"]))
        log.info("video prepare: %d clip(s) from %d video(s) cached in %s", index["num_rows"],
                 index["num_videos"], cache)
    return index
