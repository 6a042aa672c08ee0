"""Rank-generic pictures of samples and router diagnostics (METHOD §8).

Nothing here knows about a task: inputs are plain arrays in data space ([-1, 1]) plus an explicit
`grid`. Figures are built with the object-oriented matplotlib API (`Figure`, rendered by Agg) so
importing this module never switches the user's pyplot backend and works in worker processes.

Grid layout follows the chunking core: a probability vector of length L = prod(grid) is in raster
order, last axis fastest, so `p.reshape(grid)` recovers the grid.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

PROB_CMAP = "RdYlGn"  # red = merged into a chunk, green = kept as a boundary (METHOD §8)


# --------------------------------------------------------------------------------------------
# Array helpers
# --------------------------------------------------------------------------------------------

def as_numpy(x: Any) -> np.ndarray:
    """torch tensor / list / array -> float32 numpy array on the host (bf16 safe)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def to_uint8(x: Any) -> np.ndarray:
    """[-1, 1] floats -> uint8 with the FID-protocol rounding: clamp(127.5 x + 128), truncated."""
    return np.clip(127.5 * as_numpy(x) + 128.0, 0, 255).astype(np.uint8)


def _display_channels(img: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (C', H, W) with C' in {1, 3}: RGB and gray pass, anything else shows
    its first channel (a latent or a 2-channel field has no natural colour)."""
    return img if img.shape[0] in (1, 3) else img[:1]


def save_image(image: Any, path: str | Path) -> Path:
    """One (C, H, W) image in [-1, 1] -> PNG (C = 1 gray, 3 RGB, otherwise the first channel)."""
    img = as_numpy(image)
    if img.ndim != 3:
        raise ValueError(f"save_image expects (C, H, W), got shape {img.shape} for {path}")
    img = to_uint8(_display_channels(img)).transpose(1, 2, 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(path)
    return path


def is_image_batch(data) -> bool:
    """Decoded samples that are images: (N, 1 or 3, H, W)."""
    return getattr(data, "ndim", 0) == 4 and data.shape[1] in (1, 3)


def save_image_grid(images: Any, path: str | Path, nrow: int | None = None,
                    padding: int = 2) -> Path:
    """(N, C, H, W) images in [-1, 1] -> one PNG, `nrow` images per row (default ~sqrt(N)),
    separated by `padding` black pixels. C must be 1 (gray) or 3 (RGB)."""
    imgs = as_numpy(images)
    if imgs.ndim == 3:  # (N, H, W): gray without a channel axis
        imgs = imgs[:, None]
    if imgs.ndim != 4 or imgs.shape[1] not in (1, 3) or imgs.shape[0] == 0:
        raise ValueError(f"save_image_grid expects (N, C, H, W) with C in (1, 3) and N > 0, "
                         f"got shape {imgs.shape} for {path}")
    n, c, h, w = imgs.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    canvas = np.zeros((ncol_rows * (h + padding) + padding, nrow * (w + padding) + padding, c),
                      dtype=np.uint8)
    u8 = to_uint8(imgs).transpose(0, 2, 3, 1)
    for i in range(n):
        r, q = divmod(i, nrow)
        y0, x0 = padding + r * (h + padding), padding + q * (w + padding)
        canvas[y0:y0 + h, x0:x0 + w] = u8[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(path)
    return path


def save_signal_plot(signals: Any, path: str | Path, titles: Sequence[str] | None = None,
                     ncols: int = 4) -> Path:
    """(N, C, L) 1-D signals -> one PNG of small line plots (one panel per sample, one line
    per channel); the y range is fixed to [-1.1, 1.1] so panels compare at a glance."""
    sig = as_numpy(signals)
    if sig.ndim == 2:
        sig = sig[:, None]
    if sig.ndim != 3 or sig.shape[0] == 0:
        raise ValueError(f"save_signal_plot expects (N, C, L), got shape {sig.shape} for {path}")
    n = sig.shape[0]
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.0 * ncols, 1.8 * nrows), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        if i >= n:
            ax.set_axis_off()
            continue
        for ch in range(sig.shape[1]):
            ax.plot(sig[i, ch], lw=1.0)
        ax.set_ylim(-1.1, 1.1)
        ax.tick_params(labelsize=6)
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=8)
    return save_figure(fig, path)


def save_volume_slices(volumes: Any, path: str | Path, titles: Sequence[str] | None = None
                       ) -> Path:
    """(N, C, X, Y, Z) volumes -> one PNG, one row per sample: the middle slice across each of
    the three axes, then the max projection along each axis (small off-centre structures
    miss the middle slices but show in the projections). C = 1 or 3 as gray/RGB over [-1, 1],
    otherwise the first channel."""
    vol = as_numpy(volumes)
    if vol.ndim == 4:
        vol = vol[:, None]
    if vol.ndim != 5 or vol.shape[0] == 0:
        raise ValueError(f"save_volume_slices expects (N, C, X, Y, Z), got shape {vol.shape} "
                         f"for {path}")
    n = vol.shape[0]
    fig = Figure(figsize=(9.0, 1.6 * n + 0.3), dpi=100, layout="constrained")
    axes = fig.subplots(n, 6, squeeze=False)
    names = ["mid x", "mid y", "mid z", "max x", "max y", "max z"]
    for i in range(n):
        v = _display_channels(vol[i])  # (C', X, Y, Z)
        X, Y, Z = v.shape[1:]
        panels = [v[:, X // 2], v[:, :, Y // 2], v[:, :, :, Z // 2],
                  v.max(1), v.max(2), v.max(3)]
        for a, (ax, sl) in enumerate(zip(axes[i], panels)):
            img = to_uint8(sl).transpose(1, 2, 0)
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            label = names[a]
            if titles is not None and a == 0:
                label = f"{titles[i]}  {label}"
            ax.set_title(label, fontsize=7)
    return save_figure(fig, path)


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------------
# Boundary maps (METHOD §8)
# --------------------------------------------------------------------------------------------

def _prob_canvas(p: np.ndarray, grid: tuple[int, ...], max_slices: int) -> np.ndarray:
    """Boundary probabilities on the grid -> a 2-D array to draw. Rank 3 becomes up to
    `max_slices` slices along the first axis laid side by side, separated by a NaN column
    (drawn blank) so slice borders are not mistaken for data."""
    g = p.reshape(grid)
    if len(grid) == 2:
        return g
    if len(grid) == 1:
        return g[None, :]
    k = min(max_slices, grid[0])
    idx = np.unique(np.linspace(0, grid[0] - 1, k).round().astype(int))
    gap = np.full((grid[1], 1), np.nan, dtype=np.float32)
    parts = []
    for j, s in enumerate(idx):
        if j:
            parts.append(gap)
        parts.append(g[s])
    return np.concatenate(parts, axis=1)


def _draw_frame(ax, frame: np.ndarray) -> None:
    """Data-space x_t in its natural form: (C, L) as lines, (C, H, W) as an image,
    (C, X, Y, Z) as the middle slice across the first axis."""
    if frame.ndim == 2:
        for ch in range(frame.shape[0]):
            ax.plot(frame[ch], lw=0.8)
        ax.set_ylim(-1.1, 1.1)
        ax.set_xticks([])
        ax.tick_params(labelsize=6)
        return
    if frame.ndim == 4:
        frame = frame[:, frame.shape[1] // 2]
    if frame.ndim != 3:
        raise ValueError(f"frame must be (C, L), (C, H, W) or (C, X, Y, Z), got {frame.shape}")
    img = to_uint8(_display_channels(frame)).transpose(1, 2, 0)
    ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def boundary_map_figure(frames: Sequence[Any] | None, probs: Sequence[Any], grid: Sequence[int],
                        path: str | Path, ts: Sequence[float] | None = None,
                        kept_fraction: Sequence[float] | None = None, threshold: float = 0.5,
                        max_slices: int = 4, title: str | None = None) -> Path:
    """One sample across K timesteps: the decoded x_t (top row, omitted when every frame is
    None) and the router's boundary probability p (bottom row) on RdYlGn over [0, 1].

    The probability, not the hard mask, is drawn because it shows how confident the router is
    (METHOD §8). Each title gives the kept percentage: `kept_fraction[k]` when given (e.g.
    after tail dropping), otherwise the share of positions with p > threshold.
    `grid` is the token grid of `probs` (rank 1: a strip with p as a line on top; rank 3:
    slices along the first axis side by side).
    """
    grid = tuple(int(g) for g in grid)
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"grid must have rank 1, 2 or 3, got {grid}")
    K = len(probs)
    if K == 0:
        raise ValueError("boundary_map_figure needs at least one probability map")
    frames = list(frames) if frames is not None else [None] * K
    for name, seq in (("frames", frames), ("ts", ts), ("kept_fraction", kept_fraction)):
        if seq is not None and len(seq) != K:
            raise ValueError(f"{name} has {len(seq)} entries but probs has {K}")
    L = math.prod(grid)
    ps = []
    for k, p in enumerate(probs):
        p = as_numpy(p).reshape(-1)
        if p.size != L:
            raise ValueError(f"probs[{k}] has {p.size} values, grid {grid} needs {L}")
        ps.append(p)
    has_frames = any(f is not None for f in frames)
    rows = 2 if has_frames else 1

    # Panel aspect follows the drawn canvas so wide rank-3 strips stay readable.
    canvas0 = _prob_canvas(ps[0], grid, max_slices)
    aspect = canvas0.shape[1] / max(canvas0.shape[0], 1)
    if len(grid) == 1:
        pw, ph = 3.0, 1.2
    elif len(grid) == 2:
        pw, ph = 2.2, 2.2
    else:
        pw = min(5.0, 1.1 * aspect)
        ph = max(1.2, pw / aspect)
    fig = Figure(figsize=(pw * K + 0.8, (ph + 0.5) * rows + (0.4 if title else 0.0)), dpi=100,
                 layout="constrained")
    axes = fig.subplots(rows, K, squeeze=False)
    cmap = colormaps[PROB_CMAP].with_extremes(bad="white")  # NaN slice separators
    im = None
    for k in range(K):
        head = f"t={float(ts[k]):.3g}" if ts is not None else f"step {k}"
        kept = (float(kept_fraction[k]) if kept_fraction is not None
                else float((ps[k] > threshold).mean()))
        if has_frames:
            ax = axes[0, k]
            if frames[k] is None:
                ax.set_axis_off()
            else:
                _draw_frame(ax, as_numpy(frames[k]))
            ax.set_title(head, fontsize=8)
        ax = axes[rows - 1, k]
        canvas = _prob_canvas(ps[k], grid, max_slices)
        if len(grid) == 1:
            im = ax.imshow(canvas, cmap=cmap, vmin=0, vmax=1, aspect="auto",
                           extent=(0, L, 0, 1), interpolation="nearest")
            ax.plot(np.arange(L) + 0.5, ps[k], color="black", lw=0.8)
            ax.axhline(threshold, color="gray", lw=0.5, ls="--")
            ax.set_ylim(0, 1)
            ax.tick_params(labelsize=6)
        else:
            im = ax.imshow(np.ma.masked_invalid(canvas), cmap=cmap, vmin=0, vmax=1,
                           interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        label = f"kept {100 * kept:.1f}%"
        ax.set_title(label if has_frames else f"{head}\n{label}", fontsize=8)
    fig.colorbar(im, ax=axes[rows - 1, :].tolist(), shrink=0.8, label="boundary prob p")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def kept_fraction_plot(ts: Sequence[float], fractions: Sequence[float], path: str | Path,
                       per_sample: Any = None, ylabel: str = "kept token fraction",
                       title: str | None = None) -> Path:
    """Kept-token fraction against timestep, read left to right as sampling runs: the x axis
    is t descending (noisy on the left, clean on the right). `per_sample` (N, K) adds the
    spread across samples: a min-max band, a +-1 std band and, for N <= 16, thin lines."""
    t = as_numpy(ts).reshape(-1)
    f = as_numpy(fractions).reshape(-1)
    if t.size != f.size or t.size == 0:
        raise ValueError(f"ts ({t.size}) and fractions ({f.size}) must be non-empty and match")
    fig = Figure(figsize=(5.0, 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if per_sample is not None:
        s = as_numpy(per_sample)
        if s.ndim != 2 or s.shape[1] != t.size:
            raise ValueError(f"per_sample must be (N, K={t.size}), got shape {s.shape}")
        if s.shape[0] <= 16:
            for row in s:
                ax.plot(t, row, color="tab:blue", lw=0.5, alpha=0.3)
        ax.fill_between(t, s.min(0), s.max(0), color="tab:blue", alpha=0.12, label="min-max")
        mu, sd = s.mean(0), s.std(0)
        ax.fill_between(t, mu - sd, mu + sd, color="tab:blue", alpha=0.25, label="±1 std")
    ax.plot(t, f, color="tab:blue", lw=1.8, marker="o", ms=3, label="mean")
    lo, hi = float(t.min()), float(t.max())
    ax.set_xlim(hi, lo) if hi > lo else ax.invert_xaxis()
    ax.set_ylim(0, max(1.0, float(np.nanmax(f)) * 1.05))
    ax.set_xlabel("timestep t  (noisy → clean)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if per_sample is not None:
        ax.legend(fontsize=7, loc="best")
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Stats
# --------------------------------------------------------------------------------------------

def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu()
        x = x.float().numpy() if x.is_floating_point() else x.numpy()
    if isinstance(x, np.ndarray):
        return _jsonable(x.item() if x.ndim == 0 else x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float):
        # JSON has no NaN/Inf; null keeps the file valid for strict parsers.
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return str(x)


def write_stats_json(stats: dict, path: str | Path) -> Path:
    """Write `stats` as indented JSON; numpy/torch scalars and arrays become plain numbers and
    lists, non-finite floats become null. Written to a temp file then renamed so an interrupted
    run never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from .files import atomic_write_text
    text = json.dumps(_jsonable(stats), indent=2, sort_keys=False, allow_nan=False)
    return atomic_write_text(path, text + "\n")
