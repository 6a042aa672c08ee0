"""Fréchet distances on pluggable networks (dcgen/feature_nets.py, dcgen.metrics): FD on a
TorchScript encoder equals torch-fidelity's arithmetic on the same features; sFID's features have
the ADM suite's shape; metrics.json names the network of every number."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dcgen.feature_nets import SFID_FEATURES, SpatialInception, TorchScriptFeatureNet, parse_network
from dcgen.metrics import evaluate_images, fd_from_features, load_inception, save_random_inception_weights


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 12, 5, stride=2)

    def forward(self, x):
        return F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1)


def _encoder(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.jit.trace(Tiny().eval(), torch.zeros(1, 3, 24, 24)).save(str(path))
    return path


def _images(n, seed, shift=0):
    g = np.random.default_rng(seed)
    x = g.integers(0, 200, size=(n, 16, 16, 3)) + shift
    return np.clip(x, 0, 255).astype(np.uint8)


def test_fd_on_a_torchscript_encoder_is_torch_fidelitys_arithmetic(tmp_path):
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    path = _encoder(tmp_path)
    gen, ref = _images(40, 1), _images(50, 2, shift=40)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    res = evaluate_images(gen, tmp_path / "out", reference=tmp_path / "ref.npz", metrics=[],
                          fd_networks=[f"tiny={path}@24"], cache_dir=tmp_path / "cache", progress=False)
    # the same features by hand: [0, 1], bicubic with antialias to 24, ImageNet normalisation
    net = torch.jit.load(str(path))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def feats(a):
        x = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(24, 24), mode="bicubic", align_corners=False, antialias=True)
        return net((x - mean) / std).double().detach().numpy()
    fg, fr = feats(gen), feats(ref)
    stats = [{"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)} for f in (fg, fr)]
    want = fid_statistics_to_metric(stats[0], stats[1], False)[KEY_METRIC_FID]
    assert res["fd_tiny"] == pytest.approx(want, rel=1e-5) and res["fd_tiny"] > 0.01
    assert res["networks"]["fd_tiny"].startswith("torchscript:") and "fid" not in res["networks"]
    # the low-rank route (fewer samples than dimensions) is the same number
    a, b = torch.randn(8, 30, dtype=torch.float64), torch.randn(9, 30, dtype=torch.float64) + 0.3
    full = fid_statistics_to_metric({"mu": a.mean(0).numpy(), "sigma": np.cov(a.numpy(), rowvar=False)},
                                    {"mu": b.mean(0).numpy(), "sigma": np.cov(b.numpy(), rowvar=False)},
                                    False)[KEY_METRIC_FID]
    assert fd_from_features(a, b) == pytest.approx(full, rel=1e-6)


def test_sfid_features_have_the_adm_suites_shape_and_are_named(tmp_path):
    weights = save_random_inception_weights(tmp_path / "inception.pt")
    ext = SpatialInception(load_inception(weights))
    feats = ext(torch.from_numpy(_images(3, 0)).permute(0, 3, 1, 2).contiguous())
    assert tuple(feats[-1].shape) == (3, SFID_FEATURES) == (3, 7 * 17 * 17)
    assert ext.features_list[-1] == "spatial" and tuple(feats[0].shape) == (3, 2048)
    np.savez(tmp_path / "ref.npz", arr_0=_images(12, 5, shift=30))
    res = evaluate_images(_images(10, 3), tmp_path / "out", reference=tmp_path / "ref.npz",
                          metrics=["fid", "sfid"], inception_weights=weights, cache_dir=tmp_path / "c",
                          progress=False, batch_size=10)
    assert res["sfid"] > 0 and res["fid"] > 0 and res["sfid"] != res["fid"]
    assert set(res["networks"]) == {"fid", "sfid"}
    # a TorchScript pool3 file has no spatial layer: sFID is refused by the wrapper, None in a run
    with pytest.raises(ValueError, match="mixed_6/conv"):
        SpatialInception(torch.nn.Identity())


def test_bad_network_specs_are_refused(tmp_path):
    assert parse_network("dinov2=/m/d.pt@518") == ("dinov2", "/m/d.pt", 518)
    assert parse_network("enc=/m/e.pt") == ("enc", "/m/e.pt", 224)
    for bad in ("/m/d.pt", "dinov2=", "dinov2=/m/d.pt@big"):
        with pytest.raises(ValueError):
            parse_network(bad)
    with pytest.raises(FileNotFoundError):
        TorchScriptFeatureNet(tmp_path / "none.pt", "x")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="TorchScript"):
        TorchScriptFeatureNet(tmp_path / "junk.pt", "x")
