"""Paper scale, simulated on the CPU with synthetic data in the real layout (issue 19)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

IMAGENET_ITEMS, SHARD = 1_281_167, 5000  # 257 shards, as `dcgen prepare` writes ImageNet


@pytest.fixture(scope="module")
def imagenet_sized_cache(tmp_path_factory):
    """A latent cache in the layout `dcgen prepare task=imagenet_latent` writes (dcgen.shards),
    at ImageNet's size: 1,281,167 items in 257 shards, each with all six fields (tiny per-item
    arrays: 1x2x2 latents in float16), written through the cache's own writer."""
    from dcgen.shards import Processes, start
    from dcgen.tasks.imagenet_latent.data import CACHE_VERSION, TASK
    d = tmp_path_factory.mktemp("imagenet_sized")
    C, h, w = 1, 2, 2
    dt = np.float16
    fields = {"mean": (dt, (2, C, h, w)), "logvar": (dt, (2, C, h, w)), "latent": (dt, (C, h, w)),
              "flip": (np.uint8, ())}
    items = [(f"n{i % 1000:05d}/{i:07d}.JPEG", i % 1000) for i in range(IMAGENET_ITEMS)]
    prep = start(d, task=TASK, version=CACHE_VERSION, fields=fields, shard_size=SHARD,
                 settings={"resolution": 16, "latent_size": h, "latent_channels": C},
                 list_items=lambda: (items, {"classes": [str(i) for i in range(1000)]}),
                 rerun="dcgen prepare", processes=Processes())
    assert prep.num_shards == 257
    rng = np.random.default_rng(0)

    def encode(todo):
        for s in todo:
            a, b = prep.span(s)
            n = b - a
            writer = prep.writer(s)
            writer.add(np.arange(a, b), mean=rng.standard_normal((n, 2, C, h, w)).astype(dt),
                       logvar=np.full((n, 2, C, h, w), -2.0, dt),
                       latent=rng.standard_normal((n, C, h, w)).astype(dt), flip=np.zeros(n, np.uint8))
            writer.finish()
    # durability is not what these tests measure: the ~1,800 fsyncs of 257 shards cost ~10 s here
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        prep.run(encode)
    return d


READER = textwrap.dedent('''
    import json, os, resource, sys
    import numpy as np, torch
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    from dcgen.tasks.imagenet_latent.data import LatentCache, LatentDataset

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    class Probe(torch.utils.data.Dataset):
        def __init__(self, ds, keys):
            self.ds, self.keys = ds, keys
        def __len__(self):
            return len(self.keys)
        def __getitem__(self, j):
            x, y = self.ds[self.keys[j]]
            info = torch.utils.data.get_worker_info()
            return x, y, len(os.listdir("/proc/self/fd")), rss_mb(), info.id

    mode = sys.argv[2]
    fields = LatentDataset.MODE_FIELDS[mode]
    ds = LatentDataset(LatentCache(sys.argv[1], fields=fields), 0.5, mode, hflip=True, seed=0)
    keys = [(int(i), 0) for i in np.random.default_rng(1).choice(len(ds), 10_000, replace=False)]
    loader = torch.utils.data.DataLoader(Probe(ds, keys), batch_size=50, num_workers=4)
    fds, rss, n, labels = {}, {}, 0, []
    for x, y, nfd, mb, wid in loader:
        n += len(y)
        labels.append(y)
        for f, m, w in zip(nfd.tolist(), mb.tolist(), wid.tolist()):
            fds[w] = max(fds.get(w, 0), f)
            rss.setdefault(w, []).append(m)
    want = torch.tensor([k % 1000 for k, _ in keys])
    print(json.dumps({"n": n, "labels_ok": bool(torch.equal(torch.cat(labels), want)),
                      "max_fds": max(fds.values()),
                      "rss_growth_mb": max(v[-1] - v[0] for v in rss.values())}))
''')


