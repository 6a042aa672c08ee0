"""Rank-generic visualisation helpers write PNGs (and JSON) a person can open."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dcgen import viz

GRIDS = [(20,), (6, 5), (4, 6, 5)]


def _open(path):
    with Image.open(path) as im:
        im.load()
        return im.size


@pytest.mark.parametrize("channels", [1, 3])
def test_save_image_grid(tmp_path, channels):
    imgs = torch.rand(5, channels, 8, 6) * 2 - 1
    path = viz.save_image_grid(imgs, tmp_path / "g.png", nrow=3)
    w, h = _open(path)
    assert (w, h) == (3 * 6 + 4 * 2, 2 * 8 + 3 * 2)
    one = viz.save_image(imgs[0], tmp_path / "one.png")
    assert _open(one) == (6, 8)


def test_save_image_grid_rejects_bad_channels(tmp_path):
    with pytest.raises(ValueError, match="C in"):
        viz.save_image_grid(np.zeros((2, 4, 5, 5)), tmp_path / "x.png")


def test_uint8_protocol():
    assert viz.to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])).tolist() == [0, 128, 255, 255]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("with_frames", [True, False])
def test_boundary_map_figure(tmp_path, grid, with_frames):
    K = 4
    L = math.prod(grid)
    gen = torch.Generator().manual_seed(0)
    probs = [torch.rand(L, generator=gen) for _ in range(K)]
    frames = None
    if with_frames:
        # data-space frames at a higher resolution than the token grid (patch size 2)
        shape = (3, *[2 * g for g in grid]) if len(grid) == 2 else (1, *grid)
        frames = [torch.rand(shape, generator=gen) * 2 - 1 for _ in range(K)]
        frames[1] = None  # a missing frame leaves a blank panel
    path = viz.boundary_map_figure(frames, probs, grid, tmp_path / "bm.png",
                                   ts=[999, 666, 333, 0])
    w, h = _open(path)
    assert w > 4 * 50 and h > 50


def test_boundary_map_figure_validates(tmp_path):
    with pytest.raises(ValueError, match="probs\\[0\\]"):
        viz.boundary_map_figure(None, [np.zeros(10)], (3, 3), tmp_path / "x.png")
    with pytest.raises(ValueError, match="ts"):
        viz.boundary_map_figure(None, [np.zeros(9)], (3, 3), tmp_path / "x.png", ts=[1, 2])


def test_prob_canvas_raster_order():
    p = np.arange(2 * 3 * 4, dtype=np.float32)
    canvas = viz._prob_canvas(p, (2, 3, 4), max_slices=4)
    assert canvas.shape == (3, 4 + 1 + 4)
    assert np.array_equal(canvas[:, :4], p[:12].reshape(3, 4))  # last axis fastest
    assert np.isnan(canvas[:, 4]).all()
    assert np.array_equal(viz._prob_canvas(p[:6], (6,), 4), p[None, :6])


@pytest.mark.parametrize("per_sample", [False, True])
def test_kept_fraction_plot(tmp_path, per_sample):
    ts = np.linspace(999, 0, 8)
    s = np.random.default_rng(0).random((5, 8))
    path = viz.kept_fraction_plot(ts, s.mean(0), tmp_path / "k.png",
                                  per_sample=s if per_sample else None)
    w, h = _open(path)
    assert w > 200 and h > 150
    with pytest.raises(ValueError, match="per_sample"):
        viz.kept_fraction_plot(ts, s.mean(0), tmp_path / "k.png", per_sample=s.T)


@pytest.mark.parametrize("grid", GRIDS)
def test_signal_and_volume_previews(tmp_path, grid):
    x = np.random.default_rng(0).uniform(-1, 1, size=(3, 2, *grid))
    fn = {1: viz.save_signal_plot, 2: viz.save_image_grid, 3: viz.save_volume_slices}[len(grid)]
    path = fn(x[:, :1] if len(grid) == 2 else x, tmp_path / "p.png")
    w, h = _open(path)
    assert w >= 10 and h >= 10


def test_write_stats_json(tmp_path):
    stats = {"a": np.float32(1.5), "b": torch.tensor([1, 2]), "c": float("nan"),
             "d": {"e": np.arange(3), "f": np.bool_(True)}, "g": torch.tensor(0.25),
             "h": (np.int64(3), "x"), "i": tmp_path}
    path = viz.write_stats_json(stats, tmp_path / "sub" / "stats.json")
    got = json.loads(path.read_text())
    assert got == {"a": 1.5, "b": [1, 2], "c": None, "d": {"e": [0, 1, 2], "f": True},
                   "g": 0.25, "h": [3, "x"], "i": str(tmp_path)}
    assert list((tmp_path / "sub").iterdir()) == [path]  # no temp file left behind
