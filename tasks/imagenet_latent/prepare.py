"""`dcgen prepare task=imagenet_latent`: encode an image set into the latent cache once.

Work split: the item list (sorted folder listing or file list) is cut into fixed shards of
`shard_size` items; shard s belongs to rank s mod world. So N processes write disjoint shards, the
result does not depend on N, and an interrupted run resumes by skipping every shard already in
place (each shard is written into a hidden temporary directory and renamed when complete).

Per image (ADM centre crop to `resolution`, pixels in [-1, 1]) the VAE posterior of the image and of
its horizontal flip is stored as mean and log-variance; one flip and one posterior sample, both drawn
from (seed, item index), are also stored as the fixed latent of [R]'s cache (METHOD §7.1, D29).
A corrupt image is logged by name and skipped; the count is reported at the end.

Runs unchanged under `torchrun --nproc_per_node N -m dcgen prepare ...` or `accelerate launch`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dcgen.files import atomic_write_json

from .data import (CACHE_VERSION, ITEMS, MANIFEST, SUMMARY, item_generator, list_image_folder,
                   load_image, read_file_list, read_manifest, read_items, shard_name, to_model_input)

log = logging.getLogger("dcgen.imagenet_latent")

CACHE_DTYPES = {"float32": np.float32, "float16": np.float16}
VAE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# settings a resumed run must share with the run that started the cache
_PINNED = ("resolution", "vae", "latent_channels", "latent_size", "seed", "shard_size",
           "cache_dtype", "num_items", "items_sha256")


class _Images(Dataset):
    """Items at the given global indices, decoded and centre-cropped in DataLoader workers. A
    corrupt file is returned as its error message instead of raising, so one bad file never
    stops the run."""

    def __init__(self, items, indices, resolution):
        self.items, self.indices, self.resolution = items, indices, resolution

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        index = self.indices[k]
        path, label = self.items[index]
        try:
            return index, label, path, load_image(path, self.resolution), None
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
            return index, label, path, None, f"{type(e).__name__}: {e}"


def _collate(batch):
    return batch  # a list of tuples; images are stacked after dropping the corrupt ones


def _agree(state, fn):
    """Run fn on this rank and make every rank raise if any rank failed, so no rank waits forever
    at a barrier behind a rank that died with a config error."""
    from accelerate.utils import gather_object
    if state.num_processes == 1:
        return fn()
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # reported on every rank below, then raised everywhere
        error = f"{type(e).__name__}\t{e}" if isinstance(e, (ValueError, FileNotFoundError)) else \
            f"ValueError\t{type(e).__name__}: {e}"
    errors = [e for e in gather_object([error]) if e]
    if errors:
        kind, msg = errors[0].split("\t", 1)
        raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(msg)
    return result


def _items_sha(items) -> str:
    h = hashlib.sha256()
    for path, label in items:
        h.update(f"{label}\t{path}\n".encode())
    return h.hexdigest()


def _start_or_resume(cache_dir: Path, settings: dict, items, classes) -> None:
    """Rank 0: write the manifest and item list of a new cache, or check that an existing one was
    started with the same settings and the same images."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    if (cache_dir / MANIFEST).is_file():
        old = read_manifest(cache_dir)
        for key in _PINNED:
            if old.get(key) != settings[key]:
                what = "the image list" if key in ("num_items", "items_sha256") else f"'{key}'"
                raise ValueError(f"{cache_dir}: cache was started with different {what} "
                                 f"({old.get(key)!r} != {settings[key]!r}); resume with the same "
                                 "settings or choose a new task.cache_dir")
        return
    with open(cache_dir / f".{ITEMS}.tmp", "w") as f:
        for path, label in items:
            f.write(f"{label}\t{path}\n")
    os.replace(cache_dir / f".{ITEMS}.tmp", cache_dir / ITEMS)
    atomic_write_json(cache_dir / MANIFEST, {**settings, "version": CACHE_VERSION,
                                              "classes": classes,
                                              "num_shards": -(-len(items) // settings["shard_size"])})


class _ShardWriter:
    """Arrays of one shard, written in place (memory-mapped) in a temporary directory and renamed
    into the cache when complete."""

    def __init__(self, cache_dir: Path, s: int, capacity: int, C: int, h: int, w: int, dtype):
        self.final = cache_dir / shard_name(s)
        self.tmp = cache_dir / f".{shard_name(s)}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        cap = max(capacity, 1)
        mm = lambda name, shape, dt: np.lib.format.open_memmap(  # noqa: E731
            self.tmp / f"{name}.npy", mode="w+", dtype=dt, shape=shape)
        self.arrays = {"mean": mm("mean", (cap, 2, C, h, w), dtype),
                       "logvar": mm("logvar", (cap, 2, C, h, w), dtype),
                       "latent": mm("latent", (cap, C, h, w), dtype),
                       "flip": mm("flip", (cap,), np.uint8),
                       "label": mm("label", (cap,), np.int64),
                       "index": mm("index", (cap,), np.int64)}
        self.n = 0

    def add(self, **rows):
        k = len(rows["index"])
        for name, val in rows.items():
            self.arrays[name][self.n:self.n + k] = val
        self.n += k

    def finish(self, meta: dict) -> None:
        names = list(self.arrays)
        for name in names:
            arr = self.arrays.pop(name)
            arr.flush()
            if self.n != arr.shape[0]:  # corrupt files were skipped: store exactly n rows
                np.save(self.tmp / f"{name}.exact.npy", np.array(arr[:self.n]))
                del arr  # unmap before the file it maps is replaced
                os.replace(self.tmp / f"{name}.exact.npy", self.tmp / f"{name}.npy")
        (self.tmp / "meta.json").write_text(json.dumps({**meta, "count": self.n}, indent=1))
        for f in self.tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(self.tmp, self.final)

    def abort(self):
        self.arrays.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


@torch.no_grad()
def _encode_shards(codec, cache_dir: Path, shards: list[int], items, S: int, resolution: int, seed: int,
                   batch_size: int, num_workers: int, cache_dtype, rank: int, progress, log_done) -> None:
    """Encode `shards` (this rank's unfinished ones) through ONE DataLoader over all their items,
    in order, so the decoding workers start once (not once per shard); each shard is written
    into its temporary folder and renamed into the cache as soon as its last item is in."""
    if not shards:
        return
    C, ds = codec.latent_channels, codec.downsample
    h = w = resolution // ds
    bounds = {s: (s * S, min(len(items), (s + 1) * S)) for s in shards}
    indices = [i for s in shards for i in range(*bounds[s])]
    loader = DataLoader(_Images(items, indices, resolution), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate)
    state = {"s": None, "writer": None, "skipped": [], "t0": time.time()}

    def open_shard(s):
        state.update(s=s, writer=_ShardWriter(cache_dir, s, bounds[s][1] - bounds[s][0], C, h, w, cache_dtype),
                     skipped=[], t0=time.time())

    def close_shard():
        s, writer = state["s"], state["writer"]
        writer.finish({"shard": s, "start": bounds[s][0], "stop": bounds[s][1], "rank": rank,
                       "skipped": state["skipped"], "seconds": round(time.time() - state["t0"], 3)})
        log_done(s, writer.n, len(state["skipped"]))
        state.update(s=None, writer=None)

    try:
        for batch in loader:
            good = []
            for index, label, path, image, error in batch:
                if error is not None:
                    log.warning("skipping corrupt image %s (%s)", path, error)
                good.append((index, label, path, image, error))
            if progress is not None:
                progress.update(len(batch))
            ok = [g for g in good if g[4] is None]
            if ok:
                x = to_model_input(np.stack([g[3] for g in ok]))  # (b, 3, H, W)
                b = x.shape[0]
                mean, logvar = codec.encode_moments(torch.cat([x, x.flip(-1)]))  # (2b, C, h, w) fp32
                mean = mean.view(2, b, C, h, w).transpose(0, 1)  # (b, 2, C, h, w)
                logvar = logvar.view(2, b, C, h, w).transpose(0, 1)
            row = {g[0]: j for j, g in enumerate(ok)}
            # items in order; a batch may end one shard and start the next
            for index, label, path, _, error in good:
                s = index // S
                if state["s"] != s:
                    if state["s"] is not None:
                        close_shard()
                    open_shard(s)
                if error is not None:
                    state["skipped"].append({"file": str(path), "index": int(index), "reason": error})
                else:
                    j = row[index]
                    # [R]'s baked latent: one flip, one posterior sample per image, from (seed, item)
                    g = item_generator(seed, "extract", index)
                    f = int(torch.randint(2, (), generator=g))
                    eps = torch.randn((C, h, w), generator=g)
                    latent = mean[j, f] + torch.exp(0.5 * logvar[j, f]) * eps
                    state["writer"].add(mean=mean[j:j + 1].numpy().astype(cache_dtype),
                                        logvar=logvar[j:j + 1].numpy().astype(cache_dtype),
                                        latent=latent[None].numpy().astype(cache_dtype),
                                        flip=np.array([f], np.uint8), label=np.array([label], np.int64),
                                        index=np.array([index], np.int64))
                if index == bounds[s][1] - 1:
                    close_shard()
        if state["s"] is not None:  # every item of the last shard was seen: a loop end is its end
            close_shard()
    except BaseException:
        if state["writer"] is not None:
            state["writer"].abort()
        raise


def prepare_cache(cache_dir, image_dir=None, file_list=None, resolution: int = 256,
                  vae="stabilityai/sd-vae-ft-ema", num_classes: int | None = None, seed: int = 0,
                  batch_size: int = 32, shard_size: int = 5000, num_workers: int = 4,
                  vae_dtype: str = "auto", cache_dtype: str = "float32",
                  expect_latent_channels: int | None = None, progress: bool = True) -> dict | None:
    """Encode the images into `cache_dir` on every process of the current launch. Returns the
    summary on the main process (None elsewhere)."""
    from dcgen.codec import VAECodec
    from dcgen.evaluate import process_state

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    state = process_state()
    rank, world = state.process_index, state.num_processes
    cache_dir = Path(cache_dir).expanduser()
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"task.encode.cache_dtype must be one of {list(CACHE_DTYPES)}, got {cache_dtype!r}")
    if vae_dtype not in VAE_DTYPES and vae_dtype != "auto":
        raise ValueError(f"task.encode.vae_dtype must be auto or one of {list(VAE_DTYPES)}, got {vae_dtype!r}")
    if int(shard_size) < 1 or int(batch_size) < 1:
        raise ValueError("task.encode.shard_size and task.encode.batch_size must be positive")
    if image_dir is None and file_list is None:
        raise ValueError("dcgen prepare needs task.source.image_dir (one sub-folder per class) or "
                         "task.source.file_list")
    # the inputs exist before the VAE (minutes to load) is touched
    if image_dir is not None and not Path(image_dir).is_dir():
        raise FileNotFoundError(f"task.source.image_dir={image_dir}: no such directory")
    if file_list is not None and not Path(file_list).is_file():
        raise FileNotFoundError(f"task.source.file_list={file_list}: no such file")

    # 1. VAE on every rank (a missing VAE fails everywhere, before any barrier)
    if vae_dtype == "auto":  # the encoder is the cost of prepare: bf16 on GPUs, fp32 on the CPU
        vae_dtype = "bfloat16" if state.device.type == "cuda" else "float32"
    codec = _agree(state, lambda: VAECodec(vae, device=state.device, dtype=VAE_DTYPES[vae_dtype],
                                           micro_batch=2 * int(batch_size)))
    if resolution % codec.downsample:
        raise ValueError(f"task.resolution={resolution} is not a multiple of the VAE's "
                         f"downsampling factor {codec.downsample}")
    if expect_latent_channels is not None and codec.latent_channels != expect_latent_channels:
        raise ValueError(f"task.latent_channels={expect_latent_channels} but the VAE {vae} has "
                         f"{codec.latent_channels} latent channels")

    # 2. item list and manifest: written once by rank 0, checked against on resume
    def start():
        if state.is_main_process:
            if file_list is not None:
                items, classes = read_file_list(file_list, image_dir)
            else:
                items, classes = list_image_folder(image_dir)
                items = [(str(Path(image_dir) / p), lbl) for p, lbl in items]
            if num_classes is not None and num_classes > 0 and len(classes) > num_classes:
                raise ValueError(f"task.num_classes={num_classes} but the source has {len(classes)} "
                                 "classes")
            settings = {"resolution": int(resolution), "vae": str(vae),
                        "latent_channels": codec.latent_channels,
                        "latent_size": int(resolution) // codec.downsample, "seed": int(seed),
                        "shard_size": int(shard_size), "cache_dtype": cache_dtype,
                        "num_items": len(items), "items_sha256": _items_sha(items),
                        "source": str(file_list or image_dir)}
            _start_or_resume(cache_dir, settings, items, classes)
    _agree(state, start)
    state.wait_for_everyone()
    manifest = read_manifest(cache_dir)
    items = read_items(cache_dir)
    S, num_shards = manifest["shard_size"], manifest["num_shards"]

    # 3. this rank's unfinished shards (stale temporary directories of an interrupted run go)
    mine = [s for s in range(num_shards) if s % world == rank]
    for s in mine:
        for stale in cache_dir.glob(f".{shard_name(s)}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    todo = [s for s in mine if not (cache_dir / shard_name(s)).is_dir()]
    n_todo = sum(min(S, len(items) - s * S) for s in todo)
    log.info("rank %d/%d: %d of its %d shards to encode (%d images)%s", rank, world, len(todo),
             len(mine), n_todo, "" if len(todo) == len(mine) else " - resuming")
    bar = None
    if progress and n_todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_todo, desc=f"encode [rank {rank}]", unit="img", position=rank if world > 1 else None,
                   dynamic_ncols=True)
    try:
        _encode_shards(codec, cache_dir, todo, items, S, int(resolution), int(seed), int(batch_size),
                       int(num_workers), CACHE_DTYPES[cache_dtype], rank, bar,
                       lambda s, n, k: log.info("rank %d: %s done: %d images, %d skipped", rank,
                                                shard_name(s), n, k))
    finally:
        if bar is not None:
            bar.close()

    # 4. summary over every shard, once all ranks are done
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    metas = [json.loads((cache_dir / shard_name(s) / "meta.json").read_text()) for s in range(num_shards)]
    skipped = [k for m in metas for k in m["skipped"]]
    summary = {"num_items": len(items), "num_encoded": int(sum(m["count"] for m in metas)),
               "num_skipped": len(skipped), "num_shards": num_shards, "skipped": skipped,
               "processes_last_run": world}
    atomic_write_json(cache_dir / SUMMARY, summary)
    log.info("prepare: %d images encoded into %d shards at %s; %d corrupt image(s) skipped%s",
             summary["num_encoded"], num_shards, cache_dir, len(skipped),
             (": " + ", ".join(Path(k["file"]).name for k in skipped[:10])) if skipped else "")
    return summary