@pytest.mark.parametrize("mode", ["fixed", "resample"])
def test_imagenet_sized_cache_reads_with_a_small_file_limit(imagenet_sized_cache, tmp_path, mode):
    """4 DataLoader workers under `ulimit -n 256` read a random 10,000 of 1,281,167 items: every
    item arrives with its label, each worker's open files stay bounded, its memory flat."""
    script = tmp_path / "reader.py"
    script.write_text(READER)
    p = subprocess.run([sys.executable, str(script), str(imagenet_sized_cache), mode], capture_output=True,
                       text=True, timeout=180, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["n"] == 10_000 and r["labels_ok"]
    assert r["max_fds"] < 100, r  # interpreter + torch + at most 8 shards x the mode's fields
    assert r["rss_growth_mb"] < 200, r


def test_cache_keeps_at_most_max_open_shards(imagenet_sized_cache):
    from dcgen.tasks.imagenet_latent.data import LatentCache, LatentDataset
    cache = LatentCache(imagenet_sized_cache, fields=LatentDataset.MODE_FIELDS["resample"], max_open_shards=3)
    ds = LatentDataset(cache, 1.0, "resample")
    for i in range(0, len(ds), len(ds) // 20):
        x, y = ds[i]
        assert int(y) == i % 1000
        assert cache.open_shards() <= 3 and cache.open_files() <= 12
    assert set(cache.shard(0)) == {"mean", "logvar", "item", "label"}


def test_each_rank_draws_only_its_rows_and_the_draw_does_not_depend_on_the_split():
    """t, noise and label dropout of a step drawn in one piece equal the same rows drawn in the
    micro-batches of 2 or 3 processes with accumulation (each row from its own generator)."""
    import torch
    from dcgen.diffusion import FlowMatching, GaussianDiffusion
    from dcgen.train import step_randomness
    G, step, shape = 12, 5, (3, 4, 4)
    for obj in (GaussianDiffusion(), FlowMatching(time_sampling="logit_normal")):
        whole = step_randomness(7, range(step * G, (step + 1) * G), shape, obj, 0.3)
        for pieces in ([0, 6, 12], [0, 2, 4, 6, 8, 10, 12], [0, 5, 12]):
            parts = [step_randomness(7, range(step * G + a, step * G + b), shape, obj, 0.3)
                     for a, b in zip(pieces, pieces[1:])]
            for k in range(3):
                assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])
        other_step = step_randomness(7, range((step + 1) * G, (step + 2) * G), shape, obj, 0.3)
        assert not torch.equal(other_step[1], whole[1])


def test_bench_step_noise_reports_the_per_rank_cost(capsys):
    """The micro-benchmark runs and reports one row per (data, W) against the old draw."""
    import importlib.util
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_step_noise", root / "tools" / "bench_step_noise.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--batch", "16", "--repeats", "1", "--worlds", "1,8"])
    assert len(rows) == 2 * len(mod.SHAPES)
    assert all(r["new_ms"] > 0 and r["old_ms"] > 0 for r in rows)


def _saved_bytes_and_grads(model, x, t, y):
    """Bytes of the tensors autograd keeps for the backward pass (outside checkpointed regions),
    and the parameter gradients of one loss."""
    import torch
    saved = {"bytes": 0}

    def pack(tensor):
        saved["bytes"] += tensor.numel() * tensor.element_size()
        return tensor

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out, aux = model(x, t, y)
        loss = out.float().pow(2).mean() + sum(a.boundary_prob.float().mean() for a in aux)
    loss.backward()
    return saved["bytes"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["dcdit", "dit"])
