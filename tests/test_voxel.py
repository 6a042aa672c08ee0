"""Voxel task: exact voxelisation and its fallbacks, the sharded cache (corrupt files, resume,
two processes), training and sampling a DC-DiT on the grid, mesh writing, and the shape metrics."""
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import trimesh

from dcgen.cli import compose
from dcgen.tasks.voxel import VoxelTask
from dcgen.tasks.voxel.data import (load_mesh, normalise_mesh, occupancy_to_mesh, voxel_centres,
                                    voxelize)
from dcgen.tasks.voxel.metrics import (compression_by_region, model_region_compression,
                                       shape_metrics)
from dcgen.shards import shard_name

PY = sys.executable
CLASSES = ("box", "cylinder", "sphere")  # sorted: labels 0, 1, 2
CORRUPT = ("sphere/broken.ply", "box/parts/garbage.stl")




def primitive(kind: str, rng: np.random.Generator) -> trimesh.Trimesh:
    """Closed primitives whose aspect ratios vary (normalisation removes a plain size change)."""
    a, b, c = rng.uniform(0.5, 1.0, 3)
    if kind == "box":
        return trimesh.creation.box((a, b, c))
    if kind == "cylinder":
        return trimesh.creation.cylinder(radius=a / 2, height=1.0 + b, sections=24)
    m = trimesh.creation.icosphere(3)
    m.apply_scale((1.0, 0.7 + 0.3 * b, 0.7 + 0.3 * c))  # ellipsoids
    return m


def write_meshes(root, per_class: int = 4, seed: int = 0) -> list[str]:
    """3 classes x `per_class` meshes as obj / ply / stl (plus one off and one glb, one in a
    nested folder) and two corrupt files; returns the relative paths of the good ones."""
    rng = np.random.default_rng(seed)
    formats = ["obj", "ply", "stl"]
    good = []
    for kind in CLASSES:
        for i in range(per_class):
            fmt = formats[i % 3]
            if kind == "box" and i == 0:
                fmt = "off"
            if kind == "cylinder" and i == 1:
                fmt = "glb"
            sub = "nested/deeper/" if i == per_class - 1 else ""
            rel = f"{kind}/{sub}{kind}_{i}.{fmt}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            primitive(kind, rng).export(str(root / rel))
            good.append(rel)
    bad = np.random.default_rng(99).bytes(4096)
    for rel in CORRUPT:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(bad)
    return good


@pytest.fixture(scope="module")
def mesh_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_meshes(root)
    return root


@pytest.fixture(scope="module")
def task16(mesh_root):
    task = VoxelTask(root=str(mesh_root), resolution=16, shard_size=5, progress=False)
    task.train_dataset()  # builds the cache on first use
    return task


# ------------------------------------------------------------------------------ voxelisation

def test_sphere_volume_matches_analytic_at_32():
    sphere = trimesh.creation.icosphere(4, radius=3.7)
    mesh, centre, scale = normalise_mesh(sphere)
    assert np.allclose(centre, 0, atol=1e-9)
    lo, hi = mesh.bounds
    assert abs((hi - lo).max() - (1 - 2 / 32)) < 1e-9 and (hi - lo).max() <= 1
    r = 3.7 * scale
    for R, tol in ((32, 0.03), (64, 0.01)):
        occ, method = voxelize(mesh, R)
        assert method == "exact" and occ.shape == (R, R, R)
        rel = occ.sum() / R ** 3 / (4 / 3 * np.pi * r ** 3) - 1
        assert abs(rel) < tol, (R, rel)
    # exact = "voxel centre inside the mesh": agrees with trimesh's point containment
    c = voxel_centres(32)
    pts = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)
    idx = np.random.default_rng(0).choice(len(pts), 300, replace=False)
    occ, _ = voxelize(mesh, 32)
    assert (mesh.contains(pts[idx]) == occ.reshape(-1)[idx]).all()


