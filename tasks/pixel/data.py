"""Pixel-space image sources, all yielding `(x float32 (C, R, R) in [-1, 1], y int64)`.

- digits: scikit-learn's bundled 8x8 handwritten digits (no network), upscaled: a real but tiny
  image data set for CPU smoke runs.
- folder: ImageFolder layout (one sub-folder per class, sorted names -> label ids), read lazily:
  building the dataset decodes nothing. `dcgen prepare` validates every file once and writes an
  index that training reads; without it an unreadable file is logged by name when it is met and
  its item served by the next readable one, so a single bad file never kills a long run.
- npz: an array `images` (N, H, W[, C]) and optional `labels`, memory-mapped (np.savez) and
  converted one item at a time.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from dcgen.rng import draw_seed
from dcgen.task import item_key

log = logging.getLogger("dcgen.data")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# The modes torch and PIL both have, so every source resizes the same way.
_PIL_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                 "nearest": Image.Resampling.NEAREST}
INTERPOLATIONS = tuple(_PIL_RESAMPLE)


def _resize(x: torch.Tensor, resolution: int, mode: str) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> centre crop to a square, then resize to (R, R); clamped
    because bicubic overshoots."""
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[..., top:top + s, left:left + s]
    if s == resolution:
        return x
    kw = {} if mode == "nearest" else {"align_corners": False, "antialias": s > resolution}
    return F.interpolate(x, size=(resolution, resolution), mode=mode, **kw).clamp(0, 1)


def match_channels(x: torch.Tensor, channels: int, what: str) -> torch.Tensor:
    """(N, C, H, W): gray -> RGB by repetition, RGB -> gray by ITU-R 601 luma, RGBA drops alpha."""
    c = x.shape[1]
    if c == 4:
        x, c = x[:, :3], 3
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise ValueError(f"{what}: cannot convert {c} channels to {channels}")


def flipped(seed: int, index: int, epoch: int) -> bool:
    """The random horizontal flip of item `index` in `epoch`: a function of (seed, index, epoch)
    only, so every process count, DataLoader worker count and resume draws the same flips."""
    return draw_seed(seed, "hflip", index, epoch) & 1 == 1


