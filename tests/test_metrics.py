"""dcgen.metrics: the ADM .npz, the score arithmetic on known features, and the Inception
pipeline with locally saved random weights (no download)."""
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from dcgen import metrics as M


def test_uint8_conversion_is_the_fid_protocol():
    # clamp(127.5 x + 128, 0, 255), truncated (not rounded)
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 0.99, 1.0, 3.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    got = M.to_uint8_nhwc(x)[0, 0, :, 0]
    want = [0, 0, 128, 191, 254, 255, 255]  # 0.5 -> 191.75 -> 191; 0.99 -> 254.2 -> 254
    assert got.tolist() == want
    u8 = np.zeros((2, 4, 4, 3), np.uint8)
    assert M.to_uint8_nhwc(u8) is u8
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        M.to_uint8_nhwc(np.zeros((2, 4, 4, 3), np.float32))


def test_npz_writer_streams_the_adm_format(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.uniform(-1.1, 1.1, (7, 3, 5, 6)).astype(np.float32)
    w = M.NpzWriter(tmp_path / "s.npz", 7, 5, 6)
    for i in range(0, 7, 3):
        w.write(imgs[i:i + 3])
    path = w.close()
    with np.load(path) as z:  # what the ADM evaluator does
        assert list(z.keys()) == ["arr_0"]
        arr = z["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (7, 5, 6, 3)  # NHWC RGB
    assert np.array_equal(arr, M.to_uint8_nhwc(imgs))
    assert M.check_adm_npz(path) == (7, 5, 6, 3)
    streamed = np.concatenate(list(M.iter_npz_images(path, batch_size=4)))
    assert np.array_equal(streamed, arr)
    # too few images: no file appears; wrong shapes are refused
    w = M.NpzWriter(tmp_path / "short.npz", 3, 5, 6)
    w.write(imgs[:2])
    with pytest.raises(ValueError, match="2 images written, 3 declared"):
        w.close()
    assert not (tmp_path / "short.npz").exists() and not list(tmp_path.glob(".short*"))
    w = M.NpzWriter(tmp_path / "x.npz", 3, 5, 6)
    with pytest.raises(ValueError, match="batch of shape"):
        w.write(np.zeros((1, 3, 6, 6), np.float32))
    w.abort()
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        M.check_adm_npz(tmp_path / "f.npz")
    np.savez(tmp_path / "k.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'arr_0'"):
        M.check_adm_npz(tmp_path / "k.npz")


def test_scores_on_known_features():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 8, generator=g)
    b = torch.randn(400, 8, generator=g)
    mu, sig = np.zeros(8), np.eye(8)
    # equal covariances: FID is the squared mean difference exactly
    assert M.frechet_distance(mu, sig, mu + 0.5, sig) == pytest.approx(8 * 0.25, abs=1e-9)
    # diagonal Gaussians: FID = |dmu|^2 + sum (s1 + s2 - 2 sqrt(s1 s2))
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 9.0])
    assert M.frechet_distance([0, 0], s1, [1, 0], s2) == pytest.approx(1 + (1 + 4 - 4) + (4 + 9 - 12), abs=1e-9)
    # the low-rank route (fewer samples than dimensions) is the same number
    f1, f2 = torch.randn(20, 64, generator=g), 0.5 + 2 * torch.randn(30, 64, generator=g)
    st = [(f.double().mean(0).numpy(), np.cov(f.double().numpy(), rowvar=False)) for f in (f1, f2)]
    assert M.frechet_distance_low_rank(f1, f2) == pytest.approx(M.frechet_distance(*st[0], *st[1]), rel=1e-6)
    logits_same = torch.zeros(20, 1008)
    confident = torch.full((20, 1008), -30.0)
    confident[torch.arange(20), torch.arange(20) % 4] = 30.0
    base = {"2048": a, "logits_unbiased": logits_same}
    ref = {"2048": b}
    near = M.score(base, ref, ["fid", "kid", "prc", "is"], kid_subset_size=100, kid_subsets=10, isc_splits=2)
    far = M.score({"2048": a + 3.0, "logits_unbiased": confident}, ref, ["fid", "kid", "isc"],
                  kid_subset_size=100, kid_subsets=10, isc_splits=1)
    assert near["fid"] < 0.5 < 50 < far["fid"]
    assert abs(near["kid"]) < 0.05 < far["kid"]
    assert near["is"] == pytest.approx(1.0) and far["is"] == pytest.approx(4.0, rel=1e-6)
    assert near["precision"] > 0.8 and near["recall"] > 0.8
    # tiny sets shrink the KID subset / PR neighbourhood instead of failing
    small = M.score({"2048": a[:3], "logits_unbiased": logits_same[:3]}, ref, ["kid", "prc", "is"])
    assert small["kid_subset_size"] == 3 and small["prc_neighborhood"] == 2 and small["is_splits"] == 3
    # statistics-only reference: FID only; no reference: unary metrics only
    st = M.score(base, {"mu": b.double().mean(0).numpy(), "sigma": np.cov(b.double().numpy(), rowvar=False)},
                 ["fid", "kid"])
    assert st["fid"] == pytest.approx(near["fid"], rel=1e-6) and st["kid"] is None
    assert M.score(base, None, ["fid", "is"])["fid"] is None
    with pytest.raises(ValueError, match="evaluate.metrics: unknown metric 'fdi'"):
        M.normalise_metrics(["fid", "fdi"])