def test_exact_gives_union_of_interpenetrating_parts_and_fallbacks_are_documented():
    # two closed boxes that overlap: parity would carve the overlap, nonzero winding does not
    b1 = trimesh.creation.box((1, 1, 1))
    b2 = b1.copy()
    b2.apply_translation((0.5, 0.5, 0.5))
    two, _, s = normalise_mesh(trimesh.util.concatenate([b1, b2]))
    occ, method = voxelize(two, 32)
    union = (2 - 0.125) * s ** 3 * 32 ** 3
    assert method == "exact" and abs(occ.sum() / union - 1) < 0.03
    # a sphere with a hole (not watertight): parity along three axes with a vote recovers it
    sphere, _, _ = normalise_mesh(trimesh.creation.icosphere(4))
    ref, _ = voxelize(sphere, 32, "exact")
    holed = sphere.copy()
    holed.update_faces(np.arange(len(holed.faces)) >= 20)
    assert not holed.is_watertight
    occ, method = voxelize(holed, 32)
    assert method == "vote" and (occ != ref).sum() <= 0.001 * ref.sum()
    # an open box (a cup of zero-thickness walls): parity disagrees across axes -> fill, walls kept
    box = trimesh.creation.box((1, 1, 1))
    box.update_faces(box.face_normals[:, 2] < 0.5)
    cup, _, _ = normalise_mesh(box)
    occ, method = voxelize(cup, 32)
    assert method == "fill" and 0 < occ.sum() < 0.3 * 30 ** 3
    assert not occ[16, 16, 10:20].any() and occ[1, 16, 16] and occ[16, 16, 1]  # hollow, walls
    # fill on a closed sphere stays close to exact (the band is trimmed by ray crossings)
    occ, _ = voxelize(sphere.copy(), 32, "fill")
    assert (occ != ref).sum() <= 0.02 * ref.sum()


# ------------------------------------------------------------------------------ cache