@pytest.mark.parametrize("autocast", [False, True])
def test_grad_checkpointing_gives_identical_gradients_and_keeps_less(arch, autocast):
    import contextlib

    import torch
    from dcgen.models import DCDiT, DiT
    torch.manual_seed(0)
    common = dict(input_size=(16, 16), in_channels=3, num_classes=4, hidden_size=64, depth=4, num_heads=4)
    model = DCDiT(**common, norm_groups=8) if arch == "dcdit" else DiT(**common, patch_size=2)
    for p in model.parameters():  # away from the zero inits, so every gradient is non-trivial
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([10, 500, 990]), torch.tensor([0, 3, 4])
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    model.train()
    with ctx:
        plain_bytes, plain = _saved_bytes_and_grads(model, x, t, y)
    model.set_grad_checkpointing(True)
    with ctx:
        ckpt_bytes, ckpt = _saved_bytes_and_grads(model, x, t, y)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    worst = max((plain[k].float() - ckpt[k].float()).abs().max().item() for k in plain)
    assert worst <= 1e-6, worst
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)
    with torch.no_grad():  # sampling: no checkpointing, the same output
        model.eval()
        a = model(x, t, y)[0]
        model.set_grad_checkpointing(False)
        assert torch.equal(a, model(x, t, y)[0])


def test_train_with_grad_checkpointing_matches_the_plain_run(tmp_path):
    """train.grad_checkpointing=true: the same weights as the plain run after a few steps."""
    import torch
    from dcgen.cli import compose
    from dcgen.train import train
    from test_train import TOY
    out = []
    for on in ("false", "true"):
        cfg = compose("train", [*TOY, "train.max_steps=3", "train.ckpt_every=0", "train.num_threads=1",
                                f"train.grad_checkpointing={on}", f"run_dir={tmp_path / on}"])
        threads = torch.get_num_threads()
        try:
            out.append(train(cfg, return_model=True)[1].state_dict())
        finally:
            torch.set_num_threads(threads)
    worst = max((out[0][k] - out[1][k]).abs().max().item() for k in out[0])
    assert worst <= 1e-6, worst


