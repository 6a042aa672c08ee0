"""`dcgen prepare task=imagenet_latent`: encode an image set into the latent cache once.

The layout, the work split and resume are `dcgen.shards` (its docstring): the item list (sorted
folder listing or file list) is cut into fixed shards of `shard_size` items; shard s belongs to
rank s mod world. So N processes write disjoint shards, the result does not depend on N, and an
interrupted run resumes by skipping every shard already in place (each shard is written into a
hidden temporary directory and renamed when complete). This module decodes and encodes.

Per image (ADM centre crop to `resolution`, pixels in [-1, 1]) the VAE posterior of the image and of
its horizontal flip is stored as mean and log-variance; one flip and one posterior sample, both drawn
from (seed, item index), are also stored as the fixed latent of [R]'s cache (METHOD §7.1, D29).
A corrupt image is logged by name and skipped; the count is reported at the end.

Runs unchanged under `torchrun --nproc_per_node N -m dcgen prepare ...` or `accelerate launch`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dcgen import shards

from .data import (CACHE_VERSION, TASK, item_generator, list_image_folder, load_image,
                   read_file_list, rerun_command, to_model_input)

log = logging.getLogger("dcgen.imagenet_latent")

CACHE_DTYPES = {"float32": np.float32, "float16": np.float16}
VAE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


@torch.no_grad()
def _encode_shards(codec, prep: shards.Prepare, todo: list[int], resolution: int, seed: int,
                   batch_size: int, num_workers: int, cache_dtype, progress) -> None:
    """Encode `todo` (this rank's unfinished shards) through ONE DataLoader over all their items,
    in order, so the decoding workers start once (not once per shard); each shard is written
    into its temporary folder and renamed into the cache as soon as its last item is in."""
    if not todo:
        return
    C, ds = codec.latent_channels, codec.downsample
    h = w = resolution // ds
    S, rank = prep.shard_size, prep.processes.rank
    indices = [i for s in todo for i in range(*prep.span(s))]
    loader = DataLoader(_Images(prep.items, indices, resolution), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate)
    state = {"s": None, "writer": None}

    def close_shard():
        s, writer = state["s"], state["writer"]
        n, k = writer.rows, len(writer.skipped)
        writer.finish()
        log.info("rank %d: %s done: %d images, %d skipped", rank, shards.shard_name(s), n, k)
        state.update(s=None, writer=None)

    try:
        for batch in loader:
            for index, label, path, image, error in batch:
                if error is not None:
                    log.warning("skipping corrupt image %s (%s)", path, error)
            if progress is not None:
                progress.update(len(batch))
            ok = [g for g in batch if g[4] is None]
            if ok:
                x = to_model_input(np.stack([g[3] for g in ok]))  # (b, 3, H, W)
                b = x.shape[0]
                mean, logvar = codec.encode_moments(torch.cat([x, x.flip(-1)]))  # (2b, C, h, w) fp32
                mean = mean.view(2, b, C, h, w).transpose(0, 1)  # (b, 2, C, h, w)
                logvar = logvar.view(2, b, C, h, w).transpose(0, 1)
            row = {g[0]: j for j, g in enumerate(ok)}
            # items in order; a batch may end one shard and start the next
            for index, label, path, _, error in batch:
                s = index // S
                if state["s"] != s:
                    if state["s"] is not None:
                        close_shard()
                    state.update(s=s, writer=prep.writer(s))
                if error is not None:
                    state["writer"].skip(index, error)
                else:
                    j = row[index]
                    # [R]'s baked latent: one flip, one posterior sample per image, from (seed, item)
                    g = item_generator(seed, "extract", index)
                    f = int(torch.randint(2, (), generator=g))
                    eps = torch.randn((C, h, w), generator=g)
                    latent = mean[j, f] + torch.exp(0.5 * logvar[j, f]) * eps
                    state["writer"].add(index, mean=mean[j:j + 1].numpy().astype(cache_dtype),
                                        logvar=logvar[j:j + 1].numpy().astype(cache_dtype),
                                        latent=latent[None].numpy().astype(cache_dtype),
                                        flip=np.array([f], np.uint8))
                if index == prep.span(s)[1] - 1:
                    close_shard()
        if state["s"] is not None:  # every item of the last shard was seen: a loop end is its end
            close_shard()
    except BaseException:
        if state["writer"] is not None:
            state["writer"].abort()
        raise


def latent_statistics(cache_dir: Path, num_shards: int, chunk: int = 4096) -> dict:
    """Per-channel mean and std of the cache's stored latents (the `latent` field, unscaled),
    streamed shard by shard in chunks of rows: {"latent_mean": [C], "latent_std": [C]}. Written
    into the index; `task.latent_norm=channel` normalises with them."""
    from dcgen.codec import channel_statistics

    def batches():
        for s in range(num_shards):
            z = np.load(Path(cache_dir) / shards.shard_name(s) / "latent.npy", mmap_mode="r")
            for a in range(0, z.shape[0], chunk):
                yield torch.from_numpy(np.asarray(z[a:a + chunk], dtype=np.float32))
    mean, std = channel_statistics(batches())
    return {"latent_mean": mean.tolist(), "latent_std": std.tolist()}


def prepare_cache(cache_dir, image_dir=None, file_list=None, resolution: int = 256,
                  vae="stabilityai/sd-vae-ft-ema", num_classes: int | None = None, seed: int = 0,
                  batch_size: int = 32, shard_size: int = 5000, num_workers: int = 4,
                  vae_dtype: str = "auto", cache_dtype: str = "float32",
                  expect_latent_channels: int | None = None, progress: bool = True,
                  vae_kind: str = "auto", expect_downsample: int | None = None,
                  processes: shards.Processes | None = None) -> dict:
    """Encode the images into `cache_dir` on every process of the current launch. Returns the
    cache's index (on every process)."""
    from dcgen.codec import VAECodec

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
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
    procs = processes or shards.Processes.current()
    rank, world = procs.rank, procs.world

    # 1. VAE on every rank (a missing VAE fails everywhere, before any other collective)
    if vae_dtype == "auto":  # the encoder is the cost of prepare: bf16 on GPUs, fp32 on the CPU
        vae_dtype = "bfloat16" if torch.device(procs.device).type == "cuda" else "float32"
    codec = procs.agree(lambda: VAECodec(vae, device=procs.device, dtype=VAE_DTYPES[vae_dtype],
                                         micro_batch=2 * int(batch_size), kind=vae_kind))
    if resolution % codec.downsample:
        raise ValueError(f"task.resolution={resolution} is not a multiple of the VAE's "
                         f"downsampling factor {codec.downsample}")
    if expect_downsample is not None and codec.downsample != expect_downsample:
        raise ValueError(f"task.vae_downsample={expect_downsample} but the VAE {vae} downsamples "
                         f"{codec.downsample}x")
    if expect_latent_channels is not None and codec.latent_channels != expect_latent_channels:
        raise ValueError(f"task.latent_channels={expect_latent_channels} but the VAE {vae} has "
                         f"{codec.latent_channels} latent channels")

    # 2. item list and manifest: written once by rank 0, checked against on resume
    def list_items():
        if file_list is not None:
            items, classes = read_file_list(file_list, image_dir)
        else:
            items, classes = list_image_folder(image_dir)
            items = [(str(Path(image_dir) / p), lbl) for p, lbl in items]
        if num_classes is not None and num_classes > 0 and len(classes) > num_classes:
            raise ValueError(f"task.num_classes={num_classes} but the source has {len(classes)} "
                             "classes")
        return items, {"classes": classes}

    C, side = codec.latent_channels, int(resolution) // codec.downsample
    dt = CACHE_DTYPES[cache_dtype]
    # the source is pinned too: another folder into the same cache is refused, not re-encoded over
    # it (images added to the same folder re-encode only the shards whose images changed)
    settings = {"resolution": int(resolution), "vae": str(vae), "latent_channels": C,
                "latent_size": side, "seed": int(seed), "cache_dtype": cache_dtype,
                "image_dir": None if image_dir is None else str(image_dir),
                "file_list": None if file_list is None else str(file_list)}
    fields = {"mean": (dt, (2, C, side, side)), "logvar": (dt, (2, C, side, side)),
              "latent": (dt, (C, side, side)), "flip": (np.uint8, ())}
    prep = shards.start(cache_dir, task=TASK, version=CACHE_VERSION, settings=settings,
                        fields=fields, shard_size=int(shard_size), list_items=list_items,
                        rerun=rerun_command(cache_dir), processes=procs, logger=log)

    # 3. this rank's unfinished shards
    n_todo = prep.todo_items()
    bar = None
    if progress and n_todo:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_todo, desc=f"encode [rank {rank}]", unit="img", position=rank if world > 1 else None,
                   dynamic_ncols=True)
    try:
        index = prep.run(lambda todo: _encode_shards(codec, prep, todo, int(resolution), int(seed),
                                                     int(batch_size), int(num_workers), dt, bar),
                         lambda metas: latent_statistics(cache_dir, prep.num_shards))
    finally:
        if bar is not None:
            bar.close()

    # 4. the index over every shard, once all ranks are done
    if procs.is_main:
        skipped = index["skipped"]
        log.info("prepare: %d images encoded into %d shards at %s; %d corrupt image(s) skipped%s",
                 index["num_rows"], index["num_shards"], cache_dir, len(skipped),
                 (": " + ", ".join(Path(k["name"]).name for k in skipped[:10])) if skipped else "")
    return index
