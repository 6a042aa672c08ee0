"""Class-conditional ImageNet in SD-VAE latent space: the paper setup (METHOD §1, §7.1, §8).

Model space: x = 0.18215 · z, z a VAE posterior sample of shape (C, R/8, R/8) (4×32×32 at
256 px, 4×64×64 at 512 px). `prepare` encodes the images once into a sharded cache; training reads
the cache only; `decode` runs the VAE decoder for sampling; `evaluate` writes the ADM `.npz` and
scores FID/IS/KID/precision-recall with dcgen.metrics.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dcgen import viz
from dcgen.codec import DEFAULT_VAE, SD_SCALE, check_same_statistics, given_statistics
from dcgen.task import Task

from .data import LATENT_SAMPLING, LatentCache, LatentDataset

log = logging.getLogger("dcgen.imagenet_latent")

_DATA_KEYS = {"latent_sampling": "fixed", "hflip": True, "seed": 0}
_SOURCE_KEYS = {"image_dir": None, "file_list": None}
_ENCODE_KEYS = {"batch_size": 32, "shard_size": 5000, "num_workers": 4, "vae_dtype": "float32",
                "cache_dtype": "float32", "progress": True}


def _options(given: dict | None, defaults: dict, node: str) -> dict:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown config key 'task.{node}.{unknown[0]}' (valid keys under "
                         f"'task.{node}': {', '.join(sorted(defaults))})")
    return {**defaults, **given}


class ImageNetLatentTask(Task):
    """ImageNet (or any ImageNet-layout image set) as VAE latents.

    cache_dir        where `dcgen prepare` writes the latent cache and training reads it
    resolution       ADM centre-crop size in pixels (256 or 512); grid = resolution / 8
    num_classes      label table size (1000 for ImageNet); None reads it from the cache (on first
                     use: the constructor reads no file)
    vae              the codec: hub id or local directory of a diffusers AutoencoderKL (SD-VAE,
                     SDXL-VAE, VA-VAE / E2E-VAE exports) or AutoencoderDC (DC-AE)
    vae_kind         auto (a local directory's config.json names the class; a hub id tries
                     AutoencoderKL, then AutoencoderDC), kl or dc (save_pretrained)
    latent_scale     0.18215 (SD-VAE)
    latent_norm      "scale": x = latent_scale · z; "channel": x = (z − mean_c) / std_c with the
                     per-channel statistics `dcgen prepare` measured over the cache (its index)
    latent_mean, latent_std  those statistics given (an export records the ones its model was
                     trained with, so it decodes without the cache); a cache read for training
                     must agree with them
    data             latent_sampling "fixed" ([R]'s baked flip + sample, Q15/D29) or "resample"
                     (fresh posterior sample and flip per draw); hflip; seed of the draws
    source           image_dir (one sub-folder per class) or file_list, for `prepare`
    encode           prepare settings: batch_size, shard_size, num_workers, vae_dtype, cache_dtype
    """

    name = "imagenet_latent"
    numbered_samples = True  # write_samples takes start_index

    def __init__(self, cache_dir: str | Path, resolution: int = 256, num_classes: int | None = 1000,
                 vae: str | Path = DEFAULT_VAE, latent_scale: float = SD_SCALE,
                 latent_channels: int = 4, vae_downsample: int = 8, data: dict | None = None,
                 source: dict | None = None, encode: dict | None = None, max_preview: int = 64,
                 latent_norm: str = "scale", vae_kind: str = "auto", latent_mean=None, latent_std=None):
        if cache_dir is None:
            raise ValueError("task.cache_dir is required (where the latent cache lives)")
        self.resolution, self.downsample = int(resolution), int(vae_downsample)
        if self.resolution < 1 or self.resolution % self.downsample:
            raise ValueError(f"task.resolution={resolution} must be a positive multiple of "
                             f"task.vae_downsample={vae_downsample}")
        self.cache_dir = Path(cache_dir).expanduser()
        self.vae, self.latent_scale = str(vae), float(latent_scale)
        if latent_norm not in ("scale", "channel"):
            raise ValueError(f"task.latent_norm must be scale or channel, got {latent_norm!r}")
        self.latent_norm = latent_norm
        self._stats = given_statistics(latent_mean, latent_std, "task")
        if self._stats is not None and len(self._stats[0]) != int(latent_channels):
            raise ValueError(f"task.latent_mean has {len(self._stats[0])} values for {latent_channels} latent channels")
        if vae_kind not in ("auto", "kl", "dc"):
            raise ValueError(f"task.vae_kind must be auto, kl or dc, got {vae_kind!r}")
        self.vae_kind = vae_kind
        self.data = _options(data, _DATA_KEYS, "data")
        if self.data["latent_sampling"] not in LATENT_SAMPLING:
            raise ValueError(f"task.data.latent_sampling must be one of {list(LATENT_SAMPLING)}, "
                             f"got {self.data['latent_sampling']!r}")
        self.source = _options(source, _SOURCE_KEYS, "source")
        self.encode = _options(encode, _ENCODE_KEYS, "encode")
        self.max_preview = int(max_preview)
        side = self.resolution // self.downsample
        self.grid = (side, side)
        self.channels = int(latent_channels)
        if num_classes is not None and int(num_classes) < 0:
            raise ValueError(f"task.num_classes must be >= 0 or null, got {num_classes}")
        self._num_classes = None if num_classes is None else int(num_classes)
        self._dataset = None
        self._codec = None

    @property
    def num_classes(self) -> int:
        """As given, or (None) the number of classes of the finished cache, read on first use."""
        if self._num_classes is None:
            self._num_classes = len(LatentCache(self.cache_dir, fields=()).classes)
        return self._num_classes

    # ------------------------------------------------------------------ prepare / data

    def prepare(self, seed: int = 0) -> dict:
        """Encode `source` into `cache_dir` (every process of the launch takes its shards)."""
        from .prepare import prepare_cache
        return prepare_cache(self.cache_dir, self.source["image_dir"], self.source["file_list"],
                             resolution=self.resolution, vae=self.vae, num_classes=self._num_classes,
                             seed=seed, expect_latent_channels=self.channels, vae_kind=self.vae_kind,
                             expect_downsample=self.downsample, **self.encode)

    def train_dataset(self) -> LatentDataset:
        if self._dataset is None:
            cache = LatentCache(self.cache_dir, fields=LatentDataset.MODE_FIELDS[self.data["latent_sampling"]])
            m = cache.manifest["settings"]
            side = self.resolution // self.downsample
            if m["resolution"] != self.resolution or m["latent_size"] != side \
                    or m["latent_channels"] != self.channels:
                raise ValueError(f"{self.cache_dir}: cache holds {m['latent_channels']}x{m['latent_size']}"
                                 f"x{m['latent_size']} latents of {m['resolution']} px images, but the "
                                 f"task expects {self.channels}x{side}x{side} at task.resolution="
                                 f"{self.resolution}")
            if self.num_classes > 0 and len(cache.classes) > self.num_classes:
                raise ValueError(f"{self.cache_dir}: the cache has {len(cache.classes)} classes (labels "
                                 f"up to {len(cache.classes) - 1}) but task.num_classes={self.num_classes}")
            d = self.data
            self._dataset = LatentDataset(cache, self.latent_scale, d["latent_sampling"], d["hflip"],
                                          d["seed"], *self.channel_statistics(cache.index))
        return self._dataset

    # ------------------------------------------------------------------ decode / outputs

    def channel_statistics(self, index: dict | None = None) -> tuple:
        """(latent_mean, latent_std) of the cache with latent_norm=channel, else (None, None)."""
        if self.latent_norm != "channel":
            return None, None
        if self._stats is not None:
            if index is not None:  # the cache being read for training
                check_same_statistics(self._stats, index, str(self.cache_dir))
            return self._stats
        if index is None:
            index = LatentCache(self.cache_dir, fields=("label",)).index
        if "latent_mean" not in index:
            raise ValueError(f"{self.cache_dir}: the cache holds no per-channel statistics (written by "
                             "dcgen prepare since 2026-12-07); rerun dcgen prepare or use task.latent_norm=scale")
        return index["latent_mean"], index["latent_std"]

    def codec(self, device=None):
        """The VAE, built on first use and moved to `device`."""
        from dcgen.codec import VAECodec
        device = torch.device(device or "cpu")
        if self._codec is None:
            mean, std = self.channel_statistics()
            self._codec = VAECodec(self.vae, scale=self.latent_scale, device=device, latent_mean=mean,
                                   latent_std=std, kind=self.vae_kind)
        elif self._codec.device != device:
            self._codec.vae.to(device)
            self._codec.device = device
        return self._codec

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) model-space latents -> (N, 3, H, W) images in [-1, 1] (not clamped), CPU."""
        return self.codec(x.device).decode(x)

    def write_samples(self, data: torch.Tensor, out_dir: str | Path,
                      labels: torch.Tensor | None = None, start_index: int = 0) -> list[Path]:
        """`images/NNNNNN.png` for every sample, numbered from `start_index` (so several
        processes can write disjoint parts of one evaluation), and with start_index 0 a preview
        grid `samples.png` of the first `max_preview` and `labels.npy` of these samples.
        PNG values are clamp(127.5·x + 128, 0, 255) truncated (the FID protocol)."""
        x = viz.as_numpy(data)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"imagenet_latent write_samples: expected decoded images (N, 3, H, W), "
                             f"got {tuple(x.shape)}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(x.shape[0]):
            paths.append(viz.save_image(x[i], out / "images" / f"{start_index + i:06d}.png"))
        if start_index == 0 and x.shape[0]:
            paths.append(viz.save_image_grid(x[: self.max_preview], out / "samples.png"))
            if labels is not None:
                paths.append(out / "labels.npy")
                np.save(paths[-1], np.asarray(viz.as_numpy(labels), dtype=np.int64).reshape(-1))
        return paths

    def evaluate(self, samples: torch.Tensor | None, out_dir: str | Path, **kwargs: Any) -> dict:
        """FID/IS/KID/precision-recall of decoded samples (or, with samples=None, of the PNGs in
        `out_dir/images`) against `reference` (a folder of real images or an ADM reference
        batch), plus the ADM `.npz`; see dcgen.metrics.evaluate_images for the options."""
        from dcgen.metrics import evaluate_images
        return evaluate_images(samples, out_dir, **kwargs)

    def describe(self) -> dict:
        d = super().describe()
        d.update(resolution=self.resolution, cache_dir=str(self.cache_dir), vae=self.vae,
                 latent_sampling=self.data["latent_sampling"])
        return d