def test_inception_pipeline_with_local_random_weights(tmp_path, monkeypatch):
    weights = M.save_random_inception_weights(tmp_path / "inception.pt", seed=0)
    # a reference folder with one corrupt file; samples as a float tensor
    ref = tmp_path / "ref" / "cls"
    ref.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray((rng.random((40 + 10 * i, 48, 3)) * 255).astype(np.uint8)).save(ref / f"{i}.png")
    (ref / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    samples = torch.rand(2, 3, 32, 32) * 2 - 1
    out = tmp_path / "eval"
    res = M.evaluate_images(samples, out, reference=tmp_path / "ref", metrics=["fid", "is", "kid"],
                            inception_weights=weights, device="cpu", cache_dir=tmp_path / "cache",
                            progress=False)
    assert res["num_generated"] == 2 and res["num_reference"] == 2
    for key in ("fid", "is", "kid"):
        assert np.isfinite(res[key]), key
    assert M.check_adm_npz(res["npz"]) == (2, 32, 32, 3)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    # an ADM reference batch (arr_0) works as the reference; a set against itself has FID ~ 0
    self_ref = M.evaluate_images(samples, tmp_path / "eval2", reference=res["npz"], metrics=["fid"],
                                 inception_weights=weights, device="cpu", cache_dir=False, progress=False)
    assert abs(self_ref["fid"]) < 1e-6
    # a batch with statistics only gives them back (for FID alone)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    st = M.reference_features(tmp_path / "stats.npz", None, cache_dir=False)
    assert set(st) == {"mu", "sigma"} and st["sigma"].shape == (3, 3)
    # the reference comes from the cache the second time: no image is read or featurised
    monkeypatch.setattr(M, "extract_features", lambda *a, **k: pytest.fail("cache not used"))
    cached = M.reference_features(tmp_path / "ref", None, size=32, weights=weights,
                                  cache_dir=tmp_path / "cache")
    assert cached["2048"].shape == (2, 2048) and cached["logits_unbiased"].shape == (2, 1008)
    monkeypatch.undo()
    # the network is loaded once per process (a comparison scores many rows) but a file rewritten
    # in place with other weights is loaded again: its scores change
    loads = []
    monkeypatch.setattr(M, "load_inception", lambda *a, _load=M.load_inception: loads.append(a) or _load(*a))
    again = M.evaluate_images(samples, tmp_path / "eval3", reference=tmp_path / "ref", metrics=["fid"],
                              inception_weights=weights, device="cpu", cache_dir=False, progress=False)
    assert loads == [] and again["fid"] == pytest.approx(res["fid"], rel=1e-6)
    M.save_random_inception_weights(weights, seed=1)
    other = M.evaluate_images(samples, tmp_path / "eval4", reference=tmp_path / "ref", metrics=["fid"],
                              inception_weights=weights, device="cpu", cache_dir=False, progress=False)
    assert len(loads) == 1 and other["fid"] != pytest.approx(res["fid"], rel=1e-3)


def test_inception_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate.inception_weights"):
        M.load_inception(tmp_path / "missing.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"x": Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match="not a plain state-dict file"):
        M.load_inception(bad)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="does not fit"):
        M.load_inception(tmp_path / "wrong.pt")
    with pytest.raises(FileNotFoundError, match="evaluate.reference"):
        M.reference_features(tmp_path / "nope", extractor=None)
    (tmp_path / "notzip.npz").write_bytes(b"hello")
    with pytest.raises(ValueError, match="not an .npz"):
        M.reference_features(tmp_path / "notzip.npz", extractor=None)
    assert zipfile.is_zipfile(tmp_path / "notzip.npz") is False
