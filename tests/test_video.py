"""task=video: real mp4 clips -> prepare (corrupt file reported and skipped, sharded, resumable,
2 processes) -> DC-DiT training on the (T, h, w) latent grid -> sampled MP4/GIF/PNG -> per-frame
FID and FVD with locally written stand-in weights. CPU, tiny shapes, random VAE."""
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dcgen.cli import compose, run

PY = sys.executable
FRAMES, SIZE, VIDEO_FRAMES = 4, 32, 12




def write_shape_video(path: Path, kind: str, phase: int, n: int = VIDEO_FRAMES, size: int = 64,
                      codec: str | None = None):
    """A red square or a green disc moving right on a grey background (PyAV; H.264 unless
    `codec` says otherwise)."""
    import av
    path.parent.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=8)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for i in range(n):
            a = np.full((size, size, 3), 40, np.uint8)
            cx, cy = 10 + (3 * i + phase) % 40, 16 + 3 * phase
            if kind == "square":
                a[(abs(xx - cx) < 8) & (abs(yy - cy) < 8)] = (230, 60, 60)
            else:
                a[(xx - cx) ** 2 + (yy - cy) ** 2 < 64] = (60, 200, 80)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def video_data(tmp_path_factory):
    """root/{disc,square}/*.mp4 (3 each, 12 frames of 64x64) + a corrupt square/x.mp4, and a
    tiny random AutoencoderKL saved with save_pretrained."""
    from dcgen.codec import tiny_autoencoder_kl
    base = tmp_path_factory.mktemp("video")
    root = base / "ucf"
    for k in range(3):
        write_shape_video(root / "disc" / f"disc_{k}.mp4", "disc", 4 * k)
        write_shape_video(root / "square" / f"square_{k}.mp4", "square", 4 * k)
    (root / "square" / "x.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    vae = base / "vae"
    tiny_autoencoder_kl(width=8).save_pretrained(str(vae))  # narrow: CPU-fast
    return root, vae


def task_args(root, vae, *extra):
    return ["task=video", f"task.root={root}", f"task.vae={vae}", f"task.frames={FRAMES}",
            f"task.resolution={SIZE}", *extra]


@pytest.fixture(scope="module")
def prepared(video_data):
    """One prepare run shared by the training and metric tests."""
    root, vae = video_data
    summary = run("prepare", task_args(root, vae))
    from accelerate.state import PartialState
    PartialState._reset_state()
    return root, vae, summary


# --------------------------------------------------------------------------------------------


def test_read_formats_with_pyav_fallback(tmp_path):
    """avi/mkv/webm: read (decord, else PyAV: this decord build fails on some 48-px-wide
    streams), identical frames from both backends where both read; unlabelled folder -> 0."""
    import av
    from dcgen.tasks.video.data import VideoReadError, read_clips, scan_videos
    files = {"a.avi": "mpeg4", "b.mkv": "libx264", "c.webm": "libvpx"}
    for name, codec in files.items():
        if codec in av.codecs_available:
            write_shape_video(tmp_path / "flat" / name, "disc", 2, n=9, size=48, codec=codec)
    videos, classes = scan_videos(tmp_path / "flat")
    assert classes == [] and videos and all(label == 0 for _, label in videos)
    fell_back = 0
    for path, _ in videos:
        starts, clips = read_clips(path, None, 3, 2, 32)  # decord, else PyAV
        s2, b = read_clips(path, None, 3, 2, 32, backends=("pyav",))
        assert starts == s2 == [0] and clips.shape == b.shape == (1, 3, 32, 32, 3), path.name
        assert (clips.float() - b.float()).abs().mean() < 2.0, path.name
        try:
            read_clips(path, None, 3, 2, 32, backends=("decord",))
        except VideoReadError as e:
            assert path.name in str(e) and "decord" in str(e)
            fell_back += 1
    print(f"{fell_back} of {len(videos)} files needed the PyAV fallback")


def test_prepare_reports_corrupt_file_and_caches_latent_clips(video_data, tmp_path, caplog):
    from hydra.utils import instantiate
    root, vae = video_data
    cache_dir = tmp_path / "cache"
    args = task_args(root, vae, f"task.cache_dir={cache_dir}", "task.shard_clips=3")
    task = instantiate(compose("prepare", args).task, _convert_="all")
    assert task.grid == (FRAMES, SIZE // 8, SIZE // 8) and task.channels == 4
    assert task.num_classes == 2
    with pytest.raises(FileNotFoundError, match="dcgen prepare"):
        task.train_dataset()  # nothing cached yet: a clear error, not a crash mid-training

    caplog.set_level(logging.INFO, logger="dcgen.data")
    summary = run("prepare", args)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("x.mp4" in m and "cannot read video" in m for m in warnings), warnings
    assert any("skipped 1 unreadable video(s) of 7" in m and "square/x.mp4" in m for m in warnings)
    assert summary["unreadable"] == ["square/x.mp4"]
    assert [k["name"] for k in summary["skipped"]] == ["square/x.mp4"]
    # 12 frames, 4 per clip back to back -> 3 clips per readable video
    assert summary["num_videos"] == 6 and summary["num_rows"] == 18

    cache = task.cache_path
    shards = sorted(cache.glob("shard_*"))
    assert len(shards) == 7  # shard_clips=3: one whole video per shard (3 clips each)
    index = json.loads((cache / "index.json").read_text())
    assert index["classes"] == ["disc", "square"]
    assert [s["rows"] for s in index["shards"]] == [3, 3, 3, 3, 3, 3, 0]  # x.mp4 gives none
    starts = np.load(shards[0] / "start.npy")
    assert starts.tolist() == [0, 4, 8] and np.load(shards[0] / "item.npy").tolist() == [0, 0, 0]
    ds = task.train_dataset()
    assert len(ds) == 18
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (4, FRAMES, SIZE // 8, SIZE // 8)
    assert sorted({int(ds[i][1]) for i in range(len(ds))}) == [0, 1]
    m, lv = ds.moments(0)
    assert torch.isfinite(m).all() and torch.isfinite(lv).all()
    # a fresh posterior sample per epoch, the same one for the same (item, epoch)
    assert not torch.equal(ds[(0, 0)][0], ds[(0, 1)][0]) and torch.equal(ds[(0, 1)][0], ds[(0, 1)][0])

    # resume: a lost shard is re-encoded, nothing else is
    stamps = {p.name: (p / "meta.json").stat().st_mtime_ns for p in shards}
    import shutil
    shutil.rmtree(shards[2])
    (cache / "index.json").unlink()
    caplog.clear()
    summary = run("prepare", args)
    assert any("1 of 7 shard(s) to encode (1 item(s))" in r.getMessage() for r in caplog.records)
    assert [p.name for p in shards if (p / "meta.json").stat().st_mtime_ns == stamps[p.name]] == \
        [p.name for p in shards if p != shards[2]]
    assert summary["num_rows"] == 18
    assert any("skipped 1 unreadable" in r.getMessage() for r in caplog.records)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prepare_two_processes_shard_by_rank(video_data, prepared, tmp_path):
    """torchrun with 2 CPU processes: each rank writes only its own shard files, and the cache
    holds the same clips as the single-process one."""
    root, vae = video_data
    cache_dir = tmp_path / "cache2"
    script = tmp_path / "prep.py"
    script.write_text(textwrap.dedent(f"""
        from dcgen.cli import run
        run("prepare", {task_args(root, vae, f"task.cache_dir={cache_dir}")!r})
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", str(script)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "x.mp4" in p.stderr
    from hydra.utils import instantiate
    two = instantiate(compose("prepare", task_args(root, vae, f"task.cache_dir={cache_dir}")).task,
                      _convert_="all")
    one = instantiate(compose("prepare", task_args(root, vae)).task, _convert_="all")
    i2 = json.loads((two.cache_path / "index.json").read_text())
    i1 = json.loads((one.cache_path / "index.json").read_text())
    assert i2["num_rows"] == i1["num_rows"] == 18 and i2["unreadable"] == ["square/x.mp4"]
    assert i2["num_shards"] == i1["num_shards"] and i2["shards"] == i1["shards"]
    for s in range(i2["num_shards"]):
        a, b = one.cache_path / f"shard_{s:05d}", two.cache_path / f"shard_{s:05d}"
        assert json.loads((b / "meta.json").read_text())["written"]["rank"] == s % 2  # shard s: rank s mod 2
        for f in ("item", "label", "start"):
            assert np.array_equal(np.load(a / f"{f}.npy"), np.load(b / f"{f}.npy")), (s, f)
        m1, m2 = np.load(a / "mean.npy").astype(np.float32), np.load(b / "mean.npy").astype(np.float32)
        assert np.allclose(m1, m2, atol=1e-2), (s, np.abs(m1 - m2).max())
    d1, d2 = one.train_dataset(), two.train_dataset()
    assert len(d1) == len(d2) == 18


def test_train_dcdit_on_latent_grid_and_sample_mp4(prepared, tmp_path):
    from dcgen.sample import sample_command
    from dcgen.train import build_model, train
    root, vae, _ = prepared
    rd = tmp_path / "run"
    cfg = compose("train", [*task_args(root, vae), "model=dcdit_debug", "train.max_steps=2",
                            "train.global_batch_size=4", "train.sample_every=0",
                            "train.ckpt_every=0", "dc.ratio_group_size=4", f"run_dir={rd}"])
    _, model, _ = train(cfg, return_model=True)
    assert model.token_grid == (FRAMES, SIZE // 8, SIZE // 8) and model.in_channels == 4

    # the video model config with per-axis options runs forward/backward on the same grid
    from hydra.utils import instantiate
    vcfg = compose("train", [*task_args(root, vae), "model=dcdit_video", "model.hidden_size=64",
                             "model.depth=1", "model.num_heads=4", "model.patch_size=[1,1,1]",
                             "model.norm_groups=8", "model.conv_kernel=factorised",
                             "model.router_kernel=[1,3,3]", "model.dechunk_sigma=[1.0,2.0,2.0]"])
    task = instantiate(vcfg.task, _convert_="all")
    vmodel = build_model(vcfg, task)
    x = torch.stack([task.train_dataset()[i][0] for i in range(2)])
    out, aux = vmodel(x, torch.tensor([10, 500]), torch.tensor([0, 1]))
    assert out.shape == (2, 8, FRAMES, SIZE // 8, SIZE // 8)
    assert aux[0].boundary_prob.shape == (2, FRAMES * (SIZE // 8) ** 2)
    out.square().mean().backward()

    out_dir = tmp_path / "samples"
    sample_command(compose("sample", [f"run_dir={rd}", "num_samples=2", "steps=3",
                                      f"out_dir={out_dir}", "boundary_maps=1", "map_timesteps=2",
                                      "device=cpu"]))
    mp4 = out_dir / "videos" / "000000.mp4"
    import decord
    vr = decord.VideoReader(str(mp4))
    assert len(vr) == FRAMES and vr[0].asnumpy().shape == (SIZE, SIZE, 3)
    import av
    with av.open(str(mp4)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == FRAMES and frames[0].shape == (SIZE, SIZE, 3)
    from PIL import Image
    with Image.open(out_dir / "videos" / "000001.gif") as im:
        assert im.n_frames == FRAMES and im.size == (SIZE, SIZE)
    with Image.open(out_dir / "videos" / "000000.png") as im:  # the strip of frames
        assert im.size[0] > FRAMES * SIZE and im.size[1] >= SIZE
    saved = np.load(out_dir / "samples.npy")
    assert saved.shape == (2, FRAMES, SIZE, SIZE, 3) and saved.dtype == np.uint8
    for name in ["samples.png", "boundary_map_00.png", "kept_fraction_vs_t.png"]:
        assert (out_dir / name).is_file(), name


# --------------------------------------------------------------------------------------------


class TinyI3D(torch.nn.Module):
    """Stand-in for i3d_torchscript.pt: same call signature, (N, 400) features."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 16, kernel_size=3, stride=2)
        self.fc = torch.nn.Linear(16, 400)

    def forward(self, x, rescale: bool = False, resize: bool = False,
                return_features: bool = True):
        h = torch.relu(self.conv(x)).mean(dim=(2, 3, 4))
        return self.fc(h)


@pytest.fixture(scope="module")
def metric_weights(tmp_path_factory):
    """A random-weight torch-fidelity InceptionV3 state dict and a scripted tiny I3D."""
    import warnings
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    base = tmp_path_factory.mktemp("weights")
    # build the extractor without its download: skip the pretrained load, keep the random init
    orig_url = fe.load_state_dict_from_url
    orig_load = fe.FeatureExtractorInceptionV3.load_state_dict
    fe.load_state_dict_from_url = lambda *a, **k: {}
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url = orig_url
        fe.FeatureExtractorInceptionV3.load_state_dict = orig_load
    inception = base / "inception.pth"
    torch.save(net.state_dict(), inception)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(TinyI3D())
    i3d = base / "i3d_torchscript.pt"
    scripted.save(str(i3d))
    return inception, i3d


def test_frechet_distance_closed_form_and_guards():
    from dcgen.tasks.video.metrics import frechet_distance
    # 1-D: FD(N(m1, a), N(m2, b)) = (m1 - m2)^2 + (sqrt a - sqrt b)^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 50))  # rank-deficient covariances (5 samples, 50 dims)
    s = np.cov(a, rowvar=False)
    b = np.cov(rng.normal(size=(5, 50)), rowvar=False)
    assert abs(frechet_distance(a.mean(0), s, a.mean(0), s)) < 1e-6
    d = frechet_distance(a.mean(0), s, a.mean(0) + 1, b)
    assert np.isfinite(d) and d > 50


def test_per_frame_fid_and_fvd(prepared, metric_weights, tmp_path):
    from hydra.utils import instantiate
    from dcgen.tasks.video import metrics as M
    root, vae, _ = prepared
    inception, i3d = metric_weights
    task = instantiate(compose("prepare", task_args(root, vae, f"task.i3d={i3d}",
                                                    f"task.inception_weights={inception}")).task,
                       _convert_="all")
    real, info = task.reference_clips(6, seed=0)  # decoded from the mp4s, not the VAE
    assert real.shape == (6, FRAMES, SIZE, SIZE, 3) and real.dtype == np.uint8
    real_f = torch.from_numpy(real).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (N, 3, T, H, W)

    # a set against itself: FVD vanishes (FID is skipped: each FID call costs seconds on a CPU)
    # (the image-metric keys of the shared evaluate config are ignored)
    same = task.evaluate(real_f, tmp_path / "same", reference=real, fid=False,
                         metrics=["fid", "is"], npz=True)
    assert same["fvd"] == pytest.approx(0.0, abs=1e-6) and same["fid_per_frame"] is None

    # generated-looking noise against reference clips drawn from the videos: both positive
    gen = torch.rand(4, 3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # torch-fidelity's FID from the saved Inception weights; its 64-d layer keeps the test fast
    # (the 2048-d default runs the same code, ~20 s more on a 2-core CPU)
    res = task.evaluate(gen, tmp_path / "eval", num_reference=4, fid_frames_per_clip=2,
                        fid_feature_layer="64")
    assert res["fvd"] > 0.1 and res["fid_per_frame"] > 0
    p = res["video_protocol"]
    assert (p["frames"], p["stride"], p["resolution"]) == (FRAMES, 1, SIZE)
    assert p["num_generated"] == 4 and p["num_reference"] == 4 and p["fvd_clips"] == [4, 4]
    assert p["fid_generated_frames"] == 8 and p["fid_reference_frames"] == 8
    assert p["inception_weights"] == str(inception) and "cache index" in p["reference"]
    assert p["fid_feature_layer"] == "64"
    saved = json.loads((tmp_path / "eval" / "video_metrics.json").read_text())
    assert saved["fvd"] == pytest.approx(res["fvd"])

    # a folder of videos as the reference (e.g. a held-out split): scanned, not the cache
    other, info = task.reference_clips(3, seed=0, root=root / "disc")
    assert other.shape == (3, FRAMES, SIZE, SIZE, 3) and "videos under" in info["reference"]

    # direct API: FVD of two different real subsets is finite and non-negative
    assert M.fvd(real[:3], real[3:], i3d) >= 0
    with pytest.raises(FileNotFoundError, match="i3d"):
        M.fvd(real, real, tmp_path / "missing_i3d.pt")


def test_svd_temporal_decoder_codec_keeps_clips_whole(tmp_path):
    """vae_type=auto detects AutoencoderKLTemporalDecoder; its decoder sees whole clips."""
    from diffusers import AutoencoderKLTemporalDecoder
    from dcgen.tasks.video.codec import VideoCodec, vae_info
    torch.manual_seed(0)
    AutoencoderKLTemporalDecoder(block_out_channels=(32, 32), latent_channels=4,
                                 down_block_types=("DownEncoderBlock2D",) * 2,
                                 layers_per_block=1).save_pretrained(str(tmp_path / "svd"))
    assert vae_info(tmp_path / "svd")["kind"] == "svd"
    codec = VideoCodec(tmp_path / "svd", micro_batch=4)  # 4 frames per call -> one 3-frame clip
    x = torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, logvar = codec.encode_moments(x)
    assert mean.shape == logvar.shape == (2, 4, 3, 8, 8) == (2, *codec.latent_shape(3, 16))
    z = mean * codec.scale
    out = codec.decode(z)
    assert out.shape == (2, 3, 3, 16, 16)
    assert torch.allclose(codec.decode(z[1:]), out[1:], atol=1e-5)


@pytest.mark.slow
def test_training_with_two_workers_resumes_bit_exact(prepared, tmp_path):
    """The posterior draw of clip i in epoch e comes from (seed, i, e) inside the DataLoader
    workers: a run with num_workers=2 killed after a checkpoint and resumed equals an
    uninterrupted one, bit for bit."""
    from test_train import assert_identical, final_weights, run_cli
    root, vae, _ = prepared
    cmd = ["train", *task_args(root, vae), "model=dcdit_debug", "train.global_batch_size=4",
           "train.sample_every=0", "train.ckpt_every=2", "train.num_workers=2", "train.max_steps=4",
           "dc.ratio_group_size=4", "dc.multi_budget_start_step=1"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_cli([*cmd, f"run_dir={ref}"])
    p = run_cli([*cmd, f"run_dir={run}"], env={"DCGEN_FAULT_KILL_AFTER_STEP": "2"}, check=False)
    assert p.returncode == -9
    run_cli([*cmd, f"run_dir={run}"])
    m1, e1, _ = final_weights(ref)
    m2, e2, ck = final_weights(run)
    assert ck.name == "step_00000004"
    assert_identical(m1, m2)
    assert_identical(e1, e2)


def test_clip_index_is_numpy_and_draws_depend_on_item_and_epoch(prepared):
    from dcgen.tasks.video.data import LatentClipDataset
    from dcgen.tasks.video.task import VideoTask
    root, vae, _ = prepared
    ds = VideoTask(root=root, vae=str(vae), frames=FRAMES, resolution=SIZE).train_dataset()
    assert isinstance(ds, LatentClipDataset) and ds.wants_epoch
    assert isinstance(ds.cache.offsets, np.ndarray) and ds.cache.open_files() == 0  # nothing opened yet
    a, b = ds[(1, 0)][0], ds[(1, 0)][0]
    assert torch.equal(a, b)  # a function of (seed, item, epoch): no global RNG
    torch.manual_seed(123)
    assert torch.equal(ds[(1, 0)][0], a)
    assert not torch.equal(ds[(1, 1)][0], a) and not torch.equal(ds[(2, 0)][0], a)


@pytest.mark.slow
def test_two_process_video_evaluation_gathers_nothing(prepared, tmp_path):
    """Video samples evaluated by 2 processes: each writes its chunks to disk, the main process
    reads them for the metrics (none here: no Inception or I3D weights given); a spy makes any
    gather_object fail."""
    from test_scale import SPY
    from test_train import run_cli
    root, vae, _ = prepared
    rd = tmp_path / "run"
    run_cli(["train", *task_args(root, vae), "model=dcdit_debug", "train.max_steps=1",
             "train.global_batch_size=4", "train.sample_every=0", "dc.ratio_group_size=4", f"run_dir={rd}"])
    spy = tmp_path / "spy.py"
    spy.write_text(SPY)
    out = tmp_path / "ev"
    env = {k: v for k, v in os.environ.items() if k != "DCGEN_DEBUG"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", str(spy), "evaluate", f"run_dir={rd}",
                        "num_samples=3", "batch_size=1", "steps=2", f"out_dir={out}"],
                       capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_samples"] == 3 and m["processes"] == 2
    assert np.load(out / "samples.npy").shape[0] == 3
    assert len(list((out / "chunks").glob("data_*.npy"))) == 3


def test_channel_normalisation_from_the_caches_posterior_statistics(prepared):
    """`dcgen prepare` measures, per channel, the mean and std of the posterior samples the
    training draws (E[mu], Var(mu) + E[sigma^2]) into the index; task.latent_norm=channel trains
    on (z - mean_c) / std_c: in distribution mean 0 and std 1 per channel over the cache, and
    decodes through the same statistics."""
    from hydra.utils import instantiate

    from dcgen.codec import VAECodec
    root, vae, summary = prepared
    assert len(summary["latent_mean"]) == len(summary["latent_std"]) == 4
    task = instantiate(compose("train", [*task_args(root, vae), "task.latent_norm=channel"]).task, _convert_="all")
    ds = task.train_dataset()
    mu = torch.stack([ds.moments(i)[0] for i in range(len(ds))]).double()  # (N, C, T, h, w)
    var = torch.stack([ds.moments(i)[1] for i in range(len(ds))]).double().exp()
    m = torch.tensor(summary["latent_mean"], dtype=torch.float64).view(1, -1, 1, 1, 1)
    s = torch.tensor(summary["latent_std"], dtype=torch.float64).view(1, -1, 1, 1, 1)
    norm_mean = ((mu - m) / s).transpose(0, 1).reshape(4, -1).mean(1)
    norm_second = (((mu - m) ** 2 + var) / s ** 2).transpose(0, 1).reshape(4, -1).mean(1)
    assert torch.allclose(norm_mean, torch.zeros(4, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(norm_second, torch.ones(4, dtype=torch.float64), atol=1e-3)
    # the dataset's draw is that normalisation of its posterior sample
    x, _ = ds[(0, 0)]
    plain = instantiate(compose("train", task_args(root, vae)).task, _convert_="all")
    z = plain.train_dataset()[(0, 0)][0] / plain.scale
    assert torch.allclose(x, ((z.double() - m[0]) / s[0]).float(), atol=1e-5)
    # decode: through the statistics, equal to the VAE's decoding of the raw latent
    want = VAECodec(vae, scale=1.0).decode(z.transpose(0, 1))  # frames as a batch
    got = task.decode(x[None])[0].transpose(0, 1)
    assert torch.allclose(got, want.clamp(-1, 1), atol=1e-4)
    # given (as an export records them): the same decode; other statistics than the cache's
    # are refused when the cache is read for training
    stats = [f"+task.latent_mean={summary['latent_mean']}", f"+task.latent_std={summary['latent_std']}"]
    given = instantiate(compose("train", [*task_args(root, vae), "task.latent_norm=channel", *stats]).task,
                        _convert_="all")
    assert torch.allclose(given.decode(x[None])[0].transpose(0, 1), got, atol=1e-6)
    shifted = [f"+task.latent_mean={[v + 0.5 for v in summary['latent_mean']]}", stats[1]]
    other = instantiate(compose("train", [*task_args(root, vae), "task.latent_norm=channel", *shifted]).task,
                        _convert_="all")
    with pytest.raises(ValueError, match="was the cache prepared again"):
        other.train_dataset()


def test_dc_ae_per_frame_codec_prepare_train_and_decode(video_data, tmp_path):
    """The video task takes DC-AE per frame (vae_type auto reads AutoencoderDC from config.json):
    the latent grid follows its 4x downsampling and 8 channels, its cached log-variance is -inf
    (deterministic: a draw is the latent), a short training run and the decode work."""
    from hydra.utils import instantiate

    from dcgen.codec import tiny_autoencoder_dc
    from dcgen.tasks.video.codec import vae_info
    from dcgen.train import train
    root, _ = video_data
    vae = tmp_path / "dcae"
    tiny_autoencoder_dc(seed=0, width=8).save_pretrained(str(vae))
    assert vae_info(vae) == {"kind": "image", "class_name": "AutoencoderDC", "latent_channels": 8,
                             "downsample": 4, "scaling_factor": 0.5}
    args = task_args(root, vae, f"task.cache_dir={tmp_path / 'cache'}")
    run("prepare", args)
    task = instantiate(compose("train", args).task, _convert_="all")
    assert task.channels == 8 and task.grid == (FRAMES, SIZE // 4, SIZE // 4)
    ds = task.train_dataset()
    mean, logvar = ds.moments(0)
    assert bool(torch.isinf(logvar).all()) and torch.equal(ds[(0, 0)][0], ds[(0, 1)][0])  # no noise
    assert torch.allclose(ds[(0, 0)][0], mean * 0.5)
    rd = tmp_path / "run"
    train(compose("train", [*args, "model=dcdit_debug", "train.max_steps=1", "train.global_batch_size=2",
                            "train.sample_every=0", "train.ckpt_every=0", "train.log_with=none",
                            "dc.ratio_group_size=2", f"run_dir={rd}"]))
    clips = task.decode(ds[(0, 0)][0][None])
    assert clips.shape == (1, 3, FRAMES, SIZE, SIZE) and clips.abs().max() <= 1
