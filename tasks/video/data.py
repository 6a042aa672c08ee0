"""Video files in and out, clip geometry, and the dataset over the latent cache.

Reading: decord first (fast, random access); when decord is missing or cannot open or decode a
file, PyAV decodes it instead (forward-only, slower, but it reads nearly anything ffmpeg reads).
A file neither can read is *unreadable*: callers log it by name and skip it.

Shape legend: N clips, T frames per clip, H, W pixels, R the square side after crop and resize,
C latent channels, T' latent frames, h, w latent sides. Pixel frames from readers are uint8
(K, H, W, 3); clips in data space are float (3, T, R, R) in [-1, 1].
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

log = logging.getLogger("dcgen.data")

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v")


class VideoReadError(RuntimeError):
    """Neither decord nor PyAV could read a file (the message names it and both reasons)."""


# --------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------

def scan_videos(root: str | Path, extensions: Sequence[str] = VIDEO_EXTENSIONS
                ) -> tuple[list[tuple[Path, int]], list[str]]:
    """UCF-101 layout `root/<class>/<video>` (sub-folders searched recursively; sorted folder
    names give the label ids) or a flat/unlabelled folder: every video under `root`, label 0.

    Returns `(videos, classes)`: videos sorted as (path, label), classes [] when unlabelled.
    Hidden files and folders (the default cache `.dcgen_cache` among them) are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video: folder not found: {root}")
    exts = tuple(e.lower() for e in extensions)

    def files(folder: Path) -> list[Path]:
        out = []
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(root).parts
            if p.is_file() and p.suffix.lower() in exts and not any(s.startswith(".") for s in rel):
                out.append(p)
        return out

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        videos = [(p, label) for label, name in enumerate(classes) for p in files(root / name)]
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in exts]
        if loose:
            log.warning("video %s: %d video file(s) directly under the root are ignored: with "
                        "class sub-folders every video must sit in one (e.g. %s)", root,
                        len(loose), loose[0].name)
    else:
        videos = [(p, 0) for p in files(root)]
    if not videos:
        raise ValueError(f"video {root}: no files with extensions {list(exts)} "
                         f"({len(classes)} class folder(s))")
    return videos, classes


# --------------------------------------------------------------------------------------------
# Clip geometry
# --------------------------------------------------------------------------------------------

def clip_span(frames: int, stride: int) -> int:
    """Source frames one clip covers: T frames taken every `stride` frames."""
    return (frames - 1) * stride + 1


def clip_starts(num_frames: int, frames: int, stride: int, hop: int | None = None,
                max_clips: int | None = None) -> list[int]:
    """First source frame of every clip of a video with `num_frames` frames: clips start every
    `hop` frames (None: one span, i.e. back to back), and at most `max_clips` of them are kept,
    evenly spread over the video. Empty when the video is shorter than one clip."""
    span = clip_span(frames, stride)
    if num_frames < span:
        return []
    starts = list(range(0, num_frames - span + 1, hop or span))
    if max_clips is not None and len(starts) > max_clips:
        pick = np.unique(np.linspace(0, len(starts) - 1, max_clips).round().astype(int))
        starts = [starts[i] for i in pick]
    return starts


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------

class _DecordReader:
    backend = "decord"

    def __init__(self, path: Path):
        import decord
        self._vr = decord.VideoReader(str(path), ctx=decord.cpu(0))
        self.num_frames = len(self._vr)

    def get(self, indices: Sequence[int]) -> np.ndarray:
        return self._vr.get_batch(list(indices)).asnumpy()  # (K, H, W, 3) uint8


