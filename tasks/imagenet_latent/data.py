"""ImageNet-style image sources, the ADM centre crop, and the latent cache (METHOD §7.1, Q15, D29).

Sources `dcgen prepare` reads:
- an image folder in ImageNet layout: one sub-folder per class; sorted folder names give the label
  ids (for ILSVRC2012 `train/` this is the standard wnid order); files are found recursively;
- a file list: one image per line, `path<TAB>label` (or `path label`), the label an integer class
  id or a class name; relative paths are relative to the image folder if one is given, else to the
  list's own directory. Without a label the parent folder's name is the class name.

The cache written by `dcgen prepare` (prepare.py), every array a memory-mappable `.npy`:

    cache_dir/manifest.json      settings (resolution, VAE, latent shape, seed, shard size), classes
    cache_dir/items.tsv          item i on line i: "label<TAB>path"; shard s holds items [s S, (s+1) S)
    cache_dir/shard_{s:05d}/     the items of shard s that decoded (shard_00000, shard_00001, ...):
        mean.npy, logvar.npy     (n, 2, C, h, w) posterior moments of the image [0] and its
                                 horizontal flip [1], unscaled
        latent.npy               (n, C, h, w) one posterior sample of one flip, fixed at
                                 extraction ([R]'s cache), unscaled
        flip.npy (n,) uint8      which flip `latent` came from
        label.npy, index.npy     (n,) int64 class id and item index (line of items.tsv)
        meta.json                count, skipped files with the reason, rank, seconds
    cache_dir/summary.json       totals and every skipped file (written when all shards are done)

Shape legend: n items in a shard, C latent channels, h, w latent grid.
"""
from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dcgen.metrics import adm_center_crop  # shared with the reference images of the metrics
from dcgen.rng import item_generator  # noqa: F401  (per-item randomness, shared with prepare)

log = logging.getLogger("dcgen.imagenet_latent")

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MANIFEST = "manifest.json"
ITEMS = "items.tsv"
SUMMARY = "summary.json"
CACHE_VERSION = 1
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

def shard_name(s: int) -> str:
    return f"shard_{s:05d}"


def read_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no latent cache at {cache_dir} ({MANIFEST} missing); run `dcgen prepare "
            f"task=imagenet_latent task.cache_dir={cache_dir} task.source.image_dir=...` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_items(cache_dir: str | Path) -> list[tuple[str, int]]:
    path = Path(cache_dir) / ITEMS
    out = []
    for line in path.read_text().splitlines():
        label, file = line.split("\t", 1)
        out.append((file, int(label)))
    return out