def launch(n: int, args, timeout=300):
    """A real n-process gloo job (RANK/WORLD_SIZE as torchrun sets them); [(rc, out, err)]."""
    import os
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(n):
        e = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                 RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n))
        e.pop("DCGEN_DEBUG", None)
        procs.append(subprocess.Popen([sys.executable, "-m", "dcgen", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=e))
    outs = []
    for p in procs:
        try:
            outs.append((p.returncode, *p.communicate(timeout=timeout)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a rank hung")
        outs[-1] = (p.returncode, outs[-1][1], outs[-1][2])
    return outs


@pytest.mark.slow
def test_a_two_process_run_resumes_on_one_and_on_three_processes(tmp_path):
    """The documented rule: another process count continues the same global batch, data order,
    timesteps and noise (all functions of the sample position), re-derives each process's own
    random state and says so; the result equals the uninterrupted run up to the all-reduce's
    summation order."""
    import torch
    from dcgen.checkpoint import latest_checkpoint
    from test_train import TOY, final_weights
    cmd = [*TOY, "train.global_batch_size=12", "train.ckpt_every=2", "train.log_every=2"]
    ref = tmp_path / "ref"
    assert all(rc == 0 for rc, _, _ in launch(2, ["train", *cmd, "train.max_steps=6", f"run_dir={ref}"]))
    import shutil
    for n in (1, 3):
        rd = tmp_path / f"on{n}"
        shutil.copytree(ref, rd)  # the same run as if killed after its step-4 checkpoint
        shutil.rmtree(rd / "checkpoints" / "step_00000006")
        (rd / "checkpoints" / "latest").write_text("step_00000004")
        assert latest_checkpoint(rd).name == "step_00000004"
        res = launch(n, ["train", *cmd, "train.max_steps=6", f"run_dir={rd}"])
        assert all(rc == 0 for rc, _, _ in res), [r[2][-1500:] for r in res]
        assert f"written by 2 process(es), this run has {n}" in res[0][1] + res[0][2]
        assert json.loads((latest_checkpoint(rd) / "state.json").read_text())["world"] == n
        a, b = final_weights(ref)[0], final_weights(rd)[0]
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        # Adam divides by sqrt(v): a last-bit difference in a small gradient grows to ~1e-5..1e-4
        # in two steps; a wrong batch, order or noise moves the weights by ~1e-2
        assert worst <= 2e-4, (n, worst)
        start = final_weights(tmp_path / "on1")[0] if n == 3 else None
        if start is not None:
            assert max((start[k] - b[k]).abs().max().item() for k in a) <= 2e-4


def test_milestones_are_kept_besides_the_newest(tmp_path):
    from test_train import TOY, run_cli
    rd = tmp_path / "run"
    run_cli(["train", *TOY, "train.max_steps=7", "train.ckpt_every=1", "train.ckpt_keep=2",
             "train.ckpt_keep_every=3", f"run_dir={rd}"])
    kept = sorted(p.name for p in (rd / "checkpoints").glob("step_*"))
    assert kept == ["step_00000003", "step_00000006", "step_00000007"]


SRUN_SHIM = """#!/bin/bash
# a stand-in for srun on one machine: start SLURM_NTASKS copies of the command with the ids SLURM
# gives its tasks, wait for all, exit with the largest exit code (as srun does)
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p"; s=$?; (( s > status )) && status=$s; done
exit $status
"""
SCONTROL_SHIM = """#!/bin/bash
if [ "$1" = show ]; then echo 127.0.0.1; else echo "$@" >> "$SHIM_LOG"; fi
"""


@pytest.mark.slow
def test_multinode_sbatch_runs_one_job_and_requeues_after_preemption(tmp_path):
    """tools/slurm_train_multinode.sbatch with srun/scontrol stand-ins (no SLURM here): its tasks
    join one 2-process job; a SIGUSR1 to every task (what --signal=USR1@120 sends) ends in exit 75
    and `scontrol requeue`; the same script and command then resume and finish."""
    import os
    import socket
    from dcgen.checkpoint import latest_checkpoint
    from test_train import TOY
    root = Path(__file__).resolve().parents[1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN_SHIM), ("scontrol", SCONTROL_SHIM)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "scontrol.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[1]", SLURM_NTASKS="2",
               SLURM_NTASKS_PER_NODE="2(x1)", SLURM_CPUS_PER_TASK="1", MASTER_PORT=str(port),
               SHIM_LOG=str(log), ACCELERATE_MIXED_PRECISION="no")
    env.pop("DCGEN_DEBUG", None)
    rd = tmp_path / "run"
    cmd = ["bash", str(root / "tools" / "slurm_train_multinode.sbatch"), *TOY, "train.max_steps=5",
           "train.ckpt_every=0", "train.log_every=5", f"run_dir={rd}"]
    p = subprocess.run(cmd, env={**env, "DCGEN_FAULT_SIGNAL_AT_STEP": "1:SIGUSR1"}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 75, p.stderr[-3000:]
    assert log.read_text().split() == ["requeue", "4242"]
    assert json.loads((latest_checkpoint(rd) / "state.json").read_text())["world"] == 2
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert latest_checkpoint(rd).name == "step_00000005"
    assert log.read_text().split() == ["requeue", "4242"]  # not requeued again


def test_pixel_folder_of_20000_files_starts_without_decoding(tmp_path, monkeypatch):
    """Building the dataset lists 20,000 files and decodes none; items decode one by one."""
    from PIL import Image

    from dcgen.tasks.pixel.task import PixelTask
    root = tmp_path / "imgs"
    im = Image.new("RGB", (4, 4), (10, 200, 30))
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(5000):
            im.save(root / f"c{c}" / f"{i:05d}.png")
    opened = {"n": 0}
    real_open = Image.open

    def counting_open(*a, **k):
        opened["n"] += 1
        return real_open(*a, **k)

    monkeypatch.setattr(Image, "open", counting_open)
    task = PixelTask(source="folder", root=root, resolution=4)
    ds = task.train_dataset()
    assert len(ds) == 20_000 and task.num_classes == 4
    assert opened["n"] == 0
    x, y = ds[12_345]
    assert opened["n"] == 1 and int(y) == 2 and x.shape == (3, 4, 4)


# ---- evaluation that survives and streams --------------------------------------------------------

from test_imagenet_latent import prepared, ws  # noqa: E402,F401  (module fixtures: images, tiny VAE, cache)


def _torchrun(args, nproc, env=None, check=True, script=None):
    import os
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    e.pop("DCGEN_DEBUG", None)
    target = [str(script)] if script else ["-m", "dcgen"]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                        f"--master_port={port}", *target, *args], capture_output=True, text=True, env=e,
                       timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def latent_run(prepared, tmp_path_factory):
    from dcgen.cli import compose
    from dcgen.train import train
    rd = tmp_path_factory.mktemp("evalrun") / "run"
    train(compose("train", [*prepared["task"], "model=dcdit_debug", "train.max_steps=2",
                            "train.global_batch_size=4", "train.sample_every=0", "train.ckpt_every=0",
                            "dc.ratio_group_size=4", f"run_dir={rd}"]))
    return rd


@pytest.mark.slow
def test_evaluation_resumes_and_is_the_same_for_any_process_count(latent_run, tmp_path):
    """7 samples in chunks of 2: an uninterrupted 1-process evaluation; a 2-process one killed
    after a chunk and rerun with the identical command; a 3-process one. All write the same
    ADM .npz, byte for byte."""
    args = [f"run_dir={latent_run}", "num_samples=7", "batch_size=2", "steps=2", "seed=5",
            "evaluate.metrics=[]", "evaluate.num_workers=0"]
    from dcgen.cli import main
    ref = tmp_path / "ref"
    assert main(["evaluate", *args, f"out_dir={ref}"]) == 0  # one process, in this one
    npz = ref / "samples_7x64x64x3.npz"
    want = npz.read_bytes()

    two = tmp_path / "two"
    p = _torchrun(["evaluate", *args, f"out_dir={two}"], 2, env={"DCGEN_FAULT_KILL_AFTER_CHUNK": "0"}, check=False)
    assert p.returncode != 0
    done = sorted(f.name for f in (two / "chunks").glob("chunk_*.json"))
    # rank 0 died after its first chunk: chunk 2 (its next) was never written
    assert "chunk_000000.json" in done and "chunk_000002.json" not in done
    assert not (two / "metrics.json").exists()
    stamps = {f: f.stat().st_mtime_ns for f in (two / "chunks").glob("chunk_*.json")}
    p = _torchrun(["evaluate", *args, f"out_dir={two}"], 2)
    assert all(f.stat().st_mtime_ns == t for f, t in stamps.items())  # finished chunks not redone
    assert "already done" in p.stderr
    assert (two / npz.name).read_bytes() == want

    three = tmp_path / "three"
    _torchrun(["evaluate", *args, f"out_dir={three}"], 3)
    assert (three / npz.name).read_bytes() == want
    m = json.loads((three / "metrics.json").read_text())
    assert m["processes"] == 3 and m["num_samples"] == 7 and m["protocol"]["chunks"] == 4

    # another setting into a started out_dir is refused, nothing touched
    assert main(["evaluate", *args[:-3], "steps=3", "evaluate.metrics=[]", f"out_dir={two}"]) == 2


def test_class_balanced_labels_are_exact_and_recorded(tmp_path):
    from dcgen.cli import main
    from dcgen.evaluate import eval_labels
    from test_train import TOY, run_cli
    lab = eval_labels(3, 40, 4, True)
    assert np.bincount(lab.numpy()).tolist() == [10, 10, 10, 10]
    assert not torch_equal_sorted(lab)  # shuffled, not in class order
    rd = tmp_path / "run"
    run_cli(["train", *TOY, "train.max_steps=1", f"run_dir={rd}"])
    out = tmp_path / "ev"
    assert main(["evaluate", f"run_dir={rd}", "num_samples=8", "batch_size=3", "steps=2", "class_balanced=true",
                 f"out_dir={out}"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["labels"] == {"class_balanced": True, "per_class_min": 2, "per_class_max": 2}
    assert np.bincount(np.load(out / "labels.npy")).tolist() == [2, 2, 2, 2]
    assert main(["evaluate", f"run_dir={rd}", "num_samples=7", "class_balanced=true", "steps=2",
                 f"out_dir={tmp_path / 'ev7'}"]) == 2
    assert not (tmp_path / "ev7").exists()


def torch_equal_sorted(t):
    import torch
    return torch.equal(t, t.sort().values)


SPY = """
import sys
import accelerate.utils
def refuse(*a, **k):
    raise AssertionError("gather_object called")
accelerate.utils.gather_object = refuse
import accelerate.utils.operations as ops
ops.gather_object = refuse
from dcgen.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_scale_doc_holds_the_counted_figures():
    """docs/scale.md's counted figures come from tools/scale_estimates.py: the SD-VAE encoder's
    FLOPs and DC-DiT-B's parameters and forward FLOPs at 256 px, recomputed here (meta device)."""
    import importlib.util
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("scale_estimates", root / "tools" / "scale_estimates.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    doc = (root / "docs" / "scale.md").read_text()
    enc = mod.vae_encoder_gflops(256)
    assert f"SD-VAE encoder {enc:.0f} GFLOP per 256 px frame" in doc
    model = mod.build_meta("dcdit_b", (32, 32), 4)
    P = sum(p.numel() for p in model.parameters())
    gflop = 2 * mod.forward_macs(model, 0.25) / 1e9
    assert f"| dcdit_b | {P / 1e6:.0f}M | {gflop:.0f} | {mod.STATIC_BYTES_PER_PARAM * P / 1e9:.1f} |" in doc
    for formula in ("20 B/param", "16 B/param", "saved_tensors_hooks", "ESTIMATE".lower()):
        assert formula.lower() in doc.lower(), formula


def test_pixel_npz_is_memory_mapped_not_loaded(tmp_path):
    """A 300 MB uncompressed .npz: building the task maps it (RSS stays flat), items are converted
    one at a time and equal the in-memory conversion; a compressed file still works (in memory)."""
    import torch
    from dcgen.tasks.pixel.data import NpzImageDataset
    from dcgen.tasks.pixel.task import PixelTask
    rng = np.random.default_rng(0)
    n = 100_000
    imgs = np.lib.format.open_memmap(tmp_path / "tmp.npy", mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
    for k in range(0, n, 10_000):
        imgs[k:k + 10_000] = rng.integers(0, 256, (10_000, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(n) % 7).astype(np.int64)
    np.savez(tmp_path / "big.npz", images=imgs, labels=labels)
    sample = np.array(imgs[[0, 54_321, n - 1]])
    del imgs
    def rss_mb():
        return next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmRSS:")) / 1024

    before = rss_mb()
    task = PixelTask(source="npz", root=tmp_path / "big.npz", resolution=16)
    ds = task.train_dataset()
    grown = rss_mb() - before
    assert isinstance(ds, NpzImageDataset) and isinstance(ds.images, np.memmap) and grown < 50, grown
    assert len(ds) == n and task.num_classes == 7 and task.channels == 3
    small = tmp_path / "small.npz"
    np.savez_compressed(small, images=sample, labels=labels[[0, 54_321, n - 1]])
    ref = PixelTask(source="npz", root=small, resolution=16).train_dataset()
    for j, i in enumerate((0, 54_321, n - 1)):
        x, y = ds[i]
        assert torch.equal(x, ref[j][0]) and int(y) == i % 7