class _PyAVReader:
    """Forward-only decoder: `get` wants ascending indices; an earlier index reopens the file."""

    backend = "pyav"

    def __init__(self, path: Path):
        import av
        self.path, self._container = path, None
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise ValueError("no video stream")
            n = c.streams.video[0].frames
            if n <= 0:  # webm/mkv often store no frame count: decode once to count
                n = sum(1 for _ in c.decode(video=0))
        self.num_frames = int(n)
        self._container, self._frames, self._pos = None, None, 0

    def _reopen(self):
        import av
        self.close()
        self._container = av.open(str(self.path))
        self._frames, self._pos = self._container.decode(video=0), 0

    def get(self, indices: Sequence[int]) -> np.ndarray:
        indices = list(indices)
        if self._container is None or indices[0] < self._pos:
            self._reopen()
        out = []
        for i in indices:
            frame = None
            while self._pos <= i:
                frame = next(self._frames)  # StopIteration: fewer frames than announced
                self._pos += 1
            if frame is None:
                raise ValueError(f"frame {i} requested twice or out of order")
            out.append(frame.to_ndarray(format="rgb24"))
        return np.stack(out)

    def close(self):
        if self._container is not None:
            self._container.close()
            self._container = None

    def __del__(self):
        if getattr(self, "_container", None) is not None:
            self.close()


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def read_clips(path: str | Path, starts: Sequence[int] | None, frames: int, stride: int,
               resolution: int, hop: int | None = None, max_clips: int | None = None,
               backends: Sequence[str] = ("decord", "pyav")) -> tuple[list[int], torch.Tensor]:
    """Every clip of one video, centre-cropped and resized: `(starts, clips)` with clips uint8
    (N, T, R, R, 3). `starts=None` enumerates them with `clip_starts`. Tries each backend in
    turn for the whole file (decord may open a file and then fail halfway through it); raises
    `VideoReadError` naming the file and every backend's reason when none succeeds."""
    path = Path(path)
    errors = []
    for name in backends:
        try:
            reader = _DecordReader(path) if name == "decord" else _PyAVReader(path)
        except ImportError as e:
            errors.append(f"{name}: not installed ({e.name})")
            continue
        except Exception as e:  # decord raises DECORDError (RuntimeError), PyAV FFmpegError, ...
            errors.append(f"{name}: {_reason(e)}")
            continue
        try:
            if reader.num_frames <= 0:
                raise ValueError("no frames")
            s = list(starts) if starts is not None else clip_starts(
                reader.num_frames, frames, stride, hop, max_clips)
            return s, _read_all(reader, s, frames, stride, resolution)
        except Exception as e:
            errors.append(f"{name}: {_reason(e)}")
        finally:
            if hasattr(reader, "close"):
                reader.close()
    raise VideoReadError(f"cannot read video {path} ({'; '.join(errors)})")


def probe_frames(path: str | Path, backends: Sequence[str] = ("decord", "pyav")) -> int:
    """Number of frames of a video (decord, else PyAV); `VideoReadError` when neither opens it."""
    errors = []
    for name in backends:
        try:
            reader = _DecordReader(Path(path)) if name == "decord" else _PyAVReader(Path(path))
        except Exception as e:
            errors.append(f"{name}: {_reason(e)}")
            continue
        if hasattr(reader, "close"):
            reader.close()
        if reader.num_frames > 0:
            return reader.num_frames
        errors.append(f"{name}: no frames")
    raise VideoReadError(f"cannot read video {path} ({'; '.join(errors)})")


def _read_all(reader, starts: list[int], frames: int, stride: int, resolution: int,
              max_union: int = 256) -> torch.Tensor:
    """Decode the union of the clips' frames in groups of at most ~`max_union` frames (bounded
    memory; overlapping clips decode and resize each shared frame once)."""
    offs = np.arange(frames) * stride
    out = torch.empty(len(starts), frames, resolution, resolution, 3, dtype=torch.uint8)
    i = 0
    while i < len(starts):
        j, union = i, set()
        while j < len(starts) and (j == i or len(union) + frames <= max_union):
            union.update((starts[j] + offs).tolist())
            j += 1
        idx = sorted(union)
        if idx[-1] >= reader.num_frames:
            raise ValueError(f"frame {idx[-1]} past the end ({reader.num_frames} frames)")
        pix = resize_frames(reader.get(idx), resolution)  # (K, R, R, 3)
        pos = {f: k for k, f in enumerate(idx)}
        for c in range(i, j):
            out[c] = pix[[pos[f] for f in (starts[c] + offs).tolist()]]
        i = j
    return out


