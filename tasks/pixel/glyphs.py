"""Glyphs: letters rendered at the model's own resolution from the fonts that ship inside
matplotlib (DejaVu, STIX, Computer Modern; no network), the pixel task's image source with real
detail.

Why this set: the digits are 8x8 images upscaled, so at 32 px every 4x4 patch is smooth and a
DiT/4's 8x8 token grid already holds the whole image; a router has nothing to find. Glyphs drawn
at 32 px have sub-patch detail (serifs, stroke ends, the tail of a Q, the leg of an R) beside
large uniform background, and the classes are chosen so that telling them apart needs that
detail: O/Q/C/G, P/R/B/D, E/F. Each image is a letter from one of the fonts at a random size,
position and small rotation, drawn at 4x and box-filtered down (exact area antialiasing), white on
black, values in [-1, 1].

Every image is a function of (seed, stream, index) only, so the set is the same for any count
and any process. `glyph_classifier()` (the domain metric beside FID) is an RBF SVM fitted on a
separate stream of renderings: it never saw the training images.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLASSES = "BCDEFGOPQR"
SUPERSAMPLE = 4
FEATURE_SIZE = 16  # the classifier reads 16x16 area means
TRAIN_STREAM, JUDGE_STREAM = 0, 1
JUDGE_SIZE = 4000
SVC_C = 10.0
# the text faces among matplotlib's bundled fonts (symbol-only files left out)
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf",
    "cmtt10.ttf", "cmti10.ttf",
)


def font_dir() -> Path:
    import matplotlib
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@lru_cache(maxsize=None)
def _font(name: str, px: int):
    from PIL import ImageFont
    return ImageFont.truetype(str(font_dir() / name), px)


def render_glyph(seed: int, stream: int, index: int, resolution: int = 32) -> tuple[np.ndarray, int]:
    """Image `index` of (seed, stream): ((R, R) float32 in [0, 1], label). Label = index mod 10."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng([int(seed), int(stream), int(index)])
    label = int(index) % len(CLASSES)
    font = FONT_FILES[int(rng.integers(len(FONT_FILES)))]
    big = resolution * SUPERSAMPLE
    px = int(round(big * rng.uniform(0.55, 0.8)))
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    f = _font(font, px)
    l, t, r, b = draw.textbbox((0, 0), CLASSES[label], font=f)
    slack = SUPERSAMPLE * resolution * 0.08
    cx = (big - (r - l)) / 2 - l + rng.uniform(-slack, slack)
    cy = (big - (b - t)) / 2 - t + rng.uniform(-slack, slack)
    draw.text((cx, cy), CLASSES[label], fill=255, font=f)
    canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.BICUBIC)
    small = canvas.reduce(SUPERSAMPLE)  # box filter: each pixel the mean of its 4x4 block
    return np.asarray(small, dtype=np.float32) / 255.0, label


def render_glyphs(count: int, resolution: int = 32, seed: int = 0, stream: int = TRAIN_STREAM
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, 1, R, R) float32 in [-1, 1] (background -1) and (count,) int64 labels."""
    imgs, labels = zip(*(render_glyph(seed, stream, i, resolution) for i in range(int(count))))
    x = torch.from_numpy(np.stack(imgs))[:, None]
    return x * 2 - 1, torch.tensor(labels, dtype=torch.int64)


def to_glyph_features(images) -> np.ndarray:
    """(N, C, R, R) in [-1, 1] -> (N, 256) float64 in [0, 1]: the channel mean, area-pooled to
    16x16, flattened."""
    x = torch.as_tensor(images if torch.is_tensor(images) else np.asarray(images))
    x = x.detach().to("cpu", torch.float32)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"glyph images must be (N, 1 or 3, R, R) in [-1, 1], got {tuple(x.shape)}")
    x = ((x.clamp(-1, 1) + 1) / 2).mean(1, keepdim=True)
    return F.adaptive_avg_pool2d(x, FEATURE_SIZE).flatten(1).double().numpy()


@lru_cache(maxsize=4)
def glyph_classifier(resolution: int = 32, seed: int = 0):
    """An RBF SVM fitted on JUDGE_SIZE renderings of the judge stream (disjoint from training)."""
    from sklearn.svm import SVC
    x, y = render_glyphs(JUDGE_SIZE, resolution, seed, JUDGE_STREAM)
    return SVC(C=SVC_C, gamma="scale").fit(to_glyph_features(x), y.numpy())


def glyph_class_accuracy(images, labels, resolution: int = 32, seed: int = 0) -> float:
    """Fraction of `images` the judge reads as their `labels`."""
    labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels).reshape(-1)
    feats = to_glyph_features(images)
    if feats.shape[0] != labels.shape[0] or feats.shape[0] == 0:
        raise ValueError(f"{feats.shape[0]} images but {labels.shape[0]} labels")
    pred = glyph_classifier(resolution, seed).predict(feats)
    return float((pred == labels.astype(np.int64)).mean())


__all__ = ["CLASSES", "FONT_FILES", "glyph_class_accuracy", "glyph_classifier", "render_glyph",
           "render_glyphs", "to_glyph_features"]