class LatentCache:
    """Read access to a finished cache: item positions, labels and the memory-mapped arrays.

    Rows are in shard order, i.e. the manifest order with the skipped files left out, so the
    dataset is the same whatever number of processes wrote it. Arrays are opened lazily in each
    process (DataLoader workers map the files themselves instead of receiving pickled copies),
    and only what is read: the `fields` of the shards items come from, at most `max_open_shards`
    shards at a time (least recently used closed first; a memory map holds one file descriptor).
    So a worker holds at most `max_open_shards x len(fields)` files open whatever the cache size
    (1.28M ImageNet items are 257 shards x 6 fields = 1542 files; `ulimit -n` is often 1024)."""

    FIELDS = ("mean", "logvar", "latent", "flip", "label", "index")

    def __init__(self, cache_dir: str | Path, fields=FIELDS, max_open_shards: int = 8):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)
        if self.manifest.get("version") != CACHE_VERSION:
            raise ValueError(f"{self.dir / MANIFEST}: cache version {self.manifest.get('version')} "
                             f"is not {CACHE_VERSION}; re-run dcgen prepare into a new cache_dir")
        unknown = set(fields) - set(self.FIELDS)
        if unknown:
            raise ValueError(f"LatentCache: unknown fields {sorted(unknown)} (valid: {list(self.FIELDS)})")
        self.fields, self.max_open = tuple(fields), max(1, int(max_open_shards))
        num = int(self.manifest["num_shards"])
        missing = [s for s in range(num) if not (self.dir / shard_name(s) / "meta.json").is_file()]
        if missing:
            shown = ", ".join(shard_name(s) for s in missing[:5])
            raise ValueError(f"latent cache {self.dir} is incomplete: {len(missing)} of {num} shards "
                             f"missing ({shown}{', ...' if len(missing) > 5 else ''}); run dcgen "
                             "prepare again with the same settings to finish it")
        self.counts = np.array([json.loads((self.dir / shard_name(s) / "meta.json").read_text())["count"]
                                for s in range(num)], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self._open_shards: OrderedDict[int, dict] = OrderedDict()
        # labels are small (8 bytes an item); kept in memory for class statistics and checks, read
        # one shard at a time (each file closed after reading)
        self.labels = np.concatenate([np.load(self.dir / shard_name(s) / "label.npy")
                                      for s in range(num)]) if num else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open_shards"] = OrderedDict()  # never pickle memory maps
        return state

    def open_files(self) -> int:
        """Memory maps this process holds open now."""
        return sum(len(a) for a in self._open_shards.values())

    def shard(self, s: int) -> dict:
        """{field: memory map} of shard `s`, opened on first use; the least recently used shard
        is closed when more than `max_open_shards` are open."""
        arrays = self._open_shards.get(s)
        if arrays is not None:
            self._open_shards.move_to_end(s)
            return arrays
        while len(self._open_shards) >= self.max_open:
            # dropped, not closed: the maps close when the last reference goes (closing one a
            # caller still holds would crash that caller)
            self._open_shards.popitem(last=False)
        arrays = {f: np.load(self.dir / shard_name(s) / f"{f}.npy", mmap_mode="r") for f in self.fields}
        self._open_shards[s] = arrays
        return arrays

    def locate(self, i: int) -> tuple[dict, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"latent cache index {i} out of range [0, {len(self)})")
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.shard(s), int(i - self.offsets[s])


class LatentDataset(Dataset):
    """(x, y) over the cache: x = latent_scale · z, (C, h, w) float32; y int64.

    latent_sampling="fixed": z is the sample stored at extraction (one flip, one posterior draw:
        [R]'s cache, Q15/D29), the same every epoch.
    latent_sampling="resample": z = mean + exp(logvar / 2) · ε with a fresh ε and (if `hflip`) a
        random flip per draw. The draw is a function of (seed, item, epoch) only, where the item
        is the manifest index and the epoch comes with the key: `dataset[(i, epoch)]`. A plain
        `dataset[i]` draws as epoch 0. So the data never depend on global RNG state, the number of
        processes or DataLoader workers, and a resumed run sees the same latents."""

    wants_epoch = True  # a sampler may pass (index, epoch) keys

    def __init__(self, cache: LatentCache, latent_scale: float, latent_sampling: str = "fixed",
                 hflip: bool = True, seed: int = 0):
        if latent_sampling not in LATENT_SAMPLING:
            raise ValueError(f"task.data.latent_sampling must be one of {list(LATENT_SAMPLING)}, "
                             f"got {latent_sampling!r}")
        self.cache, self.scale = cache, float(latent_scale)
        self.mode, self.hflip, self.seed = latent_sampling, bool(hflip), int(seed)

    def __len__(self) -> int:
        return len(self.cache)

    # the fields each mode reads (labels come from the cache's in-memory array)
    MODE_FIELDS = {"fixed": ("latent",), "resample": ("mean", "logvar", "index")}

    def __getitem__(self, key):
        i, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        arrays, row = self.cache.locate(i)
        y = torch.tensor(int(self.cache.labels[i]), dtype=torch.int64)
        if self.mode == "fixed":
            z = torch.from_numpy(np.array(arrays["latent"][row], dtype=np.float32))
        else:
            g = item_generator(self.seed, "train", int(arrays["index"][row]), epoch)
            flip = int(torch.randint(2, (), generator=g)) if self.hflip else 0
            mean = torch.from_numpy(np.array(arrays["mean"][row, flip], dtype=np.float32))
            logvar = torch.from_numpy(np.array(arrays["logvar"][row, flip], dtype=np.float32))
            eps = torch.randn(mean.shape, generator=g)
            z = mean + torch.exp(0.5 * logvar) * eps
        return z * self.scale, y
