"""Toy and pixel tasks: shapes, determinism, data quality, sources and error handling."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from dcgen.tasks.pixel import PixelTask
from dcgen.tasks.toy import ToyTask
from dcgen.tasks.toy.data import flat_fraction, sharp_edge_count

GRIDS = [(32,), (12, 10), (6, 8, 7)]


# ------------------------------------------------------------------------------------ toy

@pytest.mark.parametrize("grid", GRIDS)
def test_toy_shapes_and_labels(grid):
    task = ToyTask(grid=grid, channels=3, num_classes=5, num_samples=40)
    assert task.grid == grid and task.channels == 3 and task.num_classes == 5
    assert task.describe()["grid"] == list(grid)
    ds = task.train_dataset()
    assert len(ds) == 40
    x, y = ds[7]
    assert x.shape == (3, *grid) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.ndim == 0
    xs, ys = ds.stack()
    assert xs.abs().max() <= 1.0 and torch.isfinite(xs).all()
    assert ys.min() >= 0 and ys.max() < 5 and len(set(ys.tolist())) == 5


@pytest.mark.parametrize("grid", GRIDS)
def test_toy_deterministic(grid):
    a = ToyTask(grid=grid, seed=3).train_dataset()
    b = ToyTask(grid=grid, seed=3).train_dataset()
    for i in (0, 5, 123):
        assert torch.equal(a[i][0], a[i][0])
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    c = ToyTask(grid=grid, seed=4).train_dataset()
    assert not torch.equal(a[5][0], c[5][0])
    assert not torch.equal(a[5][0], a[6][0])


@pytest.mark.parametrize("grid", GRIDS)
def test_toy_every_sample_has_flat_area_and_detail(grid):
    xs, _ = ToyTask(grid=grid, num_classes=8, num_samples=64).train_dataset().stack()
    for x in xs:
        corner = x.reshape(x.shape[0], -1)[:, 0]  # the origin is always background
        at_bg = (x == corner.view(-1, *([1] * len(grid)))).all(0).float().mean()
        assert at_bg >= 0.4, at_bg
    assert (flat_fraction(xs) >= 0.4).all()
    assert (sharp_edge_count(xs) > 0).all()  # a nonzero finite difference in every sample


def test_toy_unconditional():
    task = ToyTask(grid=(16,), num_classes=0, num_samples=8)
    xs, ys = task.train_dataset().stack()
    assert (ys == 0).all() and (sharp_edge_count(xs) > 0).all()


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_toy_write_samples(tmp_path, grid, channels):
    task = ToyTask(grid=grid, channels=channels, num_samples=6)
    xs, ys = task.train_dataset().stack()
    paths = task.write_samples(xs, tmp_path, labels=ys)
    assert all(p.exists() for p in paths)
    assert np.array_equal(np.load(tmp_path / "samples.npy"), xs.numpy())
    pngs = [p for p in paths if p.suffix == ".png"]
    assert pngs
    with Image.open(pngs[0]) as im:
        im.load()
        assert min(im.size) >= 8


def test_toy_write_samples_rejects_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match="expected"):
        ToyTask(grid=(8, 8)).write_samples(torch.zeros(2, 3, 8, 9), tmp_path)


def test_toy_evaluate_statistics():
    task = ToyTask(grid=(8, 8), num_samples=32)
    xs, _ = task.train_dataset().stack()
    stats = task.evaluate(xs, out_dir=None, num_reference=32)
    assert stats["abs_mean_diff"] < 1e-6 and stats["abs_std_diff"] < 1e-6
    noise = task.evaluate(torch.randn_like(xs), out_dir=None, num_reference=32)
    assert noise["flat_fraction"] < stats["ref_flat_fraction"]


# ------------------------------------------------------------------------------------ pixel

def test_pixel_digits():
    task = PixelTask()
    assert task.grid == (32, 32) and task.channels == 1 and task.num_classes == 10
    ds = task.train_dataset()
    assert len(ds) == 1797
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    assert x[0, 0, 0] == -1  # background
    assert sorted(set(ds.labels.tolist())) == list(range(10))


def test_pixel_digits_rgb_and_resolution():
    task = PixelTask(resolution=16, channels=3)
    x, _ = task.train_dataset()[3]
    assert x.shape == (3, 16, 16) and torch.equal(x[0], x[2])


def _png(path, colour, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_pixel_folder_skips_corrupt_file(tmp_path, caplog):
    root = tmp_path / "imgs"
    colours = {"cat": (255, 0, 0), "ant": (0, 255, 0), "bee": (0, 0, 255)}
    for name, col in colours.items():
        for i in range(2):
            _png(root / name / f"{i}.png", col)
    bad = root / "bee" / "bad.png"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    (root / "bee" / "notes.txt").write_text("ignored: not an image extension")

    task = PixelTask(source="folder", root=root, resolution=8)
    assert task.num_classes == 3 and task.channels == 3
    # without an index: listed by name, the bad file found (and named) when it is read; its item
    # is served by the next readable one
    with caplog.at_level(logging.WARNING, logger="dcgen.data"):
        lazy = task.train_dataset()
        assert len(lazy) == 7 and lazy.skipped == []
        items = [lazy[i] for i in range(len(lazy))]
    assert lazy.skipped == [bad] and "bad.png" in caplog.text
    j = [p for p, _ in lazy.samples].index(bad)
    assert torch.equal(items[j][0], items[j + 1][0]) and int(items[j][1]) == int(items[j + 1][1])
    # dcgen prepare checks every file once and writes the index; the dataset then leaves it out
    caplog.clear()
    task = PixelTask(source="folder", root=root, resolution=8)
    task.prepare()
    assert (root / ".dcgen_index.json").is_file()
    with caplog.at_level(logging.WARNING, logger="dcgen.data"):
        ds = task.train_dataset()
    assert ds.skipped == [bad] and task.skipped == [bad]
    assert "bad.png" in caplog.text and "skipped 1" in caplog.text
    assert len(ds) == 6
    # Sorted class folders: ant=0, bee=1, cat=2; the colour proves the file-label pairing.
    by_label = {}
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1
        by_label.setdefault(int(y), []).append(x)
    assert sorted(by_label) == [0, 1, 2]
    for label, name in enumerate(["ant", "bee", "cat"]):
        expect = torch.tensor(colours[name], dtype=torch.float32) / 127.5 - 1
        for x in by_label[label]:
            assert torch.allclose(x[:, 4, 4], expect, atol=1e-5)
    assert task.train_dataset() is ds  # validated once


def test_pixel_folder_missing_root(tmp_path):
    missing = tmp_path / "nope"
    task = PixelTask(source="folder", root=missing)  # nothing is read at construction
    with pytest.raises(FileNotFoundError, match=str(missing)):
        task.num_classes


def test_pixel_folder_flip_and_gray(tmp_path):
    root = tmp_path / "imgs"
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, :4] = 255
    (root / "a").mkdir(parents=True)
    Image.fromarray(img).save(root / "a" / "half.png")
    task = PixelTask(source="folder", root=root, resolution=8, channels=1, hflip=True)
    ds = task.train_dataset()
    # flips are drawn per (seed, index, epoch): across epochs both orientations appear, and the
    # same key always gives the same image
    seen = {tuple(ds[(0, epoch)][0][0, 0, [0, 7]].tolist()) for epoch in range(40)}
    assert seen == {(1.0, -1.0), (-1.0, 1.0)}
    assert all(torch.equal(ds[(0, e)][0], ds[(0, e)][0]) for e in range(5))


@pytest.mark.parametrize("hwc", [False, True])
def test_pixel_npz_round_trip(tmp_path, hwc):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 16, 16, 3) if hwc else (5, 16, 16), dtype=np.uint8)
    labels = np.array([0, 2, 1, 2, 0])
    path = tmp_path / "data.npz"
    np.savez(path, images=imgs, labels=labels)
    task = PixelTask(source="npz", root=path, resolution=16)
    assert task.channels == (3 if hwc else 1) and task.num_classes == 3
    ds = task.train_dataset()
    assert len(ds) == 5
    for i in range(5):
        x, y = ds[i]
        back = np.round((x.numpy() + 1) * 127.5).astype(np.uint8)
        back = back.transpose(1, 2, 0) if hwc else back[0]
        assert np.array_equal(back, imgs[i]) and int(y) == labels[i]
    # write_samples -> samples.npy reads back exactly; per-image PNGs match the uint8 input
    xs = torch.stack([ds[i][0] for i in range(5)])
    out = tmp_path / "out"
    paths = task.write_samples(xs, out, labels=torch.from_numpy(labels))
    assert np.array_equal(np.load(out / "samples.npy"), xs.numpy())
    assert (out / "samples.png").exists() and len(list((out / "images").glob("*.png"))) == 5
    assert all(p.exists() for p in paths)
    with Image.open(sorted((out / "images").glob("*.png"))[1]) as im:
        assert np.array_equal(np.asarray(im), imgs[1])


def test_pixel_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):  # on first use, not at construction
        PixelTask(source="npz", root=tmp_path / "missing.npz").channels
    path = tmp_path / "wrong.npz"
    np.savez(path, pictures=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="pictures"):
        PixelTask(source="npz", root=path).train_dataset()


def test_pixel_npz_unlabelled_float(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, images=np.random.default_rng(1).random((3, 20, 24), dtype=np.float32))
    task = PixelTask(source="npz", root=path, resolution=8, channels=3)
    assert task.num_classes == 0 and task.channels == 3
    x, y = task.train_dataset()[0]
    assert x.shape == (3, 8, 8) and int(y) == 0 and x.min() >= -1 and x.max() <= 1


def test_pixel_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="source"):
        PixelTask(source="webcam")
    with pytest.raises(ValueError, match="root"):
        PixelTask(source="folder")
    with pytest.raises(ValueError, match="num_classes"):
        PixelTask(num_classes=5)
    assert PixelTask(num_classes=0).train_dataset()[11][1] == 0


def test_dcgen_evaluate_on_digits_gives_fid_against_the_training_images(tmp_path):
    """`dcgen evaluate ... evaluate.reference=train` on a pixel task: the class accuracy and the
    image metrics against the task's own training images (written once as an ADM .npz); without
    a reference, no Inception is loaded."""
    import json

    import numpy as np

    from dcgen.cli import main
    from dcgen.metrics import save_random_inception_weights
    weights = save_random_inception_weights(tmp_path / "inception.pt")
    rd = tmp_path / "run"
    assert main(["train", "model=dcdit_debug", "train.max_steps=1", "train.global_batch_size=8",
                 "train.sample_every=0", "train.log_with=none", f"run_dir={rd}"]) == 0
    ev = tmp_path / "ev"
    assert main(["evaluate", f"run_dir={rd}", "num_samples=6", "steps=2", "batch_size=6", f"out_dir={ev}",
                 "evaluate.reference=train", "evaluate.reference_limit=12", f"evaluate.inception_weights={weights}",
                 "evaluate.metrics=[fid]",
                 "evaluate.num_workers=0", "evaluate.cache_dir=false"]) == 0
    m = json.loads((ev / "metrics.json").read_text())
    assert np.isfinite(m["fid"]) and m["fid"] > 0 and 0 <= m["class_accuracy"] <= 1
    with np.load(ev / "reference_train.npz") as z:
        assert z["arr_0"].shape == (12, 32, 32, 3) and z["arr_0"].dtype == np.uint8
    assert m["num_reference"] == 12 and m["num_generated"] == 6
    plain = tmp_path / "plain"
    assert main(["evaluate", f"run_dir={rd}", "num_samples=6", "steps=2", "batch_size=6", f"out_dir={plain}",
                 "evaluate.inception_weights=/nonexistent.pt"]) == 0
    m2 = json.loads((plain / "metrics.json").read_text())
    assert "fid" not in m2 and 0 <= m2["class_accuracy"] <= 1
