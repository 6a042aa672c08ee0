"""The digits class-accuracy metric (tasks/pixel/metrics.py) and its hook in PixelTask.evaluate."""
import numpy as np
import pytest
import torch

from dcgen.tasks.pixel import PixelTask
from dcgen.tasks.pixel.metrics import digit_class_accuracy, predict_digits


@pytest.fixture(scope="module")
def digits():
    """Every real digit as the task serves it for training: (1797, 1, 32, 32) in [-1, 1], labels."""
    ds = PixelTask().train_dataset()
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack(ys)


def test_real_digits_score_their_labels(digits):
    x, y = digits
    assert x.shape == (1797, 1, 32, 32) and float(x.min()) == -1.0
    acc = digit_class_accuracy(x, y)
    assert acc >= 0.99, acc
    assert digit_class_accuracy(x.expand(-1, 3, -1, -1), y) >= 0.99  # channels=3 digits
    # each class on its own, so no digit is sacrificed to the others
    pred = predict_digits(x)
    per_class = [float((pred[y.numpy() == k] == k).mean()) for k in range(10)]
    assert min(per_class) >= 0.97, per_class


def test_wrong_labels_score_chance(digits):
    x, y = digits
    g = torch.Generator().manual_seed(0)
    shuffled = y[torch.randperm(len(y), generator=g)]
    assert digit_class_accuracy(x, shuffled) < 0.3
    assert digit_class_accuracy(x, (y + 1) % 10) < 0.1
    assert digit_class_accuracy(-torch.ones(20, 1, 32, 32), torch.arange(20) % 10) <= 0.2  # blanks
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        digit_class_accuracy(x[:3], y[:2])
    with pytest.raises(ValueError, match=r"\(N, 1 or 3, R, R\)"):
        digit_class_accuracy(x[:3, 0], y[:3])


def test_pixel_evaluate_reports_class_accuracy(digits, tmp_path):
    x, y = digits
    task = PixelTask()
    idx = torch.arange(0, 1797, 9)  # 200 digits, every class
    task.write_samples(x[idx], tmp_path, labels=y[idx])
    res = task.evaluate(None, tmp_path, reference=None, device="cpu")  # what `dcgen evaluate` calls
    assert res["class_accuracy"] >= 0.99
    wrong = task.evaluate(x[idx], tmp_path, labels=(y[idx] + 3) % 10)
    assert wrong["class_accuracy"] < 0.1
    (tmp_path / "labels.npy").unlink()
    assert task.evaluate(None, tmp_path) == {}  # unlabelled samples: nothing to score
    np.savez(tmp_path / "imgs.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    assert PixelTask(source="npz", root=tmp_path / "imgs.npz").evaluate(x[:4], tmp_path, labels=y[:4]) == {}


def test_glyphs_are_reproducible_detailed_and_judged_by_an_unseen_classifier(monkeypatch):
    """The glyph source: images are a function of (seed, stream, index); the judge, fitted on
    another stream, reads real training glyphs, and loses much of that once each 4x4 patch is
    flattened to its mean (the detail a DiT/4 token would have to carry); the task renders on first
    use, not when it is built."""
    import torch.nn.functional as F
    from dcgen.tasks.pixel import glyphs
    from dcgen.tasks.pixel.task import PixelTask
    x, y = glyphs.render_glyphs(400)
    x2, _ = glyphs.render_glyphs(10)
    assert torch.equal(x[:10], x2) and x.shape == (400, 1, 32, 32) and y.tolist()[:11] == [*range(10), 0]
    assert x.min() == -1 and x.max() == 1 and 0.05 < float((x > -0.99).float().mean()) < 0.4
    acc = glyphs.glyph_class_accuracy(x, y)
    flat = F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="nearest")
    assert acc >= 0.95 and glyphs.glyph_class_accuracy(flat, y) < acc - 0.1
    calls = []
    monkeypatch.setattr(glyphs, "render_glyphs", lambda *a, **k: calls.append(a) or (x, y))
    task = PixelTask(source="glyphs")
    assert calls == [] and task.num_classes == 10 and task.channels == 1
    assert len(task.train_dataset()) == 400 and len(calls) == 1
    assert task.evaluate(x[:50], "/nonexistent", labels=y[:50])["class_accuracy"] >= 0.9