class TensorImageDataset(Dataset):
    """Images already in model space, held in memory; optional random horizontal flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, hflip: bool = False, seed: int = 0):
        assert images.shape[0] == labels.shape[0]
        self.images, self.labels, self.hflip, self.seed = images, labels, hflip, int(seed)

    @property
    def wants_epoch(self) -> bool:  # the sampler passes (index, epoch) keys: flips change per epoch
        return self.hflip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        i, epoch = item_key(key)
        x = self.images[i]
        if self.hflip and flipped(self.seed, i, epoch):
            x = x.flip(-1)
        return x, self.labels[i]


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------

def load_digits_tensors(resolution: int = 32, channels: int = 1, interpolation: str = "bicubic"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits (1797 images, 10 classes) -> (N, C, R, R) in [-1, 1], background -1."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    if resolution != 8:
        # No antialias: upscaling; clamp keeps the zero background exactly at 0 (-> -1).
        x = F.interpolate(x, size=(resolution, resolution), mode=interpolation,
                          **({} if interpolation == "nearest" else {"align_corners": False}))
        x = x.clamp(0, 1)
    x = match_channels(x, channels, "digits")
    return x * 2 - 1, torch.from_numpy(d.target.astype(np.int64))


# --------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------

def npz_member(path: str | Path, key: str) -> np.ndarray | None:
    """Array `key` of an `.npz`, memory-mapped when it is stored uncompressed (`np.savez`): only
    the pages an item touches are read. A compressed member (`np.savez_compressed`) cannot be
    mapped and is read whole (said in the log). None when there is no such key."""
    import struct
    import zipfile
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        name = f"{key}.npy"
        if name not in zf.namelist():
            return None
        info = zf.getinfo(name)
        if info.compress_type != zipfile.ZIP_STORED:
            log.warning("pixel npz source %s: '%s' is compressed, so it is read into memory in every "
                        "process; save it with np.savez (uncompressed) to memory-map it", path, key)
            with zf.open(name) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the zip local file header; name and extra field lengths at 26..30
        n_name, n_extra = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + n_name + n_extra)
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"pixel npz source {path}: '{key}' has npy format {version}")
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"pixel npz source {path}: '{key}' holds Python objects")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                     order="F" if fortran else "C")


class NpzImageDataset(Dataset):
    """`.npz` with `images` (N, H, W[, C]) uint8 (0..255) or float ([0, 1], or [-1, 1] if any
    value is negative) and optional integer `labels` (N,) -> (C, R, R) in [-1, 1] and the label,
    read lazily: the images are memory-mapped (np.savez) and converted, cropped and resized one
    item at a time, so a large array is never held whole in any process. Float images are
    scanned once, chunk by chunk, for their range."""

    def __init__(self, path: str | Path, resolution: int, channels: int | None,
                 interpolation: str = "bicubic", images_key: str = "images",
                 labels_key: str = "labels", hflip: bool = False, seed: int = 0):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"pixel npz source: file not found: {path}")
        self.path, self.resolution, self.interpolation = path, int(resolution), interpolation
        self.hflip, self.seed, self.key = bool(hflip), int(seed), images_key
        imgs = npz_member(path, images_key)
        if imgs is None:
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
            raise ValueError(f"pixel npz source {path}: no key '{images_key}'; keys present: {keys}")
        if imgs.ndim == 3:
            imgs = imgs[..., None]
        if imgs.ndim != 4 or imgs.shape[-1] not in (1, 3, 4) or imgs.shape[0] == 0:
            raise ValueError(f"pixel npz source {path}: '{images_key}' must be (N, H, W) or "
                             f"(N, H, W, C) with C in 1/3/4 and N > 0, got {imgs.shape}")
        self.signed = False
        if np.issubdtype(imgs.dtype, np.floating):
            lo, hi = np.inf, -np.inf
            for k in range(0, imgs.shape[0], 4096):
                part = np.asarray(imgs[k:k + 4096], dtype=np.float32)
                lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1 or hi > 1:
                raise ValueError(f"pixel npz source {path}: float '{images_key}' must lie in "
                                 f"[0, 1] or [-1, 1], got range [{lo}, {hi}]")
            self.signed = lo < 0
        elif imgs.dtype != np.uint8:
            raise ValueError(f"pixel npz source {path}: '{images_key}' dtype must be uint8 or "
                             f"float, got {imgs.dtype}")
        self.images = imgs
        self.channels = int(channels or min(imgs.shape[-1], 3))
        labels = npz_member(path, labels_key)
        if labels is None:
            self.labels, self.has_labels = torch.zeros(imgs.shape[0], dtype=torch.int64), False
        else:
            labels = np.asarray(labels)
            if labels.shape != (imgs.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"pixel npz source {path}: '{labels_key}' must be integer with "
                                 f"shape ({imgs.shape[0]},), got {labels.dtype} {labels.shape}")
            if labels.min() < 0:
                raise ValueError(f"pixel npz source {path}: '{labels_key}' has negative values")
            self.labels, self.has_labels = torch.from_numpy(labels.astype(np.int64)), True

    @property
    def wants_epoch(self) -> bool:
        return self.hflip

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getstate__(self):  # workers map the file themselves
        d = dict(self.__dict__)
        d["images"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        imgs = npz_member(self.path, self.key)
        self.images = imgs[..., None] if imgs.ndim == 3 else imgs

    def load(self, i: int) -> torch.Tensor:
        """Item i -> (C, R, R) in [-1, 1], no flip."""
        a = np.asarray(self.images[i], dtype=np.float32)[None]  # (1, H, W, C)
        x = torch.from_numpy(a / 255.0 if self.images.dtype == np.uint8 else a)
        if self.signed:
            x = (x + 1) / 2
        x = x.permute(0, 3, 1, 2)
        x = match_channels(x, self.channels, f"pixel npz source {self.path}")
        return _resize(x, self.resolution, self.interpolation)[0] * 2 - 1

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        i, epoch = item_key(key)
        x = self.load(i)
        if self.hflip and flipped(self.seed, i, epoch):
            x = x.flip(-1)
        return x, self.labels[i]


def load_npz_tensors(path: str | Path, resolution: int, channels: int | None,
                     interpolation: str = "bicubic", images_key: str = "images",
                     labels_key: str = "labels") -> tuple[torch.Tensor, torch.Tensor | None]:
    """All images of an `.npz` (see NpzImageDataset) as one (N, C, R, R) tensor in [-1, 1] and
    the labels (N,) int64, or None when the file has none. For small sets and tools; training
    reads the file lazily through NpzImageDataset."""
    ds = NpzImageDataset(path, resolution, channels, interpolation, images_key, labels_key)
    x = torch.stack([ds.load(i) for i in range(len(ds))])
    return x, (ds.labels if ds.has_labels else None)


# --------------------------------------------------------------------------------------------
# folder
# --------------------------------------------------------------------------------------------

def scan_class_folders(root: str | Path) -> list[str]:
    """Sorted class sub-folder names of an ImageFolder root (label id = position)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"pixel folder source: image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"pixel folder source {root}: expected one sub-folder per class, "
                         f"found none")
    return classes


