"""The pixel task: images in pixel space, x in [-1, 1] with shape (C, R, R).

No codec: the model sees pixels, so `decode` is the identity. A folder source is best prepared
once (`dcgen prepare`: every file checked, an index written); the others need nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dcgen import viz
from dcgen.task import Task

from .data import (INTERPOLATIONS, ImageFolderDataset, NpzImageDataset, TensorImageDataset,
                   load_digits_tensors, match_channels, scan_class_folders)

log = logging.getLogger("dcgen.data")
SOURCES = ("digits", "glyphs", "folder", "npz")
GLYPH_COUNT = 6000  # 600 per class


class PixelTask(Task):
    """Pixel-space images from one of four sources.

    source="digits": scikit-learn's bundled 8x8 digits (1797 images, 10 classes, no network),
        upscaled to `resolution`; gray (C=1) unless `channels=3`.
    source="glyphs": 6000 letters (10 classes, B C D E F G O P Q R) rendered at `resolution` from
        the fonts bundled with matplotlib (tasks/pixel/glyphs.py): detail below a 4x4 patch beside
        uniform background, the set with real detail; gray unless `channels=3`.
    source="folder": `root` is an ImageFolder directory (one sub-folder per class, sorted names
        -> label ids); RGB unless `channels=1`; centre crop + resize; read lazily.
        `dcgen prepare task=pixel task.source=folder task.root=...` checks every file once and
        writes an index; unreadable files are logged by name and skipped (`skipped`).
    source="npz": `root` is an `.npz` with `images` (N, H, W[, C]) and optional `labels`.

    `num_classes`: None infers it from the data; 0 trains unconditionally (labels become 0);
    otherwise it must cover every label present. `hflip` randomly flips training images.
    """

    name = "pixel"

    def __init__(self, source: str = "digits", root: str | Path | None = None,
                 resolution: int = 32, channels: int | None = None,
                 num_classes: int | None = None, hflip: bool = False,
                 interpolation: str = "bicubic", max_preview: int = 64, seed: int = 0):
        if source not in SOURCES:
            raise ValueError(f"pixel: source must be one of {list(SOURCES)}, got '{source}'")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"pixel: interpolation must be one of {list(INTERPOLATIONS)}, "
                             f"got '{interpolation}'")
        if int(resolution) < 1:
            raise ValueError(f"pixel: resolution must be positive, got {resolution}")
        if channels not in (None, 1, 3):
            raise ValueError(f"pixel: channels must be 1 or 3 (or None to infer), got {channels}")
        if source not in ("digits", "glyphs") and root is None:
            raise ValueError(f"pixel: source '{source}' needs `root` (a "
                             f"{'directory' if source == 'folder' else '.npz file'})")
        self.source, self.resolution = source, int(resolution)
        self.root = Path(root).expanduser() if root is not None else None
        self.hflip, self.interpolation = bool(hflip), interpolation
        self.seed = int(seed)  # flips are a function of (seed, index, epoch)
        self.max_preview = int(max_preview)
        self.grid = (self.resolution, self.resolution)
        self._dataset: Dataset | None = None
        self._tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self._npz: NpzImageDataset | None = None
        self._classes: list[str] | None = None
        self._channels_arg, self._num_classes_arg = channels, num_classes
        self._shape: tuple[int, int] | None = None  # (channels, num_classes), read on first use
        if source in ("digits", "glyphs"):  # built in: rendered or loaded on first use
            self._shape = self._checked(channels or 1, 10)

    def _checked(self, channels: int, found: int) -> tuple[int, int]:
        num_classes = self._num_classes_arg
        if num_classes is None:
            num_classes = found
        elif num_classes != 0 and num_classes < found:
            raise ValueError(f"pixel: num_classes={num_classes} but the {self.source} source has "
                             f"{found} classes")
        return int(channels), int(num_classes)

    def _read_shape(self) -> tuple[int, int]:
        """Channels and classes of a folder or npz source, read on first use (not at construction)."""
        if self._shape is None:
            if self.source == "npz":
                # read lazily (memory-mapped, one item at a time): a large array is never held whole
                self._npz = NpzImageDataset(self.root, self.resolution, self._channels_arg, self.interpolation,
                                            hflip=self.hflip, seed=self.seed)
                found = int(self._npz.labels.max()) + 1 if self._npz.has_labels else 0  # none: unconditional
                self._shape = self._checked(self._npz.channels, found)
            else:
                self._classes = scan_class_folders(self.root)
                self._shape = self._checked(self._channels_arg or 3, len(self._classes))
        return self._shape

    @property
    def channels(self) -> int:
        return self._read_shape()[0]

    @property
    def num_classes(self) -> int:
        return self._read_shape()[1]

    @property
    def classes(self) -> list[str]:
        """The folder source's class names (sorted sub-folders); [] for the other sources."""
        if self.source == "folder":
            self._read_shape()
            return list(self._classes)
        return []

    # ------------------------------------------------------------------ data

    def prepare(self, seed: int = 0):
        """Folder source: validate every file once and write the index training reads
        (`root/.dcgen_index.json`); the other sources need no preparation."""
        if self.source != "folder":
            log.info("pixel: source %s needs no preparation", self.source)
            return None
        from .data import write_folder_index
        return write_folder_index(self.root, self.classes)

    def train_dataset(self) -> Dataset:
        """Built once and cached (a folder is listed, not decoded; see ImageFolderDataset)."""
        if self._dataset is None:
            if self.source == "folder":
                ds = ImageFolderDataset(self.root, self.resolution, self.channels, self.hflip,
                                        self.interpolation, classes=self.classes, seed=self.seed)
                if self.num_classes == 0:
                    ds.samples = [(p, 0) for p, _ in ds.samples]
            elif self.source == "npz":
                self._read_shape()
                ds = self._npz
                if self.num_classes == 0:
                    ds.labels = torch.zeros_like(ds.labels)
            else:
                x, y = self._built_in()
                if self.num_classes == 0:
                    y = torch.zeros_like(y)
                ds = TensorImageDataset(x, y, self.hflip, seed=self.seed)
            self._dataset = ds
        return self._dataset

    def _built_in(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The digits or glyphs as (N, C, R, R) in [-1, 1] and labels, made once."""
        if self._tensors is None:
            if self.source == "digits":
                self._tensors = load_digits_tensors(self.resolution, self.channels, self.interpolation)
            else:
                from .glyphs import render_glyphs
                x, y = render_glyphs(GLYPH_COUNT, self.resolution)
                self._tensors = (match_channels((x + 1) / 2, self.channels, "glyphs") * 2 - 1, y)
        return self._tensors

    @property
    def skipped(self) -> list[Path]:
        """Files the folder source could not read (empty before `train_dataset()`)."""
        return list(getattr(self._dataset, "skipped", []))

    # ------------------------------------------------------------------ outputs

    def write_samples(self, data: torch.Tensor, out_dir: str | Path,
                      labels: torch.Tensor | None = None) -> list[Path]:
        """`samples.npy` (float, as given), `samples.png` (a grid of the first `max_preview`)
        and `images/000000.png ...` (every sample, the folder an FID tool reads); labels, if
        given, go to `labels.npy`. Values are clamped to [-1, 1] for the PNGs only."""
        x, _, out, paths = self.save_arrays(data, out_dir, labels)
        if x.shape[0] == 0:
            return paths
        paths.append(viz.save_image_grid(x[: self.max_preview], out / "samples.png"))
        width = max(6, len(str(x.shape[0] - 1)))
        for i in range(x.shape[0]):
            paths.append(viz.save_image(x[i], out / "images" / f"{i:0{width}d}.png"))
        return paths

    def evaluate(self, samples: torch.Tensor | None, out_dir: str | Path, labels=None,
                 reference=None, reference_limit: int | None = None, **kwargs: Any) -> dict:
        """Digits and glyphs: `class_accuracy`, the fraction of samples that a classifier fitted on
        that source (digits: the digits; glyphs: renderings it does not train on) reads as the
        label they were conditioned on (`labels`, else `out_dir/labels.npy`;
        samples None: `out_dir/samples.npy`).

        With `reference` (`evaluate.reference`): also the image metrics of
        dcgen.metrics.evaluate_images (FID, IS, KID, PR, sFID, fd_<name>) against it: a folder of
        images, an ADM .npz, or `train`, this task's own training images (the first
        `reference_limit`, default all, written as `out_dir/reference_train.npz`). The other
        `evaluate:` keys are that function's.
        Without a reference no Inception is loaded (offline by default)."""
        import numpy as np
        out = Path(out_dir)
        result: dict = {}
        if samples is None and (out / "samples.npy").is_file():
            samples = np.load(out / "samples.npy")
        if self.source in ("digits", "glyphs") and self.num_classes > 0:
            from .glyphs import glyph_class_accuracy
            from .metrics import digit_class_accuracy
            if labels is None and (out / "labels.npy").is_file():
                labels = np.load(out / "labels.npy")
            if labels is not None and samples is not None:
                result["class_accuracy"] = (glyph_class_accuracy(samples, labels, self.resolution)
                                            if self.source == "glyphs" else digit_class_accuracy(samples, labels))
        if reference is not None and samples is not None:
            from dcgen.metrics import evaluate_images
            if str(reference) == "train":
                reference = self.reference_npz(out / "reference_train.npz", reference_limit)
            x = torch.as_tensor(np.asarray(samples)).float()
            rgb = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
            result.update(evaluate_images(samples=rgb.clamp(-1, 1), out_dir=out, reference=reference, **kwargs))
        return result

    def reference_npz(self, path: str | Path, limit: int | None = None) -> Path:
        """This task's training images (the first `limit`) as an ADM .npz (uint8 NHWC RGB): the
        FID reference of `evaluate.reference=train` and of `dcgen compare`."""
        import numpy as np

        from dcgen.metrics import to_uint8_nhwc
        path = Path(path)
        ds = self.train_dataset()
        n = len(ds) if limit is None else min(int(limit), len(ds))
        x = torch.stack([ds[i][0] for i in range(n)])
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, arr_0=to_uint8_nhwc(x))
        return path

    def describe(self) -> dict:
        d = super().describe()
        d.update(source=self.source, root=str(self.root) if self.root else None,
                 resolution=self.resolution)
        return d
