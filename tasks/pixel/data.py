"""Pixel-space image sources, all yielding `(x float32 (C, R, R) in [-1, 1], y int64)`.

- digits: scikit-learn's bundled 8x8 handwritten digits (no network), upscaled: a real but tiny
  image data set for CPU smoke runs.
- folder: ImageFolder layout (one sub-folder per class, sorted names -> label ids). Every file is
  validated once when the dataset is built; unreadable files are logged by name and skipped, so a
  single bad file never kills a long run halfway through an epoch.
- npz: an array `images` (N, H, W[, C]) and optional `labels`, held in memory.
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

from dcgen.task import draw_seed, item_key

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


def _match_channels(x: torch.Tensor, channels: int, what: str) -> torch.Tensor:
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
    x = _match_channels(x, channels, "digits")
    return x * 2 - 1, torch.from_numpy(d.target.astype(np.int64))


# --------------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------------

def load_npz_tensors(path: str | Path, resolution: int, channels: int | None,
                     interpolation: str = "bicubic", images_key: str = "images",
                     labels_key: str = "labels") -> tuple[torch.Tensor, torch.Tensor | None]:
    """`.npz` with `images` (N, H, W[, C]) uint8 (0..255) or float ([0, 1], or [-1, 1] if any
    value is negative) and optional integer `labels` (N,) -> (N, C, R, R) in [-1, 1] and the
    labels (N,) int64, or None when the file has none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pixel npz source: file not found: {path}")
    with np.load(path, allow_pickle=False) as z:
        keys = list(z.keys())
        if images_key not in keys:
            raise ValueError(f"pixel npz source {path}: no key '{images_key}'; keys present: "
                             f"{keys}")
        imgs = z[images_key]
        labels = z[labels_key] if labels_key in keys else None
    if imgs.ndim == 3:
        imgs = imgs[..., None]
    if imgs.ndim != 4 or imgs.shape[-1] not in (1, 3, 4) or imgs.shape[0] == 0:
        raise ValueError(f"pixel npz source {path}: '{images_key}' must be (N, H, W) or "
                         f"(N, H, W, C) with C in 1/3/4 and N > 0, got {imgs.shape}")
    if imgs.dtype == np.uint8:
        x = torch.from_numpy(imgs.astype(np.float32) / 255.0)
    elif np.issubdtype(imgs.dtype, np.floating):
        x = torch.from_numpy(imgs.astype(np.float32))
        lo, hi = float(x.min()), float(x.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1 or hi > 1:
            raise ValueError(f"pixel npz source {path}: float '{images_key}' must lie in "
                             f"[0, 1] or [-1, 1], got range [{lo}, {hi}]")
        if lo < 0:
            x = (x + 1) / 2
    else:
        raise ValueError(f"pixel npz source {path}: '{images_key}' dtype must be uint8 or "
                         f"float, got {imgs.dtype}")
    x = x.permute(0, 3, 1, 2)  # NHWC -> NCHW
    x = _match_channels(x, channels or min(x.shape[1], 3), f"pixel npz source {path}")
    x = _resize(x, resolution, interpolation)
    if labels is None:
        y = None
    else:
        labels = np.asarray(labels)
        if labels.shape != (x.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"pixel npz source {path}: '{labels_key}' must be integer with "
                             f"shape ({x.shape[0]},), got {labels.dtype} {labels.shape}")
        if labels.min() < 0:
            raise ValueError(f"pixel npz source {path}: '{labels_key}' has negative values")
        y = torch.from_numpy(labels.astype(np.int64))
    return x * 2 - 1, y


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


class ImageFolderDataset(Dataset):
    """ImageFolder layout -> (C, R, R) in [-1, 1]. Files are validated once in `__init__`;
    unreadable ones are logged by name and listed in `skipped`."""

    def __init__(self, root: str | Path, resolution: int, channels: int = 3,
                 hflip: bool = False, interpolation: str = "bicubic",
                 classes: Sequence[str] | None = None,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS, seed: int = 0):
        self.root = Path(root)
        self.seed = int(seed)
        self.classes = list(classes) if classes is not None else scan_class_folders(self.root)
        self.resolution, self.channels, self.hflip = int(resolution), int(channels), hflip
        if interpolation not in _PIL_RESAMPLE:
            raise ValueError(f"pixel folder source: interpolation must be one of "
                             f"{sorted(_PIL_RESAMPLE)}, got '{interpolation}'")
        self.resample = _PIL_RESAMPLE[interpolation]
        exts = tuple(e.lower() for e in extensions)
        self.samples: list[tuple[Path, int]] = []
        self.skipped: list[Path] = []
        for label, name in enumerate(self.classes):
            for p in sorted((self.root / name).rglob("*")):
                if not p.is_file() or p.suffix.lower() not in exts:
                    continue
                reason = _is_readable(p)
                if reason is None:
                    self.samples.append((p, label))
                else:
                    log.warning("skipping unreadable image %s (%s)", p, reason)
                    self.skipped.append(p)
        if self.skipped:
            log.warning("pixel folder source %s: skipped %d unreadable file(s) of %d",
                        self.root, len(self.skipped), len(self.skipped) + len(self.samples))
        if not self.samples:
            raise ValueError(f"pixel folder source {self.root}: no readable images with "
                             f"extensions {list(exts)} in {len(self.classes)} class folder(s)")

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
        path, label = self.samples[i]
        x = self.load(path)
        if self.hflip and flipped(self.seed, i, epoch):
            x = x.flip(-1)
        return x, torch.tensor(label, dtype=torch.int64)