def test_prepare_caches_reports_corrupt_and_resumes(tmp_path, caplog):
    root = tmp_path / "shapes"
    good = write_meshes(root, per_class=3)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="dcgen.prepare"):
        from dcgen.cli import run
        index = run("prepare", ["task=voxel", f"task.root={root}", f"task.cache_dir={cache}",
                                "task.resolution=16", "task.shard_size=4", "task.progress=false"])
    # reported by name, skipped with a count
    assert index["num_skipped"] == 2 and index["num_rows"] == len(good) == 9
    assert sorted(s["name"] for s in index["skipped"]) == sorted(CORRUPT)
    for rel in CORRUPT:
        assert rel.split("/")[-1] in caplog.text
    assert "skipped 2 of 11" in caplog.text
    assert index["classes"] == list(CLASSES) and index["methods"] == {"exact": 9}
    assert len(index["shards"]) == 3 and all((cache / shard_name(k) / "meta.json").is_file()
                                             for k in range(3))
    occupancy = np.load(cache / shard_name(0) / "occupancy.npy", mmap_mode="r")
    assert occupancy.dtype == np.uint8 and occupancy.shape[1] == 16 ** 3 // 8
    assert np.load(cache / shard_name(0) / "method.npy").tolist() == [0] * occupancy.shape[0]  # exact

    task = VoxelTask(root=str(root), cache_dir=str(cache), resolution=16, progress=False)
    ds = task.train_dataset()
    assert task.paths[0] == "box/box_0.off"  # source paths travel with the grids
    assert len(ds) == 9 and task.num_classes == 3 and task.grid == (16, 16, 16)
    x, y = ds[0]
    assert x.shape == (1, 16, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(x.unique().tolist()) == {-1.0, 1.0}
    labels = [int(ds[i][1]) for i in range(len(ds))]
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert task.paths[3].startswith("cylinder/")

    # resume: complete shards are kept; a new file re-encodes only the shard whose list changed
    mtimes = {k: os.stat(cache / shard_name(k) / "meta.json").st_mtime_ns for k in range(3)}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dcgen.prepare"):
        task.prepare()
    assert "0 of 3 shard(s) to encode" in caplog.text
    assert all(os.stat(cache / shard_name(k) / "meta.json").st_mtime_ns == mtimes[k] for k in range(3))
    primitive("sphere", np.random.default_rng(5)).export(str(root / "sphere" / "zz_new.obj"))
    index = task.prepare()
    assert index["num_rows"] == 10
    assert [os.stat(cache / shard_name(k) / "meta.json").st_mtime_ns == mtimes[k] for k in range(3)] == \
        [True, True, False]
    # a cache made with other settings is refused, not overwritten
    with pytest.raises(ValueError, match="resolution"):
        VoxelTask(root=str(root), cache_dir=str(cache), resolution=32).train_dataset()
    # unconditional
    task0 = VoxelTask(root=str(root), cache_dir=str(cache), resolution=16, num_classes=0)
    assert task0.num_classes == 0 and int(task0.train_dataset()[9][1]) == 0
    # the data folder gone (e.g. sampling elsewhere): the finished cache is enough
    moved = VoxelTask(root=str(tmp_path / "gone"), cache_dir=str(cache), resolution=16)
    assert moved.num_classes == 3 and len(moved.train_dataset()) == 10


def test_prepare_splits_shards_across_processes(tmp_path, mesh_root):
    """A 2-process run (2 threads sharing a gather, test_shards.ThreadWorld): each rank encodes
    only its shards, both get the index over all of them; the result equals a 1-process run."""
    from test_shards import ThreadWorld

    from dcgen.tasks.voxel.prepare import prepare_cache
    results, errors = ThreadWorld(2).run(
        lambda procs: prepare_cache(mesh_root, tmp_path / "two", 16, shard_size=3, progress=False,
                                    processes=procs))
    assert errors == [None, None]
    written = {k: json.loads((tmp_path / "two" / shard_name(k) / "meta.json").read_text())["written"]["rank"]
               for k in range(5)}
    assert written == {0: 0, 1: 1, 2: 0, 3: 1, 4: 0}
    index = results[0]
    assert results[1] == index and index["num_rows"] == 12 and index["num_skipped"] == 2
    one = VoxelTask(root=str(mesh_root), cache_dir=str(tmp_path / "one"), resolution=16,
                    shard_size=3, progress=False).train_dataset()
    two = VoxelTask(cache_dir=str(tmp_path / "two"), resolution=16).train_dataset()  # no root
    assert np.array_equal(one.packed, two.packed) and torch.equal(one.labels, two.labels)


@pytest.mark.slow
def test_prepare_two_processes_write_their_own_shards(tmp_path, mesh_root):
    script = tmp_path / "prep.py"
    script.write_text(textwrap.dedent("""
        import sys
        from dcgen.cli import run
        run("prepare", ["task=voxel", "task.root=" + sys.argv[1], "task.cache_dir=" + sys.argv[2],
                        "task.resolution=16", "task.shard_size=3", "task.progress=false"])
    """))
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = tmp_path / "two"
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={port}", str(script), str(mesh_root), str(two)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    index = json.loads((two / "index.json").read_text())
    assert index["num_rows"] == 12 and index["num_skipped"] == 2 and len(index["shards"]) == 5
    one = VoxelTask(root=str(mesh_root), cache_dir=str(tmp_path / "one"), resolution=16,
                    shard_size=3, progress=False)
    one_ds = one.train_dataset()
    two_ds = VoxelTask(cache_dir=str(two), resolution=16).train_dataset()  # no root needed
    assert np.array_equal(one_ds.packed, two_ds.packed)
    assert torch.equal(one_ds.labels, two_ds.labels)


# ------------------------------------------------------------------------------ train / sample

def test_train_sample_and_write_meshes(tmp_path, mesh_root, task16):
    from hydra.utils import instantiate

    from dcgen.sample import generate
    from dcgen.train import train
    cfg = compose("train", ["task=voxel", f"task.root={mesh_root}", "task.resolution=16",
                            "task.shard_size=5", "task.progress=false", "model=dcdit_debug",
                            "model.patch_size=2", "train.max_steps=2", "train.global_batch_size=4",
                            "train.ckpt_every=0", "train.sample_every=0", "train.log_every=1",
                            "dc.ratio_group_size=4", "train.ema_decay=0.9",
                            f"run_dir={tmp_path / 'run'}"])
    _, model, ema = train(cfg, return_model=True)
    assert model.token_grid == (8, 8, 8)  # 16^3 voxels at patch 2
    task = instantiate(cfg.task, _convert_="all")
    obj = instantiate(cfg.objective, _convert_="all")
    res = generate(ema, obj, task, num_samples=2, steps=3, seed=1)
    assert res["samples"].shape == (2, 1, 16, 16, 16) and torch.isfinite(res["samples"]).all()
    files = task.write_samples(task.decode(res["samples"]), tmp_path / "gen", labels=res["labels"])
    assert (tmp_path / "gen" / "samples.npy").is_file()
    assert (tmp_path / "gen" / "samples.png").is_file()
    for p in files:  # whatever a random tiny model made, what was written loads back
        if p.suffix in (".obj", ".glb", ".ply"):
            assert len(trimesh.load(str(p), force="mesh").vertices) > 0

    # compression by region on real shapes, through the model's own aux
    x0 = torch.stack([task16.train_dataset()[i][0] for i in range(4)])
    stats = model_region_compression(ema, obj, x0, torch.tensor([0, 0, 1, 2]),
                                     t=torch.tensor([10, 200, 500, 900]))
    assert 0 < stats["kept_fraction_all"] <= 1 and 0 < stats["cells_empty"] < 1
    assert {"kept_fraction_empty", "kept_fraction_occupied", "compression_empty"} <= set(stats)


def test_write_samples_meshes_load_back_with_the_right_volume(tmp_path, task16):
    ds = task16.train_dataset()
    x = torch.stack([ds[i][0] for i in range(0, len(ds), 4)])  # one of each class, and more
    x = torch.cat([x, -torch.ones(1, 1, 16, 16, 16)])  # an empty sample: skipped, said so
    files = task16.write_samples(x, tmp_path, labels=torch.arange(len(x)))
    n = len(x) - 1
    for fmt in ("obj", "glb", "ply"):
        written = sorted((tmp_path / "meshes").glob(f"*.{fmt}"))
        assert len(written) == n
        for i, p in enumerate(written):
            mesh = trimesh.load(str(p), force="mesh")
            assert len(mesh.vertices) > 0 and mesh.is_watertight
            voxels = float((x[i] > 0).sum()) / 16 ** 3
            assert abs(abs(mesh.volume) / voxels - 1) < 0.15, (p, mesh.volume, voxels)
    assert (tmp_path / "meshes" / "empty.txt").read_text().split() == [str(n)]
    assert tmp_path / "samples.png" in files and np.load(tmp_path / "samples.npy").shape == x.shape


# ------------------------------------------------------------------------------ metrics

def _ellipsoids(n, R, rng):
    c = voxel_centres(R)
    X, Y, Z = np.meshgrid(c, c, c, indexing="ij")
    out = []
    for _ in range(n):
        a = np.array([0.45, *rng.uniform(0.2, 0.45, 2)])[rng.permutation(3)]
        out.append((X / a[0]) ** 2 + (Y / a[1]) ** 2 + (Z / a[2]) ** 2 < 1)
    return np.stack(out)


def _boxes(n, R, rng):
    c = voxel_centres(R)
    X, Y, Z = np.meshgrid(c, c, c, indexing="ij")
    out = []
    for _ in range(n):
        a = np.array([0.45, *rng.uniform(0.2, 0.45, 2)])[rng.permutation(3)]
        out.append((abs(X) < a[0]) & (abs(Y) < a[1]) & (abs(Z) < a[2]))
    return np.stack(out)


def test_1nna_is_half_for_one_distribution_and_near_one_for_two():
    rng = np.random.default_rng(0)
    a, b, boxes = _ellipsoids(16, 24, rng), _ellipsoids(16, 24, rng), _boxes(16, 24, rng)
    same = shape_metrics(a, b, num_points=256)
    diff = shape_metrics(boxes, b, num_points=256)
    assert 0.3 <= same["1nna_cd"] <= 0.7, same
    assert diff["1nna_cd"] > 0.9, diff
    assert same["mmd_cd"] < diff["mmd_cd"] and same["cov_cd"] >= diff["cov_cd"]
    ident = shape_metrics(a, a, num_points=256)
    assert ident["iou_nearest_ref"] == 1.0 and ident["cov_cd"] == 1.0
    assert same["iou_nearest_ref"] > diff["iou_nearest_ref"]


def test_evaluate_against_cache_and_compression_by_region(tmp_path, task16):
    ds = task16.train_dataset()
    samples = torch.stack([ds[i][0] for i in range(len(ds))])
    samples = torch.cat([samples, -torch.ones(1, 1, 16, 16, 16)])  # one empty sample
    m = task16.evaluate(samples, tmp_path, num_points=256)
    assert m["num_empty"] == 1 and m["num_references"] == len(ds)
    # every sample is a reference: its nearest reference is itself (identical grids, identical
    # points), so coverage counts the distinct grids and IoU is 1 except for the empty sample
    n_distinct = len(np.unique(ds.packed, axis=0))
    assert m["cov_cd"] == pytest.approx(n_distinct / len(ds)) and m["mmd_cd"] < 1e-6
    assert m["iou_nearest_ref"] == pytest.approx(len(ds) / (len(ds) + 1))
    assert json.loads((tmp_path / "voxel_metrics.json").read_text())["num_samples"] == len(ds) + 1
    # a folder of meshes as the reference set (here the same folder: its cache is reused)
    m = task16.evaluate(samples[:3], None, reference=str(task16.root), num_points=64)
    assert m["num_references"] == len(ds) and m["iou_nearest_ref"] == 1.0

    # exact region split on a hand-made grid: 4^3 voxels, patch 2 -> 8 cells
    occ = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    occ[0, :2, :2, :2] = True          # cell 0 fully occupied
    occ[0, 2, 2, 2] = True             # cell 7 partly occupied
    mask = torch.tensor([[1, 0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)  # keeps cells 0, 6, 7
    s = compression_by_region(mask, occ, 2)
    assert s["kept_fraction_occupied"] == 1.0 and s["kept_fraction_empty"] == 1 / 6
    assert s["compression_empty"] == pytest.approx(6.0) and s["cells_occupied"] == 0.25
    assert s["kept_fraction_interior"] == 1.0 and s["kept_fraction_surface"] == 1.0


def test_config_and_errors(tmp_path, mesh_root):
    cfg = compose("train", ["task=voxel", f"task.root={mesh_root}", "model=dcdit_voxel"])
    assert cfg.task.resolution == 32 and cfg.task.num_classes is None
    assert cfg.model.patch_size == 2
    missing = VoxelTask(root=str(tmp_path / "no_such"))  # the constructor reads nothing
    with pytest.raises(FileNotFoundError, match="no_such"):
        missing.num_classes
    with pytest.raises(FileNotFoundError, match="no_such"):
        missing.train_dataset()
    with pytest.raises(ValueError, match="root"):
        VoxelTask()
    with pytest.raises(ValueError, match="num_classes"):
        VoxelTask(root=str(mesh_root), num_classes=2).num_classes
    with pytest.raises(ValueError, match="broken.ply"):
        load_mesh(mesh_root / "sphere" / "broken.ply")
    assert occupancy_to_mesh(np.zeros((8, 8, 8), bool)) is None


@pytest.mark.slow
def test_two_process_voxel_evaluation_gathers_nothing(tmp_path, mesh_root, task16):
    """Voxel samples (a task without numbered files) evaluated by 2 processes: each writes its
    chunks to disk and the main process reads them; a spy makes any gather_object fail."""
    import json
    import socket
    import subprocess
    import sys

    from test_scale import SPY
    from test_train import run_cli
    rd = tmp_path / "run"
    run_cli(["train", "task=voxel", f"task.root={mesh_root}", "task.resolution=16", "task.shard_size=5",
             "task.progress=false", "model=dcdit_debug", "model.patch_size=2", "train.max_steps=1",
             "train.global_batch_size=4", "train.sample_every=0", "dc.ratio_group_size=4", f"run_dir={rd}"])
    spy = tmp_path / "spy.py"
    spy.write_text(SPY)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ev"
    env = {k: v for k, v in __import__("os").environ.items() if k != "DCGEN_DEBUG"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={port}", str(spy), "evaluate", f"run_dir={rd}", "num_samples=4",
                        "batch_size=1", "steps=2", "+evaluate.num_points=64", f"out_dir={out}"],
                       capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_samples"] == 4 and m["processes"] == 2
    assert len(list((out / "chunks").glob("data_*.npy"))) == 4