def resize_frames(frames: np.ndarray | torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (K, H, W, 3) -> uint8 (K, R, R, 3): centre crop to a square, then bicubic resize
    with antialiasing when shrinking (the same for every frame, source and reference alike)."""
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames (K, H, W, 3), got {tuple(x.shape)}")
    h, w = x.shape[1:3]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[:, top:top + s, left:left + s]
    if s == resolution:
        return x.contiguous()
    x = x.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False,
                      antialias=s > resolution)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def clips_to_model(clips: torch.Tensor) -> torch.Tensor:
    """uint8 (N, T, R, R, 3) -> float (N, 3, T, R, R) in [-1, 1]."""
    return clips.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def to_uint8_frames(data) -> np.ndarray:
    """Data-space clips (N, 3, T, H, W) in [-1, 1] -> uint8 (N, T, H, W, 3), rounding as in
    `dcgen.viz.to_uint8` (the FID protocol): clamp(127.5 x + 128), truncated."""
    from dcgen import viz
    x = viz.to_uint8(data)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 4, 1))


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------

def write_mp4(frames: np.ndarray, path: str | Path, fps: float = 8.0) -> Path:
    """uint8 (T, H, W, 3) -> MP4: H.264 (yuv420p, crf 18) through PyAV, or MPEG-4 Part 2 when
    this PyAV has no libx264; imageio-ffmpeg when PyAV is missing. Sides must be even
    (yuv420p); odd sides are padded by one edge pixel."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = np.asarray(frames, dtype=np.uint8)
    pad_h, pad_w = f.shape[1] % 2, f.shape[2] % 2
    if pad_h or pad_w:
        f = np.pad(f, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    try:
        import av
    except ImportError:
        import imageio.v2 as iio2
        with iio2.get_writer(str(path), fps=fps, codec="libx264", macro_block_size=1,
                             pixelformat="yuv420p") as w:
            for fr in f:
                w.append_data(fr)
        return path
    from fractions import Fraction
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = f.shape[2], f.shape[1], "yuv420p"
        if codec == "libx264":
            s.options = {"crf": "18"}
        else:
            s.bit_rate = 4_000_000
        for fr in f:
            for packet in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


def write_gif(frames: np.ndarray, path: str | Path, fps: float = 8.0) -> Path:
    """uint8 (T, H, W, 3) -> looping GIF (Pillow)."""
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imgs = [Image.fromarray(fr) for fr in np.asarray(frames, dtype=np.uint8)]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(round(1000 / fps)),
                 loop=0, optimize=False)
    return path


# --------------------------------------------------------------------------------------------
# The latent cache (the layout is dcgen.shards'; prepare.py writes it)
# --------------------------------------------------------------------------------------------

def to_storage(x: torch.Tensor, cache_dtype: str) -> np.ndarray:
    """Moments -> what the cache stores: `cache_dtype` values (bfloat16 as its int16 bits)."""
    t = x.detach().to(getattr(torch, cache_dtype)).cpu()
    return (t.view(torch.int16) if cache_dtype == "bfloat16" else t).numpy()


def from_storage(a: np.ndarray, cache_dtype: str) -> torch.Tensor:
    """A stored row -> float32 moments."""
    t = torch.from_numpy(np.array(a))
    return (t.view(torch.bfloat16) if cache_dtype == "bfloat16" else t).float()


class LatentClipDataset(Dataset):
    """Cached posterior moments -> `(x, y)`: x float32 (C, T', h, w) a fresh posterior sample
    times `scale` (or the scaled mean with `sample_posterior=False`), y int64.

    `cache` is a `dcgen.shards.ShardReader` (it opens shards lazily, at most a few at a time,
    and pickles into DataLoader workers without them). The posterior noise of item i in epoch e
    comes from its own generator seeded by (seed, i, e) (the sampler passes (index, epoch)
    keys): the same in every worker and process, and after a resume, whatever the number of
    DataLoader workers."""

    wants_epoch = True

    def __init__(self, cache, scale: float, unconditional: bool = False,
                 sample_posterior: bool = True, seed: int = 0, latent_mean=None, latent_std=None):
        self.cache, self.cache_dtype = cache, cache.manifest["settings"]["cache_dtype"]
        self.scale, self.sample_posterior = float(scale), bool(sample_posterior)
        self.unconditional, self.seed = unconditional, int(seed)
        # latent_norm=channel: (z - mean_c) / std_c instead of scale * z
        self.shift = None if latent_mean is None else torch.tensor(latent_mean).view(-1, 1, 1, 1)
        self.div = None if latent_std is None else torch.tensor(latent_std).view(-1, 1, 1, 1)

    def __len__(self) -> int:
        return len(self.cache)

    def moments(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        arrays, r = self.cache.locate(i)
        return (from_storage(arrays["mean"][r], self.cache_dtype),
                from_storage(arrays["logvar"][r], self.cache_dtype))

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        from dcgen.rng import item_generator
        from dcgen.task import item_key
        i, epoch = item_key(key)
        arrays, r = self.cache.locate(i)
        mean = from_storage(arrays["mean"][r], self.cache_dtype)
        if self.sample_posterior:
            logvar = from_storage(arrays["logvar"][r], self.cache_dtype)
            g = item_generator(self.seed, "train", i, epoch)
            x = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        else:
            x = mean
        y = 0 if self.unconditional else int(arrays["label"][r])
        x = x * self.scale if self.shift is None else (x - self.shift) / self.div
        return x.float(), torch.tensor(y, dtype=torch.int64)


def pick_reference_clips(entries: list[tuple[str, int]], n: int, seed: int
                         ) -> list[tuple[str, int]]:
    """`n` (video, start) entries drawn without replacement by a seeded permutation (all of them,
    in order, when n >= len(entries)); sorted so each video is opened once."""
    if n >= len(entries):
        return list(entries)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(entries), generator=g)[:n].tolist()
    return sorted(entries[i] for i in pick)
