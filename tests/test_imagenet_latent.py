"""The paper setup end to end on a tiny scale: an ImageNet-layout folder (3 classes, one corrupt
file), a random tiny AutoencoderKL and a random Inception saved locally (no download).
2-process prepare (gloo) -> train -> sample -> 2-process evaluate (FID/IS/KID/PR, ADM .npz,
FLOPs, tokens, latency, memory); elastic inference; every experiment config."""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcgen.cli import compose, run

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
RES = 64  # 8x8 latents




def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DCGEN_DEBUG", None)
    p = subprocess.run([PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                        f"--master_port={_free_port()}", "-m", "dcgen", *args],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Images (3 classes x 4, mixed sizes and formats, plus one corrupt file), a tiny VAE and a
    random Inception, all written by the test."""
    from dcgen.codec import tiny_autoencoder_kl
    from dcgen.metrics import save_random_inception_weights
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for c in range(3):
        d = root / "train" / f"n0{c}"
        d.mkdir(parents=True)
        for i in range(4):
            h, w = rng.integers(56, 150, 2)
            a = np.clip(rng.normal(60 + 60 * c, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"img{i}.{'png' if i % 2 else 'JPEG'}")
    (root / "train" / "n01" / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    tiny_autoencoder_kl(seed=0).save_pretrained(root / "vae")
    save_random_inception_weights(root / "inception.pt")
    task = ["task=imagenet_latent", f"task.cache_dir={root / 'cache'}", f"task.resolution={RES}",
            "task.num_classes=3", f"task.vae={root / 'vae'}"]
    prep = [*task, f"task.source.image_dir={root / 'train'}", "task.encode.shard_size=3",
            "task.encode.batch_size=2", "task.encode.num_workers=0", "task.encode.progress=false"]
    return {"root": root, "task": task, "prepare": prep}


@pytest.fixture(scope="module")
def prepared(ws):
    p = torchrun(["prepare", *ws["prepare"], "seed=3"])
    return {**ws, "stderr": p.stderr}


def _shard(cache, s):
    d = cache / f"shard_{s:05d}"
    return {f: np.load(d / f"{f}.npy") for f in ("mean", "logvar", "latent", "flip", "label", "item")}


def test_prepare_two_processes_writes_disjoint_shards_and_resumes(prepared):
    cache = prepared["root"] / "cache"
    items = [line.split("\t") for line in (cache / "items.tsv").read_text().splitlines()]
    assert len(items) == 13  # sorted listing, the corrupt file included
    bad = next(i for i, (_, f) in enumerate(items) if f.endswith("broken.JPEG"))
    manifest = json.loads((cache / "manifest.json").read_text())
    settings = manifest["settings"]
    assert manifest["shard_size"] == 3 and settings["latent_size"] == RES // 8 and settings["seed"] == 3
    seen = []
    for s in range(5):
        meta = json.loads((cache / f"shard_{s:05d}" / "meta.json").read_text())
        assert meta["written"]["rank"] == s % 2  # shard s belongs to rank s mod world
        arr = _shard(cache, s)
        assert arr["mean"].shape == (meta["rows"], 2, 4, 8, 8) and arr["latent"].shape == (meta["rows"], 4, 8, 8)
        assert all(s * 3 <= i < (s + 1) * 3 for i in arr["item"])
        assert [int(items[i][0]) for i in arr["item"]] == arr["label"].tolist()
        seen += arr["item"].tolist()
    # every valid image exactly once, the corrupt one nowhere
    assert sorted(seen) == [i for i in range(13) if i != bad] and len(set(seen)) == 12
    summary = json.loads((cache / "index.json").read_text())
    assert summary["num_shards"] == 5 and summary["num_rows"] == 12 and summary["num_skipped"] == 1
    assert summary["skipped"][0]["name"].endswith("broken.JPEG")
    assert "broken.JPEG" in prepared["stderr"] and "1 corrupt image(s) skipped" in prepared["stderr"]
    # the baked latent is one posterior sample of the recorded flip
    arr = _shard(cache, 0)
    std = np.exp(0.5 * arr["logvar"][0, arr["flip"][0]])
    assert np.abs(arr["latent"][0] - arr["mean"][0, arr["flip"][0]]).max() < 6 * std.max() + 1e-6

    # resume after an interruption: shard 1 (written by rank 1) missing, a stale temp dir left;
    # one process re-encodes exactly that shard: same images, flips and labels; the same moments
    # up to float summation order (the torchrun processes ran with one thread each)
    before = _shard(cache, 1)
    mtime0 = (cache / "shard_00000" / "meta.json").stat().st_mtime_ns
    shutil.rmtree(cache / "shard_00001")
    (cache / ".shard_00001.tmp-dead").mkdir()
    run("prepare", [*prepared["prepare"], "seed=3"])
    after = _shard(cache, 1)
    for k in before:
        if before[k].dtype.kind == "f":
            assert np.allclose(before[k], after[k], atol=1e-5, rtol=1e-5), k
        else:
            assert np.array_equal(before[k], after[k]), k
    assert json.loads((cache / "shard_00001" / "meta.json").read_text())["written"]["rank"] == 0
    assert (cache / "shard_00000" / "meta.json").stat().st_mtime_ns == mtime0
    assert not list(cache.glob(".shard_*"))
    # resuming with other settings is refused, naming the setting
    with pytest.raises(ValueError, match="different 'seed'"):
        run("prepare", [*prepared["prepare"], "seed=4"])


def test_dataset_fixed_and_resample_draws(prepared):
    from hydra.utils import instantiate

    from dcgen.tasks.imagenet_latent.data import item_generator
    cache = prepared["root"] / "cache"
    task = instantiate(compose("train", prepared["task"]).task, _convert_="all")
    fixed = task.train_dataset()
    assert len(fixed) == 12 and task.grid == (8, 8) and task.channels == 4
    rows = [_shard(cache, s) for s in range(5)]
    latent = np.concatenate([r["latent"] for r in rows])
    x, y = fixed[5]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(latent[5]) * 0.18215)
    assert torch.equal(fixed[(5, 7)][0], x)  # fixed: the same every epoch

    res = instantiate(compose("train", [*prepared["task"], "task.data.latent_sampling=resample",
                                        "seed=11"]).task, _convert_="all").train_dataset()
    a, b = res[(4, 0)][0], res[(4, 0)][0]
    assert torch.equal(a, b) and torch.equal(res[4][0], a)  # a function of (seed, item, epoch)
    draws = torch.stack([res[(4, e)][0] for e in range(12)])
    assert len({tuple(d.flatten()[:4].tolist()) for d in draws}) == 12  # fresh every epoch
    # exactly the posterior sample of the flip drawn from (seed, item, epoch)
    mean = np.concatenate([r["mean"] for r in rows])[4]
    logvar = np.concatenate([r["logvar"] for r in rows])[4]
    item = int(np.concatenate([r["item"] for r in rows])[4])
    flips = set()
    for e in range(12):
        g = item_generator(11, "train", item, e)
        f = int(torch.randint(2, (), generator=g))
        flips.add(f)
        want = (torch.from_numpy(mean[f]) + torch.exp(0.5 * torch.from_numpy(logvar[f]))
                * torch.randn((4, 8, 8), generator=g)) * 0.18215
        assert torch.allclose(draws[e], want, atol=1e-6)
    assert flips == {0, 1}
    loader = torch.utils.data.DataLoader(res, batch_size=4, num_workers=0)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 4, 8, 8) and yb.tolist() == [int(res[i][1]) for i in range(4)]


def test_prepare_from_a_file_list(ws, tmp_path):
    root = ws["root"]
    lst = tmp_path / "train.txt"
    lst.write_text("n02/img1.png\tn02\nn00/img0.JPEG\tn00\nn01/broken.JPEG\tn01\n")
    cache = tmp_path / "cache"
    summary = run("prepare", [*ws["task"], f"task.cache_dir={cache}", f"task.source.image_dir={root / 'train'}",
                              f"task.source.file_list={lst}", "task.encode.num_workers=0",
                              "task.encode.progress=false"])
    assert summary["num_rows"] == 2 and summary["num_skipped"] == 1
    index = json.loads((cache / "index.json").read_text())
    assert index["classes"] == ["n00", "n01", "n02"] and index["num_shards"] == 1
    assert _shard(cache, 0)["label"].tolist() == [2, 0]  # the list's order, names -> sorted ids


def test_train_sample_evaluate_end_to_end(prepared, tmp_path):
    from dcgen.metrics import check_adm_npz
    from dcgen.sample import generate, load_run
    from dcgen.train import train
    root = prepared["root"]
    rd = tmp_path / "run"
    cfg = compose("train", [*prepared["task"], "task.data.latent_sampling=resample", "model=dcdit_debug",
                            "train.max_steps=3", "train.global_batch_size=4", "train.sample_every=0",
                            "train.ckpt_every=0", "train.log_every=1", "dc.ratio_group_size=4",
                            "dc.multi_budget_start_step=1", f"run_dir={rd}"])
    train(cfg)
    assert (rd / "export" / "model.safetensors").is_file()

    out = tmp_path / "samples"
    run("sample", [f"run_dir={rd}", "num_samples=2", "steps=3", f"out_dir={out}", "boundary_maps=1",
                   "tail_drop=0.3"])
    for name in ("images/000000.png", "images/000001.png", "samples.png"):
        with Image.open(out / name) as im:
            assert im.mode == "RGB" and (name == "samples.png" or im.size == (RES, RES))
    assert (out / "boundary_map_00.png").is_file() and (out / "kept_fraction_vs_t.png").is_file()

    ev = tmp_path / "eval"
    torchrun(["evaluate", f"run_dir={rd}", "num_samples=3", "steps=2", "batch_size=2", "seed=3",
              f"out_dir={ev}", f"evaluate.reference={root / 'train' / 'n01'}",
              f"evaluate.inception_weights={root / 'inception.pt'}", "evaluate.num_workers=0",
              f"evaluate.cache_dir={tmp_path / 'refcache'}"])
    m = json.loads((ev / "metrics.json").read_text())
    for key in ("fid", "is", "kid", "precision", "recall"):
        assert m[key] is not None and np.isfinite(m[key]), key
    assert m["num_samples"] == m["num_generated"] == 3 and m["num_reference"] == 4  # broken file skipped
    assert m["processes"] == 2 and m["protocol"]["chunks"] == 2 and m["protocol"]["steps"] == 2
    assert m["tflops_per_image"] > 0 and m["gflops_per_forward"] > 0
    assert m["tflops_per_image_reference_counter"] < m["tflops_per_image"]  # residual_proj omitted (Q7)
    assert 1 <= m["tokens_kept_mean"] <= 64 and m["tokens_grid"] == 64
    assert m["latency_per_image_s"] > 0 and m["peak_memory_bytes"] > 0 and len(m["per_step"]["t"]) == 2
    # the ADM file: arr_0, uint8, NHWC RGB, equal to the PNGs
    npz = ev / f"samples_3x{RES}x{RES}x3.npz"
    assert check_adm_npz(npz) == (3, RES, RES, 3) and m["npz"] == str(npz)
    with np.load(npz) as z:
        assert list(z.keys()) == ["arr_0"]
        arr = z["arr_0"]
    pngs = [np.asarray(Image.open(ev / "images" / f"{i:06d}.png")) for i in range(3)]
    assert all(np.array_equal(arr[i], pngs[i]) for i in range(3))
    labels = np.load(ev / "labels.npy")
    assert labels.shape == (3,) and labels.max() < 3
    # chunk 1 (sample 2, written by rank 1) is a batch seeded by (seed, chunk) with the labels the
    # evaluation drew from the seed alone: the same image from one process
    from dcgen.evaluate import chunk_seed, eval_labels
    assert labels.tolist() == eval_labels(3, 3, 3, False).tolist()
    model, objective, task, _ = load_run(rd, "cpu")
    r1 = generate(model, objective, task, num_samples=1, steps=2, seed=chunk_seed(3, 1), record=False,
                  labels=[int(labels[2])])
    img = np.clip(127.5 * task.decode(r1["samples"])[0].numpy() + 128, 0, 255).astype(np.uint8)
    assert np.abs(img.transpose(1, 2, 0).astype(int) - pngs[2].astype(int)).max() <= 1


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_elastic_inference_flops_and_tokens(ws, tmp_path):
    from dcgen.evaluate import cost_summary, dc_step_recorder
    from dcgen.io import export_model
    from dcgen.models import DCDiT
    from dcgen.sample import generate
    torch.manual_seed(0)
    model = DCDiT(input_size=(8, 8), in_channels=4, num_classes=3, hidden_size=64, depth=2, num_heads=4,
                  norm_groups=8).eval()
    with torch.no_grad():  # an untrained router keeps ~2 tokens; lift p so many are boundaries
        model.router.residual_scorer[3].bias.fill_(0.3)
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([10, 300, 600, 900]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        for rho in (0.0, 0.15, 0.4, 0.75, 0.9):
            aux = model(x, t, y, tail_drop=rho)[1][0]
            n = aux.natural_counts
            forced = aux.boundary_mask[:, [0, 63]].sum(1)
            drop = torch.minimum(torch.floor(torch.tensor(rho, dtype=torch.float32) * n.float()).long(), n - forced)
            assert torch.equal(aux.kept_counts, n - drop), rho  # floor(rho * n) removed per sample
    assert int(n.min()) > 8  # the check above removed tokens

    from omegaconf import OmegaConf
    task_cfg = OmegaConf.to_container(compose("train", ws["task"]).task, resolve=True)
    export_model(model, tmp_path / "export",
                 extra={"task": task_cfg, "objective": {"_target_": "dcgen.diffusion.GaussianDiffusion"}})

    # FLOPs along the trajectory fall monotonically with rho, also under Lite-CFG
    from hydra.utils import instantiate
    task = instantiate(OmegaConf.create(task_cfg), _convert_="all")
    from dcgen.diffusion import GaussianDiffusion
    flops = []
    for rho in (0.0, 0.2, 0.5, 0.8):
        res = generate(model, GaussianDiffusion(), task, num_samples=2, steps=3, tail_drop=rho, seed=0,
                       flop_fn=dc_step_recorder(model, 1), map_samples=0)
        flops.append(cost_summary(model, res, 1)["per_image"][:, 0].mean())
    assert all(b < a for a, b in zip(flops, flops[1:])), flops
    lite = generate(model, GaussianDiffusion(), task, num_samples=2, steps=3, cfg_scale=1.25, tail_drop=0.0,
                    tail_drop_uncond=0.9, seed=0, flop_fn=dc_step_recorder(model, 2), map_samples=0)
    c = cost_summary(model, lite, 2)["per_image"]
    assert (c[:, 4] < c[:, 3]).all() and (c[:, 0] < 2 * c[:, 1]).all()  # pruned unconditional branch

    # `dcgen elastic` (quality against FLOPs) and the boundary maps over timesteps
    from dcgen.cli import main
    out = tmp_path / "elastic"
    assert main(["elastic", f"run_dir={tmp_path / 'export'}", "budgets=[0,0.6]", f"out_dir={out}",
                 "evaluate_overrides=['num_samples=2','steps=2','evaluate.metrics=[]','evaluate.npz=false']"]) == 0
    rows = json.loads((out / "elastic_table.json").read_text())["rows"]
    assert [r["tail_drop"] for r in rows] == [0.0, 0.6]
    assert rows[0]["tflops_per_image"] > rows[1]["tflops_per_image"] and rows[1]["tflops_change"] < 0
    assert rows[0]["tokens_kept_mean"] > rows[1]["tokens_kept_mean"]
    assert "| ρ |" in (out / "elastic_table.md").read_text()
    maps = _load_tool("boundary_maps")  # the driver of dcgen.analysis.boundary_maps
    mo = tmp_path / "maps"
    assert maps.main(["--run-dir", str(tmp_path / "export"), "--out", str(mo), "--num-samples", "1",
                      "--steps", "3", "--timesteps", "3", "--tail-drop", "0", "0.5", "--labels", "2"]) == 0
    summary = json.loads((mo / "summary.json").read_text())
    assert set(summary["budgets"]) == {"0", "0.5"}
    assert (mo / "rho0.50" / "boundary_map_00.png").is_file() and (mo / "kept_fraction_vs_t_budgets.png").is_file()


EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")
                     if not p.stem.startswith(("digits_", "glyphs_", "voxels_")))  # the ImageNet rows
DIGITS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("digits_*.yaml"))
GLYPHS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("glyphs_*.yaml"))


def test_digits_experiments_build_on_the_pixel_task():
    from hydra.utils import instantiate

    from dcgen.train import build_model
    assert len(DIGITS) == 10 and len(GLYPHS) == 5
    for name in DIGITS + GLYPHS:
        cfg = compose("train", [f"experiment={name}"])
        task = instantiate(cfg.task, _convert_="all")
        assert task.name == "pixel" and cfg.train.max_steps == 3000, name
        assert task.source == name.split("_")[0], name  # digits_* on the digits, glyphs_* on the glyphs
        model = build_model(cfg, task)
        assert type(model).__name__ == ("DiT" if "dit" in name.split("_")[1] and "dcdit" not in name
                                        else "DCDiT"), name


def test_every_experiment_config_builds():
    from hydra.utils import instantiate

    from dcgen.train import build_model
    assert len(EXPERIMENTS) >= 25
    for name in EXPERIMENTS:
        cfg = compose("train", [f"experiment={name}"])
        t = cfg.train
        # mixed precision unset: the launcher's, else bf16 where the GPU runs it natively
        assert (cfg.optim.lr, t.global_batch_size, t.ema_decay, t.grad_clip, t.mixed_precision) == \
            (1e-4, 256, 0.9999, 1.0, None), name
        task = instantiate(cfg.task, _convert_="all")
        assert task.name == "imagenet_latent" and task.num_classes == 1000
        with torch.device("meta"):
            model = build_model(cfg, task)
        side = 64 if name.endswith("512") else 32
        assert tuple(task.grid) == (side, side), name
        if name.startswith(("dcdit", "ablation")):
            assert model.dechunk.sigma in ((1.0, 1.0), 2.0) or model.dechunk.sigma == (side / 32,) * 2, name
            if side == 64:
                assert model.dechunk.sigma == 2.0
            assert t.max_steps in (400000, 421230, 408071, 486372, 494943, 432097, 495365, 55000), name
            assert cfg.dc.target_n == (16.0 if "n16" in name else 4.0)
        else:
            assert t.max_steps == 400000 and type(model).__name__ == "DiT"
    b = compose("train", ["experiment=dcdit_b_256"])
    with torch.device("meta"):
        m = build_model(b, instantiate(b.task, _convert_="all"))
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(136.34e6, rel=2e-3)  # METHOD §7.2
    up = compose("train", ["experiment=dcdit_xl_256_upcycle"])
    assert up.model.cond_adaptor and up.model.pe_coord_scale == 0.5 and up.init.distill_steps == 5000
    assert up.init.from_dit and up.model.hidden_size == 1152
    assert compose("train", ["experiment=ablation_dcdit_s_no_multibudget"]).dc.multi_budget is False


def test_task_errors_and_file_list(tmp_path, capsys):
    from hydra.utils import instantiate

    from dcgen.cli import main
    from dcgen.tasks.imagenet_latent.data import read_file_list
    task = instantiate(compose("train", ["task=imagenet_latent", f"task.cache_dir={tmp_path / 'none'}"]).task,
                       _convert_="all")
    with pytest.raises(FileNotFoundError, match="no latent cache at .*dcgen prepare"):
        task.train_dataset()
    assert main(["train", "task=imagenet_latent", "+task.data.flip=true", f"run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'task.data.flip'" in err[0]
    with pytest.raises(ValueError, match="needs task.source.image_dir .* or task.source.file_list"):
        run("prepare", ["task=imagenet_latent", f"task.cache_dir={tmp_path / 'c'}"])
    with pytest.raises(Exception, match="task.data.latent_sampling must be one of"):
        instantiate(compose("train", ["task=imagenet_latent", "task.data.latent_sampling=random"]).task)
    lst = tmp_path / "list.txt"
    lst.write_text("a/x 1.jpg\t2\n# comment\nb/y.png 0\n\nc/z.JPEG\n")
    with pytest.raises(ValueError, match="mix integer ids and class names"):
        read_file_list(lst)
    lst.write_text("a/x 1.jpg\t2\nb/y.png 0\n")
    items, classes = read_file_list(lst, root="/data")
    assert items == [("/data/a/x 1.jpg", 2), ("/data/b/y.png", 0)] and classes == ["0", "1", "2"]
    lst.write_text("cat/1.jpg\ndog/2.jpg\ncat/3.jpg\n")
    items, classes = read_file_list(lst)
    assert classes == ["cat", "dog"] and [lbl for _, lbl in items] == [0, 1, 0]


def test_evaluate_gathers_samples_of_other_tasks_and_counts_dit_flops(tmp_path):
    """A task whose write_samples takes no start_index (toy) gets every sample at once; a DiT
    costs its analytic forward at every step, twice under CFG."""
    from dcgen.flops import model_flops
    from dcgen.io import load_model
    from dcgen.train import train
    rd = tmp_path / "run"
    train(compose("train", ["task=toy", "task.grid=[8,8]", "task.num_samples=16", "model=dit_debug",
                            "train.max_steps=1", "train.global_batch_size=4", "train.sample_every=0",
                            "train.ckpt_every=0", f"run_dir={rd}"]))
    ev = run("evaluate", [f"run_dir={rd}", "num_samples=3", "steps=2", "cfg_scale=1.5", f"out_dir={tmp_path / 'ev'}",
                          "+evaluate.num_reference=8"])
    m = json.loads((ev / "metrics.json").read_text())
    assert m["num_samples"] == 3 and "abs_mean_diff" in m  # the toy task's own statistics
    assert (ev / "samples.png").is_file() and np.load(ev / "labels.npy").shape == (3,)
    macs = model_flops(load_model(rd), batch=1)["total"]
    assert m["gflops_per_forward"] == pytest.approx(macs / 1e9)
    assert m["tflops_per_image"] == pytest.approx(2 * 2 * 2 * macs / 1e12)  # 2 steps x 2 branches
    assert m["tokens_kept_mean"] == m["tokens_grid"] == 16 and m["protocol"]["cfg_branches"] == 2


def test_bf16_vae_moments_lie_within_the_posterior_noise(ws):
    """prepare's default on CUDA encodes in bf16: its posterior means differ from fp32's by a
    small fraction of the posterior's own std (here a tiny random VAE on the CPU; the SD-VAE
    check belongs on a GPU)."""
    from dcgen.codec import VAECodec
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    m32, l32 = VAECodec(ws["root"] / "vae", dtype=torch.float32).encode_moments(x)
    m16, _ = VAECodec(ws["root"] / "vae", dtype=torch.bfloat16).encode_moments(x)
    rel = (m16 - m32).abs() / torch.exp(0.5 * l32)
    assert rel.max() < 0.1 and rel.mean() < 0.01, (rel.max(), rel.mean())


def test_channel_normalisation_from_the_caches_measured_statistics(prepared):
    """`dcgen prepare` measures per-channel mean/std of the stored latents into the index;
    task.latent_norm=channel trains on latents with mean 0 and std 1 per channel, and decodes
    through the same statistics."""
    from hydra.utils import instantiate
    from dcgen.codec import VAECodec
    from dcgen.tasks.imagenet_latent.data import LatentCache
    index = LatentCache(prepared["root"] / "cache", fields=("latent",)).index
    assert len(index["latent_mean"]) == len(index["latent_std"]) == 4
    task = instantiate(compose("train", [*prepared["task"], "task.latent_norm=channel"]).task, _convert_="all")
    ds = task.train_dataset()
    x = torch.stack([ds[i][0] for i in range(len(ds))])  # (N, C, h, w)
    per = x.transpose(0, 1).reshape(4, -1).double()
    assert torch.allclose(per.mean(1), torch.zeros(4, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(per.std(1), torch.ones(4, dtype=torch.float64), atol=1e-3)
    plain = instantiate(compose("train", prepared["task"]).task, _convert_="all")
    raw = plain.train_dataset()[0][0] / plain.latent_scale
    vae = VAECodec(prepared["root"] / "vae", scale=1.0)
    assert torch.allclose(task.decode(x[:1]), vae.decode(raw[None]), atol=1e-4)


def test_a_channel_normalised_export_decodes_without_the_cache_and_through_the_pipeline(prepared, tmp_path):
    """latent_norm=channel: the export records the statistics the model trained with, so that
    the run decodes with the cache gone, the diffusers pipeline (and its saved folder) decodes
    exactly as the task does, and a cache prepared again with other statistics is refused."""
    from hydra.utils import instantiate
    from dcgen.io import load_run, read_export_config, resolve_export_dir
    from dcgen.pipeline import DCDiTPipeline
    from dcgen.tasks.imagenet_latent.data import LatentCache
    from dcgen.train import train
    from dcgen.validate import ConfigError
    cache = tmp_path / "cache"
    shutil.copytree(prepared["root"] / "cache", cache)
    task_args = [a for a in prepared["task"] if not a.startswith("task.cache_dir=")]
    task_args += [f"task.cache_dir={cache}", "task.latent_norm=channel"]
    rd = tmp_path / "run"
    train(compose("train", [*task_args, "model=dcdit_debug", "train.max_steps=1", "train.global_batch_size=4",
                            "train.sample_every=0", "train.ckpt_every=0", "train.log_with=none",
                            "dc.ratio_group_size=4", f"run_dir={rd}"]))
    index = LatentCache(cache, fields=("label",)).index
    node = read_export_config(rd)["task"]
    assert node["latent_mean"] == pytest.approx(index["latent_mean"], abs=1e-12)
    assert node["latent_std"] == pytest.approx(index["latent_std"], abs=1e-12)
    x = torch.randn(2, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    want = load_run(rd, "cpu")[2].decode(x)
    pipe = DCDiTPipeline.from_dcgen(rd, vae=prepared["root"] / "vae")
    assert torch.allclose(pipe.decode_latents(x), want, atol=1e-5)
    pipe.save_pretrained(tmp_path / "pipe")
    assert torch.allclose(DCDiTPipeline.from_pretrained(tmp_path / "pipe").decode_latents(x), want, atol=1e-5)
    shutil.rmtree(cache)  # the export alone decodes
    assert torch.allclose(load_run(rd, "cpu")[2].decode(x), want, atol=1e-6)
    # the export's statistics against a cache that measured others: refused for training
    shifted = {**node, "cache_dir": str(prepared["root"] / "cache"),
               "latent_mean": [v + 0.5 for v in node["latent_mean"]]}
    with pytest.raises(ValueError, match="was the cache prepared again"):
        instantiate(shifted, _convert_="all").train_dataset()
    instantiate({**shifted, "latent_mean": node["latent_mean"]}, _convert_="all").train_dataset()  # agree
    # an export that does not record them: the pipeline refuses rather than decode wrongly
    old = tmp_path / "old_export"
    shutil.copytree(resolve_export_dir(rd), old)
    extra = json.loads((old / "dcgen.json").read_text())
    del extra["task"]["latent_mean"], extra["task"]["latent_std"]
    (old / "dcgen.json").write_text(json.dumps(extra))
    with pytest.raises(ConfigError, match="does not record the statistics"):
        DCDiTPipeline.from_dcgen(old, vae=prepared["root"] / "vae")


def test_dc_ae_codec_prepare_train_sample_evaluate(ws, tmp_path):
    """The second codec class end to end: a tiny random AutoencoderDC (4x, 8 channels) saved
    locally, chosen by its config.json (vae_kind=auto) and by vae_kind=dc; per-channel statistics
    from prepare; train, sample and evaluate decode through it. A KL kind on a DC folder and a
    wrong downsampling are refused."""
    from dcgen.codec import tiny_autoencoder_dc
    from dcgen.metrics import check_adm_npz
    from dcgen.train import train
    root = ws["root"]
    tiny_autoencoder_dc(seed=0).save_pretrained(tmp_path / "dcae")
    task = ["task=imagenet_latent", f"task.cache_dir={tmp_path / 'cache'}", f"task.resolution={RES}",
            "task.num_classes=3", f"task.vae={tmp_path / 'dcae'}", "task.latent_channels=8",
            "task.vae_downsample=4", "task.latent_norm=channel"]
    prep = [f"task.source.image_dir={root / 'train'}", "task.encode.batch_size=2", "task.encode.num_workers=0",
            "task.encode.progress=false"]
    with pytest.raises(ValueError, match="vae_downsample=8 but the VAE .* downsamples 4x"):
        run("prepare", [*task, "task.vae_downsample=8", "task.resolution=64", *prep])
    with pytest.raises(ValueError, match="AutoencoderDC"):
        run("prepare", [*task, "task.vae_kind=kl", *prep])
    summary = run("prepare", [*task, "task.vae_kind=dc", *prep])
    assert summary["num_rows"] == 12
    rd = tmp_path / "run"
    train(compose("train", [*task, "model=dcdit_debug", "train.max_steps=2", "train.global_batch_size=4",
                            "train.sample_every=0", "train.ckpt_every=0", "train.log_with=none",
                            "dc.ratio_group_size=4", f"run_dir={rd}"]))
    out = tmp_path / "samples"
    run("sample", [f"run_dir={rd}", "num_samples=2", "steps=2", f"out_dir={out}", "boundary_maps=0"])
    with Image.open(out / "images" / "000001.png") as im:
        assert im.mode == "RGB" and im.size == (RES, RES)
    ev = tmp_path / "eval"
    run("evaluate", [f"run_dir={rd}", "num_samples=2", "steps=2", "batch_size=2", f"out_dir={ev}",
                     "evaluate.metrics=[]", "evaluate.num_workers=0"])
    assert check_adm_npz(ev / f"samples_2x{RES}x{RES}x3.npz") == (2, RES, RES, 3)
