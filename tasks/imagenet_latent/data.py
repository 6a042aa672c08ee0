"""ImageNet-style image sources, the ADM centre crop, and the latent cache (METHOD §7.1, Q15, D29).

Sources `dcgen prepare` reads:
- an image folder in ImageNet layout: one sub-folder per class; sorted folder names give the label
  ids (for ILSVRC2012 `train/` this is the standard wnid order); files are found recursively;
- a file list: one image per line, `path<TAB>label` (or `path label`), the label an integer class
  id or a class name; relative paths are relative to the image folder if one is given, else to the
  list's own directory. Without a label the parent folder's name is the class name.

The cache written by `dcgen prepare` (prepare.py) has the shared layout of `dcgen.shards`
(manifest.json, items.tsv "label<TAB>path", shard_{s:05d}/ folders, index.json written last);
every array a memory-mappable `.npy`. Per shard, one row per image that decoded:

    mean.npy, logvar.npy     (n, 2, C, h, w) posterior moments of the image [0] and its
                             horizontal flip [1], unscaled
    latent.npy               (n, C, h, w) one posterior sample of one flip, fixed at
                             extraction ([R]'s cache), unscaled
    flip.npy (n,) uint8      which flip `latent` came from
    item.npy, label.npy      (n,) int64 item index (line of items.tsv) and class id
    meta.json                rows, skipped files with the reason, who wrote it

The index holds the class names ("classes") and every skipped file.
Shape legend: n images in a shard, C latent channels, h, w latent grid.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dcgen.metrics import adm_center_crop  # shared with the reference images of the metrics
from dcgen.rng import item_generator  # noqa: F401  (per-item randomness, shared with prepare)
from dcgen.shards import ShardReader

log = logging.getLogger("dcgen.imagenet_latent")

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")
TASK = "imagenet_latent"
CACHE_VERSION = 2  # 1: the layout before dcgen.shards (an `index` field, summary.json)
LATENT_SAMPLING = ("fixed", "resample")


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_image_folder(root: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """ImageNet layout -> ([(path relative to root, label), ...], class names). Sorted, so every
    process and every run sees the same order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"imagenet_latent: image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"imagenet_latent: {root} has no class sub-folders (expected one per class)")
    items = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            rel = Path(dirpath).relative_to(root)
            found += [str(rel / f) for f in filenames if _is_image(f)]
        items += [(f, label) for f in sorted(found)]
    if not items:
        raise ValueError(f"imagenet_latent: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return items, classes


def read_file_list(path: str | Path, root: str | Path | None = None
                   ) -> tuple[list[tuple[str, int]], list[str]]:
    """A file list -> ([(path, label), ...], class names) in the list's order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"imagenet_latent: file list not found: {path}")
    base = Path(root) if root is not None else path.parent
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\t" in line:
            parts = line.split("\t")
        elif _is_image(line.rsplit(maxsplit=1)[-1]):  # a bare path (it may contain spaces)
            parts = [line]
        else:
            parts = line.rsplit(maxsplit=1)
        file = parts[0].strip()
        label = parts[1].strip() if len(parts) > 1 else ""
        label = label or Path(file).parent.name
        if not label:
            raise ValueError(f"{path}:{n}: no label and no parent folder to take it from: {line!r}")
        f = Path(file)
        rows.append((str(f if f.is_absolute() else base / f), label))
    if not rows:
        raise ValueError(f"imagenet_latent: file list {path} names no images")
    if all(lbl.lstrip("-").isdigit() for _, lbl in rows):
        ids = [int(lbl) for _, lbl in rows]
        if min(ids) < 0:
            raise ValueError(f"{path}: negative class id {min(ids)}")
        return [(f, i) for (f, _), i in zip(rows, ids)], [str(i) for i in range(max(ids) + 1)]
    if any(lbl.lstrip("-").isdigit() for _, lbl in rows):
        raise ValueError(f"{path}: labels mix integer ids and class names; use one kind")
    classes = sorted({lbl for _, lbl in rows})
    index = {c: i for i, c in enumerate(classes)}
    return [(f, index[lbl]) for f, lbl in rows], classes


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode and centre-crop one image; raises whatever PIL raises on a corrupt file (a full
    `load` catches truncated pixel data, which opening alone lets through)."""
    with Image.open(path) as im:
        im.load()
        return adm_center_crop(im, size)


def to_model_input(batch_uint8: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(batch_uint8)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------

def rerun_command(cache_dir) -> str:
    return (f"dcgen prepare task=imagenet_latent task.cache_dir={cache_dir} "
            "task.source.image_dir=...")


class LatentCache(ShardReader):
    """Read access to a finished latent cache (`dcgen.shards.ShardReader`): rows in shard order,
    i.e. the item order with the skipped files left out, so the dataset is the same whatever
    number of processes wrote it.

    Construction reads the manifest and the index only. Arrays are opened lazily in each
    process (DataLoader workers map the files themselves instead of receiving pickled copies),
    and only what is read: the `fields` of the shards rows come from, at most `max_open_shards`
    shards at a time (least recently used dropped first; a memory map holds one file
    descriptor). So a worker holds at most `max_open_shards x len(fields)` files open whatever
    the cache size (1.28M ImageNet items are 257 shards x 6 fields = 1542 files; `ulimit -n` is
    often 1024)."""

    FIELDS = ("mean", "logvar", "latent", "flip", "label", "item")

    def __init__(self, cache_dir: str | Path, fields=FIELDS, max_open_shards: int = 8):
        super().__init__(cache_dir, TASK, CACHE_VERSION, rerun_command(cache_dir), fields=fields,
                         max_open_shards=max_open_shards, what="latent cache")

    @property
    def classes(self) -> list[str]:
        return list(self.index["classes"])


class LatentDataset(Dataset):
    """(x, y) over the cache: x = latent_scale · z, or (z − mean_c) / std_c with the cache's
    per-channel statistics, (C, h, w) float32; y int64.

    latent_sampling="fixed": z is the sample stored at extraction (one flip, one posterior draw:
        [R]'s cache, Q15/D29), the same every epoch.
    latent_sampling="resample": z = mean + exp(logvar / 2) · ε with a fresh ε and (if `hflip`) a
        random flip per draw. The draw is a function of (seed, item, epoch) only, where the item
        is the item index (line of items.tsv) and the epoch comes with the key: `dataset[(i, epoch)]`. A plain
        `dataset[i]` draws as epoch 0. So the data never depend on global RNG state, the number of
        processes or DataLoader workers, and a resumed run sees the same latents."""

    wants_epoch = True  # a sampler may pass (index, epoch) keys

    def __init__(self, cache: LatentCache, latent_scale: float, latent_sampling: str = "fixed",
                 hflip: bool = True, seed: int = 0, latent_mean=None, latent_std=None):
        if latent_sampling not in LATENT_SAMPLING:
            raise ValueError(f"task.data.latent_sampling must be one of {list(LATENT_SAMPLING)}, "
                             f"got {latent_sampling!r}")
        self.cache, self.scale = cache, float(latent_scale)
        # per-channel normalisation (the cache's measured statistics) instead of the scalar scale
        self.shift = None if latent_mean is None else torch.tensor(latent_mean, dtype=torch.float32).view(-1, 1, 1)
        self.div = None if latent_std is None else torch.tensor(latent_std, dtype=torch.float32).view(-1, 1, 1)
        self.mode, self.hflip, self.seed = latent_sampling, bool(hflip), int(seed)

    def __len__(self) -> int:
        return len(self.cache)

    # the fields each mode reads
    MODE_FIELDS = {"fixed": ("latent", "label"), "resample": ("mean", "logvar", "item", "label")}

    def __getitem__(self, key):
        i, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        arrays, row = self.cache.locate(i)
        y = torch.tensor(int(arrays["label"][row]), dtype=torch.int64)
        if self.mode == "fixed":
            z = torch.from_numpy(np.array(arrays["latent"][row], dtype=np.float32))
        else:
            g = item_generator(self.seed, "train", int(arrays["item"][row]), epoch)
            flip = int(torch.randint(2, (), generator=g)) if self.hflip else 0
            mean = torch.from_numpy(np.array(arrays["mean"][row, flip], dtype=np.float32))
            logvar = torch.from_numpy(np.array(arrays["logvar"][row, flip], dtype=np.float32))
            eps = torch.randn(mean.shape, generator=g)
            z = mean + torch.exp(0.5 * logvar) * eps
        if self.shift is not None:
            return (z - self.shift) / self.div, y
        return z * self.scale, y
