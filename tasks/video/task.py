"""The video task: clips of per-frame VAE latents on a (T, h, w) grid (METHOD §12).

x is `(C, T, h, w)`: the posterior of every frame of a clip, sampled at load time and scaled by
the VAE's scaling factor (0.18215 for SD-VAE). Encoding happens once, offline, in
`dcgen prepare task=video` (see `prepare.py`); training reads only the cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dcgen import shards, viz
from dcgen.codec import DEFAULT_VAE, check_same_statistics, given_statistics
from dcgen.chunking.grid import check_grid
from dcgen.task import Task

from .codec import VideoCodec, vae_info
from .data import (VIDEO_EXTENSIONS, LatentClipDataset, VideoReadError, clip_starts,
                   pick_reference_clips, probe_frames, read_clips, scan_videos, to_uint8_frames,
                   write_gif, write_mp4)
from .prepare import CACHE_VERSION, TASK

log = logging.getLogger("dcgen.data")

CACHE_DTYPES = ("float16", "bfloat16", "float32")


def _pick_device(choice) -> torch.device:
    if isinstance(choice, torch.device):
        return choice
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


class VideoTask(Task):
    """Videos from `root` in the UCF-101 layout (`root/<class>/<video>`, sorted folder names ->
    label ids) or a folder of videos without classes (unconditional).

    A clip is `frames` frames taken every `stride` source frames, centre-cropped to a square
    and resized to `resolution`; clips start every `clip_hop` frames (None: back to back) and
    at most `max_clips_per_video` are kept per video (None: all), evenly spread.
    `vae`: hub id or local diffusers directory (`vae_type` auto-detects AutoencoderKL per frame or
    AutoencoderKLTemporalDecoder); `latent_scale` None takes the VAE's `scaling_factor`;
    `latent_norm` "channel" trains on (z − mean_c) / std_c with the per-channel statistics that
    `dcgen prepare` measured over the cache's posterior samples (its index) instead;
    `latent_mean`/`latent_std` give them (an export records the ones its model was trained with,
    so it decodes without the cache; a cache read for training must agree with them).
    `cache_dir` None puts the cache under `root/.dcgen_cache`.
    `num_classes`: None infers it (class folders; 0 without), 0 forces unconditional.
    `shard_clips`: about this many clips per cache shard (whole videos per shard).
    `inception_weights` / `i3d`: default weight paths for `evaluate` (per-frame FID / FVD).

    The constructor checks its arguments only. Shapes, scale and classes are read on first use:
    from the cache when there is one (training needs no VAE), else from the VAE's config and the
    class folders.
    """

    name = "video"

    def __init__(self, root: str | Path | None = None, frames: int = 16, stride: int = 1,
                 resolution: int = 256, vae: str | Path = DEFAULT_VAE, vae_type: str = "auto",
                 latent_scale: float | None = None, cache_dir: str | Path | None = None,
                 num_classes: int | None = None, clip_hop: int | None = None,
                 max_clips_per_video: int | None = None,
                 extensions: Sequence[str] = VIDEO_EXTENSIONS, cache_dtype: str = "float16",
                 vae_dtype: str = "auto", device: str = "auto", encode_clips: int = 8,
                 micro_batch: int = 32, shard_clips: int = 512, sample_posterior: bool = True,
                 fps: float = 8.0, max_preview: int = 8, max_videos: int | None = None,
                 inception_weights: str | None = None, i3d: str | None = None,
                 eval_reference_clips: int | None = None, eval_seed: int = 0, seed: int = 0,
                 decode_workers: int = 2, latent_norm: str = "scale", latent_mean=None, latent_std=None):
        for key, val in (("frames", frames), ("stride", stride), ("resolution", resolution),
                         ("encode_clips", encode_clips), ("micro_batch", micro_batch),
                         ("shard_clips", shard_clips)):
            if int(val) < 1:
                raise ValueError(f"video: {key} must be a positive integer, got {val}")
        for key, val in (("clip_hop", clip_hop), ("max_clips_per_video", max_clips_per_video)):
            if val is not None and int(val) < 1:
                raise ValueError(f"video: {key} must be positive or null, got {val}")
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"video: cache_dtype must be one of {list(CACHE_DTYPES)}, got "
                             f"'{cache_dtype}'")
        if vae_dtype not in CACHE_DTYPES and vae_dtype != "auto":
            raise ValueError(f"video: vae_dtype must be auto or one of {list(CACHE_DTYPES)}, got "
                             f"'{vae_dtype}'")
        if num_classes is not None and int(num_classes) < 0:
            raise ValueError(f"video: num_classes must be >= 0 or null, got {num_classes}")
        self.root = Path(root).expanduser() if root is not None else None
        self.frames, self.stride, self.resolution = int(frames), int(stride), int(resolution)
        self.vae, self.vae_type = str(vae), vae_type
        self.clip_hop = int(clip_hop) if clip_hop is not None else None
        self.max_clips_per_video = int(max_clips_per_video) if max_clips_per_video else None
        self.extensions = tuple(extensions)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.cache_dtype, self.vae_dtype, self.device = cache_dtype, vae_dtype, device
        self.encode_clips, self.micro_batch = int(encode_clips), int(micro_batch)
        self.shard_clips, self.sample_posterior = int(shard_clips), bool(sample_posterior)
        self.fps, self.max_preview = float(fps), int(max_preview)
        self.max_videos = int(max_videos) if max_videos is not None else None
        self.inception_weights, self.i3d = inception_weights, i3d
        self.eval_reference_clips, self.eval_seed = eval_reference_clips, int(eval_seed)
        self.seed = int(seed)  # the posterior draws are a function of (seed, clip, epoch)
        self.decode_workers = int(decode_workers)  # prepare: videos decoded in DataLoader workers
        if self.decode_workers < 0:
            raise ValueError(f"video: decode_workers must be >= 0, got {decode_workers}")
        self._latent_scale = None if latent_scale is None else float(latent_scale)
        if latent_norm not in ("scale", "channel"):
            raise ValueError(f"video: latent_norm must be scale or channel, got {latent_norm!r}")
        self.latent_norm = latent_norm
        self._stats = given_statistics(latent_mean, latent_std, "video")
        self._num_classes_arg = None if num_classes is None else int(num_classes)
        self._codec: VideoCodec | None = None
        self._dataset: Dataset | None = None
        self._vae_info: dict | None = None
        self._shapes: tuple[int, tuple[int, ...], float] | None = None
        self._classes: tuple[list[str], int] | None = None

    # ------------------------------------------------------------------ lazily: shapes, classes

    def _vae(self) -> dict:
        """The VAE's config (channels, downsampling, scaling factor; no weights loaded)."""
        if self._vae_info is None:
            info = vae_info(self.vae, self.vae_type)
            if self.resolution % info["downsample"]:
                raise ValueError(f"video: resolution {self.resolution} is not a multiple of the "
                                 f"VAE's downsampling factor {info['downsample']}")
            self._vae_info = info
        return self._vae_info

    @property
    def vae_channels(self) -> int:
        return int(self._vae()["latent_channels"])

    @property
    def vae_grid(self) -> tuple[int, int, int]:
        h = self.resolution // self._vae()["downsample"]
        return (self.frames, h, h)

    def _shape(self) -> tuple[int, tuple[int, ...], float]:
        """(channels, grid, scale): from the cache's manifest when the cache was started (no VAE
        needed), else from the VAE's config."""
        if self._shapes is None:
            manifest = self._manifest()
            if manifest is not None:
                st = manifest["settings"]
                shape, scale = st["latent_shape"], st["latent_scale"]
                channels, grid = int(shape[0]), check_grid(shape[1:])
            else:
                channels, grid, scale = self.vae_channels, self.vae_grid, self._vae()["scaling_factor"]
            self._shapes = (channels, tuple(grid), float(scale if self._latent_scale is None
                                                        else self._latent_scale))
        return self._shapes

    @property
    def channels(self) -> int:
        return self._shape()[0]

    @property
    def grid(self) -> tuple[int, ...]:
        return self._shape()[1]

    @property
    def scale(self) -> float:
        return self._shape()[2]

    def _resolve_classes(self) -> tuple[list[str], int]:
        """(class names, num_classes): the finished cache's classes, else the root's folders."""
        if self._classes is None:
            index = self._index()
            if index is not None:
                classes = list(index["classes"])
            elif self.root is not None and self.root.is_dir():
                classes = sorted(p.name for p in self.root.iterdir()
                                 if p.is_dir() and not p.name.startswith("."))
            else:
                classes = None
            n = self._num_classes_arg
            if n is None:
                if classes is None and self.root is not None:
                    raise FileNotFoundError(f"video: folder not found: {self.root} (needed to "
                                            f"infer num_classes; set task.num_classes to use the "
                                            f"task without its data)")
                if classes is None:
                    raise ValueError("video: set task.root (a folder of videos), or "
                                     "task.num_classes to use the task without data")
                n = len(classes)
            elif n != 0 and classes is not None and n < len(classes):
                raise ValueError(f"video: num_classes={n} but {self.root} has {len(classes)} "
                                 f"class folders")
            self._classes = (classes, n)
        return self._classes

    @property
    def classes(self) -> list[str] | None:
        return self._resolve_classes()[0]

    @property
    def num_classes(self) -> int:
        return self._resolve_classes()[1]

    # ------------------------------------------------------------------ cache

    def _need_root(self, what: str) -> Path:
        if self.root is None:
            raise ValueError(f"video {what}: set task.root (a folder of videos, one sub-folder "
                             f"per class or none)")
        if not self.root.is_dir():
            raise FileNotFoundError(f"video {what}: folder not found: {self.root}")
        return self.root

    @property
    def cache_path(self) -> Path:
        """`<cache_dir>/video-t{T}-s{stride}-r{R}-{hash}`: one folder per clip geometry, VAE,
        storage dtype and cache version (and root, when the cache lives outside it), so settings
        never mix."""
        if self.cache_dir is None and self.root is None:
            raise ValueError("video: set task.root or task.cache_dir")
        base = self.cache_dir if self.cache_dir is not None else self.root / ".dcgen_cache"
        vae = Path(self.vae)
        key = {"frames": self.frames, "stride": self.stride, "resolution": self.resolution,
               "clip_hop": self.clip_hop, "max_clips": self.max_clips_per_video,
               "vae": str(vae.resolve()) if vae.exists() else self.vae,
               "vae_type": self.vae_type, "dtype": self.cache_dtype, "version": CACHE_VERSION}
        if self.cache_dir is not None and self.root is not None:
            key["root"] = str(self.root.resolve())
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        return base / f"video-t{self.frames}-s{self.stride}-r{self.resolution}-{digest}"

    def rerun_command(self) -> str:
        return (f"dcgen prepare task=video task.root={self.root or '...'} (with the same task "
                "settings)")

    def _manifest(self) -> dict | None:
        if self.root is None and self.cache_dir is None:
            return None
        try:
            return shards.read_manifest(self.cache_path, TASK, CACHE_VERSION, self.rerun_command())
        except FileNotFoundError:
            return None

    def _index(self) -> dict | None:
        if self.root is None and self.cache_dir is None:
            return None
        try:
            return shards.read_index(self.cache_path, TASK, CACHE_VERSION, self.rerun_command())[1]
        except FileNotFoundError:
            return None

    def cache_settings(self) -> dict:
        """What a cache is made with (its manifest's settings; a resume must match them)."""
        info = self._vae()
        scale = info["scaling_factor"] if self._latent_scale is None else self._latent_scale
        return {"frames": self.frames, "stride": self.stride, "resolution": self.resolution,
                "clip_hop": self.clip_hop, "max_clips_per_video": self.max_clips_per_video,
                "vae": self.vae, "vae_kind": info["kind"], "latent_scale": float(scale),
                "latent_shape": [self.vae_channels, *self.vae_grid],
                "cache_dtype": self.cache_dtype}

    def codec(self, device=None) -> VideoCodec:
        """The VAE, loaded on first use (sampling and prepare only)."""
        dev = torch.device(device) if device is not None else _pick_device(self.device)
        if self._codec is None or self._codec.device != dev:
            # auto: bf16 on CUDA (the VAE is the cost of prepare), float32 on the CPU
            dtype = self.vae_dtype if self.vae_dtype != "auto" else (
                "bfloat16" if dev.type == "cuda" else "float32")
            mean, std = self.channel_statistics()
            self._codec = VideoCodec(self.vae, kind=self.vae_type, scale=self.scale, device=dev,
                                     dtype=getattr(torch, dtype), micro_batch=self.micro_batch,
                                     latent_mean=mean, latent_std=std)
        return self._codec

    def channel_statistics(self, training: bool = False) -> tuple:
        """(latent_mean, latent_std) with latent_norm=channel: as given, else the cache's (measured
        by prepare over the posterior samples the training draws); (None, None) otherwise. For
        `training` the cache's must agree with the given ones."""
        if self.latent_norm != "channel":
            return None, None
        if self._stats is not None:
            index = self._index() if training else None
            if index is not None:
                check_same_statistics(self._stats, index, f"video cache {self.cache_path}")
            return self._stats
        index = self._index()
        if index is None or "latent_mean" not in index:
            raise ValueError(f"video cache {self.cache_path}: no per-channel statistics (written by dcgen "
                             "prepare since 2026-12-07); rerun dcgen prepare or use task.latent_norm=scale")
        return index["latent_mean"], index["latent_std"]

    def prepare(self, seed: int = 0) -> dict:
        """Encode every clip into the cache (multi-process safe, resumable; `prepare.py`).
        `seed` is unused: the cache holds posterior moments, drawn from at training time."""
        from .prepare import prepare_cache
        self._need_root("prepare")
        index = prepare_cache(self)
        self._classes = self._shapes = None  # read again from the finished cache
        return index

    # ------------------------------------------------------------------ data

    def _reader(self, fields=None) -> shards.ShardReader:
        return shards.ShardReader(self.cache_path, TASK, CACHE_VERSION, self.rerun_command(),
                                  fields=fields, what="video latent cache")

    def train_dataset(self) -> Dataset:
        if self._dataset is None:
            cache = self._reader(("mean", "logvar", "label"))
            shape = tuple(cache.manifest["settings"]["latent_shape"])
            if shape != (self.channels, *self.grid):
                raise ValueError(f"video cache {cache.dir}: clips are {shape}, the task expects "
                                 f"{(self.channels, *self.grid)}")
            mean, std = self.channel_statistics(training=True)
            self._dataset = LatentClipDataset(cache, self.scale, unconditional=self.num_classes == 0,
                                              sample_posterior=self.sample_posterior, seed=self.seed,
                                              latent_mean=mean, latent_std=std)
        return self._dataset

    @property
    def skipped(self) -> list[str]:
        """Videos the last prepare could not read (relative paths; from the cache index)."""
        index = self._index()
        return list(index["unreadable"]) if index else []

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, h, w) latents -> (N, 3, T, H, W) clips in [-1, 1] (per-frame VAE decode,
        on the input's device)."""
        if x.ndim != 5:
            raise ValueError(f"video decode: expected (N, C, T, h, w), got {tuple(x.shape)}")
        codec = self.codec(x.device if x.device.type != "cpu" else None)
        return codec.decode(x).clamp(-1, 1).to(x.device)

    # ------------------------------------------------------------------ outputs

    def write_samples(self, data: torch.Tensor, out_dir: str | Path,
                      labels: torch.Tensor | None = None) -> list[Path]:
        """`samples.npy` uint8 (N, T, H, W, 3) (the frames exactly as measured and encoded),
        `labels.npy` when labels are given, `samples.png` (first `max_preview` clips, one row
        each), and for every clip (the first `max_videos` when set) `videos/000000.mp4`
        (H.264, `fps`), `.gif` and `.png` (a strip of its frames)."""
        x = viz.as_numpy(data)
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"video write_samples: expected (N, 3, T, H, W) clips, got "
                             f"{tuple(x.shape)}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        u8 = to_uint8_frames(x)  # (N, T, H, W, 3)
        paths = [out / "samples.npy"]
        np.save(paths[0], u8)
        if labels is not None:
            paths.append(out / "labels.npy")
            np.save(paths[-1], np.asarray(viz.as_numpy(labels), dtype=np.int64).reshape(-1))
        N, T = u8.shape[:2]
        if N == 0:
            return paths
        k = min(N, self.max_preview)
        rows = x[:k].transpose(0, 2, 1, 3, 4).reshape(k * T, *x.shape[1:2], *x.shape[3:])
        paths.append(viz.save_image_grid(rows, out / "samples.png", nrow=T))
        width = max(6, len(str(N - 1)))
        for i in range(N if self.max_videos is None else min(N, self.max_videos)):
            stem = out / "videos" / f"{i:0{width}d}"
            paths.append(write_mp4(u8[i], stem.with_suffix(".mp4"), self.fps))
            paths.append(write_gif(u8[i], stem.with_suffix(".gif"), self.fps))
            paths.append(viz.save_image_grid(x[i].transpose(1, 0, 2, 3),
                                             stem.with_suffix(".png"), nrow=T))
        return paths

    # ------------------------------------------------------------------ evaluation

    def reference_clips(self, n: int, seed: int = 0, root: str | Path | None = None
                        ) -> tuple[np.ndarray, dict]:
        """`n` real clips at the task geometry, decoded from video files (not through the VAE):
        uint8 (M, T, R, R, 3), M <= n, drawn by a seeded permutation of every clip of `root`
        (default: the task's root, whose clips the cache index lists when it exists)."""
        index = None
        if root is None:
            root = self._need_root("evaluate")
            index = self._index()
        else:
            root = Path(root).expanduser()
        if index is not None:
            cache = self._reader(("item", "start"))
            names = cache.items()
            entries = [(names[v][0], int(s)) for v, s in zip(cache.column("item"), cache.column("start"))]
            source = f"cache index {cache.dir / shards.INDEX}"
        else:
            entries = []
            for path, _ in scan_videos(root, self.extensions)[0]:
                try:
                    n_frames = probe_frames(path)
                except VideoReadError as e:
                    log.warning("reference clips: skipping unreadable video: %s", e)
                    continue
                rel = path.relative_to(root).as_posix()
                entries += [(rel, s) for s in clip_starts(n_frames, self.frames, self.stride,
                                                          self.clip_hop, self.max_clips_per_video)]
            source = f"videos under {root}"
        if not entries:
            raise ValueError(f"video evaluate: no reference clips in {source}")
        chosen = pick_reference_clips(entries, n, seed)
        by_video: dict[str, list[int]] = {}
        for rel, s in chosen:
            by_video.setdefault(rel, []).append(s)
        clips = []
        for rel, starts in by_video.items():
            try:
                clips.append(read_clips(root / rel, starts, self.frames, self.stride,
                                        self.resolution)[1].numpy())
            except VideoReadError as e:
                log.warning("reference clips: skipping unreadable video: %s", e)
        if not clips:
            raise ValueError(f"video evaluate: none of the reference videos in {source} "
                             f"could be read")
        return np.concatenate(clips), {"reference": source, "reference_pool_clips": len(entries)}

    # keys of the shared `evaluate:` config that only the image tasks use
    _IMAGE_ONLY_KEYS = ("metrics", "npz", "num_workers", "cache_dir", "kid_subset_size",
                        "kid_subsets", "isc_splits", "prc_neighborhood")

    def evaluate(self, samples: torch.Tensor | None, out_dir: str | Path | None = None,
                 inception_weights: str | None = None, i3d: str | None = None,
                 reference=None, num_reference: int | None = None, fid: bool = True,
                 fvd: bool = True, fid_frames_per_clip: int | None = None,
                 fid_feature_layer: str = "2048", i3d_size: int = 224, batch_size: int = 16,
                 device="auto", seed: int | None = None, **kwargs: Any) -> dict:
        """Per-frame FID and FVD of `samples` (N, 3, T, H, W) in [-1, 1] (None: read
        `out_dir/samples.npy`) against real clips.

        reference: None -> `num_reference` clips (default `eval_reference_clips`, else N)
            decoded from `root`; a folder -> the same from the videos in that folder; an array
            or `.npy` file -> those clips, (M, 3, T, H, W) floats in [-1, 1] or uint8
            (M, T, H, W, 3).
        FID: torch-fidelity's Inception over every frame (or `fid_frames_per_clip` evenly
            spaced ones), `fid_feature_layer` "2048" (smaller layers for smoke tests only);
            weights `inception_weights` (default the task's; "download" lets torch-fidelity
            fetch them). FVD: the I3D TorchScript at `i3d` (default the task's). A metric
            without weights, or switched off with fid/fvd=False, is None.
        Keys of the shared evaluate config meant for image tasks are ignored (logged). The
        protocol is returned under `video_protocol`; the dict goes to
        `out_dir/video_metrics.json`."""
        from . import metrics as M
        ignored = sorted(k for k in kwargs if k in self._IMAGE_ONLY_KEYS)
        unknown = sorted(k for k in kwargs if k not in self._IMAGE_ONLY_KEYS)
        if ignored:
            log.info("video evaluate: ignoring image-metric option(s) %s", ignored)
        if unknown:
            log.warning("video evaluate: ignoring unknown option(s) %s (valid: inception_weights,"
                        " i3d, reference, num_reference, fid, fvd, fid_frames_per_clip, "
                        "fid_feature_layer, i3d_size, batch_size, device, seed)", unknown)
        if samples is None:
            if out_dir is None or not (Path(out_dir) / "samples.npy").is_file():
                raise ValueError("video evaluate: no samples given and no samples.npy in out_dir")
            samples = np.load(Path(out_dir) / "samples.npy")
        gen = M.as_uint8_clips(samples, "samples")
        seed = self.eval_seed if seed is None else int(seed)
        protocol: dict[str, Any] = {"frames": self.frames, "stride": self.stride,
                                    "resolution": self.resolution, "num_generated": len(gen),
                                    "seed": seed}
        n_ref = int(num_reference or self.eval_reference_clips or len(gen))
        if reference is None or (isinstance(reference, (str, Path)) and Path(reference).is_dir()):
            ref, info = self.reference_clips(n_ref, seed, root=reference)
            protocol.update(info)
        else:
            if isinstance(reference, (str, Path)):
                if not Path(reference).is_file():
                    raise FileNotFoundError(f"video evaluate: reference not found: {reference}")
                ref = M.as_uint8_clips(np.load(reference, allow_pickle=False), str(reference))
                protocol["reference"] = str(reference)
            else:
                ref = M.as_uint8_clips(reference, "reference")
                protocol["reference"] = "array given"
        protocol["num_reference"] = len(ref)
        if ref.shape[1:] != gen.shape[1:]:
            raise ValueError(f"video evaluate: reference clips {ref.shape[1:]} and samples "
                             f"{gen.shape[1:]} differ in (T, H, W, 3)")
        dev = _pick_device(device)
        result: dict[str, Any] = {"fid_per_frame": None, "fvd": None}  # None: not computed
        inc = inception_weights or self.inception_weights
        if fid and inc:
            result["fid_per_frame"] = M.frame_fid(gen, ref, None if inc == "download" else inc,
                                                  batch_size=batch_size, device=dev,
                                                  frames_per_clip=fid_frames_per_clip,
                                                  feature_layer=fid_feature_layer)
            protocol.update(fid_frames_per_clip=fid_frames_per_clip or self.frames,
                            fid_generated_frames=M.num_fid_frames(gen, fid_frames_per_clip),
                            fid_reference_frames=M.num_fid_frames(ref, fid_frames_per_clip),
                            fid_feature_layer=str(fid_feature_layer), inception_weights=str(inc))
        elif fid:
            log.warning("video evaluate: per-frame FID skipped: no Inception weights (set "
                        "task.inception_weights or evaluate.inception_weights, or 'download')")
        det = i3d or self.i3d
        if fvd and det:
            result["fvd"] = M.fvd(gen, ref, det, batch_size=batch_size, device=dev,
                                  size=i3d_size)
            protocol.update(i3d=str(det), i3d_input=f"{i3d_size}x{i3d_size} bilinear, [-1, 1], "
                            "rescale=False resize=False", fvd_clips=[len(gen), len(ref)])
        elif fvd:
            log.warning("video evaluate: FVD skipped: no I3D TorchScript model (set task.i3d or "
                        "+evaluate.i3d to an i3d_torchscript.pt)")
        result["video_protocol"] = protocol
        if out_dir is not None:
            viz.write_stats_json(result, Path(out_dir) / "video_metrics.json")
        return result

    def describe(self) -> dict:
        d = super().describe()
        d.update(root=str(self.root) if self.root else None, frames=self.frames,
                 stride=self.stride, resolution=self.resolution, vae=self.vae,
                 latent_scale=self.scale)
        return d