def _is_readable(path: Path) -> str | None:
    """None if PIL can decode the file, else the reason. `verify` catches broken structure;
    a real `load` catches truncated pixel data, which `verify` lets through."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(e).__name__}: {e}"
    return None


INDEX_FILE = ".dcgen_index.json"


def list_image_files(root: Path, classes: Sequence[str], extensions: Sequence[str]) -> list[tuple[Path, int]]:
    """(path, label) of every image file under the class folders, sorted; names only (no file
    is opened)."""
    exts = tuple(e.lower() for e in extensions)
    out = []
    for label, name in enumerate(classes):
        out += [(p, label) for p in sorted((root / name).rglob("*"))
                if p.suffix.lower() in exts and p.is_file()]
    return out


def write_folder_index(root: str | Path, classes: Sequence[str] | None = None,
                       extensions: Sequence[str] = IMAGE_EXTENSIONS, index_file: str | Path | None = None,
                       progress_every: int = 10_000) -> Path:
    """`dcgen prepare` for a folder source: decode every file once, and write the index
    (`root/.dcgen_index.json`, or `index_file`): the classes, the readable files with their
    labels, and the unreadable ones with the reason. Training then reads this list instead of
    walking the folders, and never meets an unreadable file."""
    root = Path(root)
    classes = list(classes) if classes is not None else scan_class_folders(root)
    files = list_image_files(root, classes, extensions)
    good, bad = [], []
    for n, (p, label) in enumerate(files, 1):
        reason = _is_readable(p)
        if reason is None:
            good.append([str(p.relative_to(root)), label])
        else:
            log.warning("unreadable image %s (%s)", p, reason)
            bad.append([str(p.relative_to(root)), reason])
        if progress_every and n % progress_every == 0:
            log.info("pixel prepare: checked %d / %d files", n, len(files))
    from dcgen.viz import write_stats_json  # atomic: temp file, then rename
    out = write_stats_json({"version": 1, "classes": classes, "files": good, "skipped": bad},
                           Path(index_file) if index_file is not None else root / INDEX_FILE)
    log.info("pixel prepare: %d readable, %d unreadable file(s); index %s", len(good), len(bad), out)
    return out


class ImageFolderDataset(Dataset):
    """ImageFolder layout -> (C, R, R) in [-1, 1], read lazily: nothing is decoded when the
    dataset is built, so it starts in O(1) per file whatever the data set's size.

    With the index `dcgen prepare` writes (`root/.dcgen_index.json`, every file validated once)
    the file list comes from it and known unreadable files are left out (`skipped`). Without
    one, the folders are listed by name only; a file that turns out unreadable when it is read
    is logged by name, added to `skipped`, and item i is served by the next readable item
    (i + 1, i + 2, ... in order), so batches keep their size and the data stay a function of
    the index, in every process and worker alike."""

    def __init__(self, root: str | Path, resolution: int, channels: int = 3,
                 hflip: bool = False, interpolation: str = "bicubic",
                 classes: Sequence[str] | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, seed: int = 0,
                 index_file: str | Path | None = None):
        import json
        self.root = Path(root)
        self.seed = int(seed)
        self.classes = list(classes) if classes is not None else scan_class_folders(self.root)
        self.resolution, self.channels, self.hflip = int(resolution), int(channels), hflip
        if interpolation not in _PIL_RESAMPLE:
            raise ValueError(f"pixel folder source: interpolation must be one of "
                             f"{sorted(_PIL_RESAMPLE)}, got '{interpolation}'")
        self.resample = _PIL_RESAMPLE[interpolation]
        self.skipped: list[Path] = []
        index = Path(index_file) if index_file is not None else self.root / INDEX_FILE
        self.index_file = index if index.is_file() else None
        if self.index_file is not None:
            data = json.loads(index.read_text())
            if data.get("classes") != self.classes:
                raise ValueError(f"{index}: written for the classes {data.get('classes')}, but the folder "
                                 f"has {self.classes}; run dcgen prepare again")
            self.samples = [(self.root / f, int(label)) for f, label in data["files"]]
            self.skipped = [self.root / f for f, _ in data["skipped"]]
            if self.skipped:
                log.warning("pixel folder source %s: skipped %d unreadable file(s) of %d (listed in %s)",
                            self.root, len(self.skipped), len(self.skipped) + len(self.samples), index)
        else:
            self.samples = list_image_files(self.root, self.classes, extensions)
        if not self.samples:
            raise ValueError(f"pixel folder source {self.root}: no readable images with "
                             f"extensions {list(extensions)} in {len(self.classes)} class folder(s)")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: Path) -> torch.Tensor:
        """One file -> (C, R, R) in [-1, 1]: centre crop to a square, then resize."""
        with Image.open(path) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
            if s != self.resolution:
                im = im.resize((self.resolution, self.resolution), self.resample)
            a = np.asarray(im, dtype=np.float32)
        if a.ndim == 2:
            a = a[..., None]
        x = torch.from_numpy(a.copy()).permute(2, 0, 1)
        return x / 127.5 - 1.0

    @property
    def wants_epoch(self) -> bool:
        return self.hflip

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        i, epoch = item_key(key)
        for k in range(len(self.samples)):
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                x = self.load(path)
                break
            except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                if path not in self.skipped:
                    self.skipped.append(path)
                    log.warning("skipping unreadable image %s (%s: %s); item %d is served by the next "
                                "readable one (dcgen prepare checks every file once)", path,
                                type(e).__name__, e, i)
        else:
            raise ValueError(f"pixel folder source {self.root}: no readable image at all")
        if self.hflip and flipped(self.seed, i, epoch):
            x = x.flip(-1)
        return x, torch.tensor(label, dtype=torch.int64)
