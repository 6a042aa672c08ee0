"""The training loop's device discipline: mixed precision as the launcher says, sharded modes
refused, at most one host synchronisation per micro-step, gradient accumulation equal to the
doubled batch, and augmentation draws that do not depend on processes, workers or resume."""
import collections
import json
import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dcgen.checkpoint import latest_checkpoint
from dcgen.cli import compose, main

TOY = ["task=toy", "task.grid=[8,8]", "task.num_samples=64", "model=dcdit_debug",
       "train.global_batch_size=8", "train.sample_every=0", "dc.ratio_group_size=4",
       "train.log_with=none", "train.num_threads=1"]


def toy_cfg(tmp_path, *extra, steps=2):
    return compose("train", [*TOY, f"train.max_steps={steps}", f"train.log_every={steps}",
                             "train.ckpt_every=0", f"run_dir={tmp_path / 'run'}", *extra])


# ----------------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------------

def autocast_seen(monkeypatch):
    """Record, at each loss computation, whether CPU autocast is on and its dtype."""
    from dcgen.diffusion import GaussianDiffusion
    seen = []
    orig = GaussianDiffusion.training_losses

    def spy(self, *a, **k):
        on = torch.is_autocast_enabled("cpu")
        seen.append(torch.get_autocast_dtype("cpu") if on else torch.float32)
        return orig(self, *a, **k)
    monkeypatch.setattr(GaussianDiffusion, "training_losses", spy)
    return seen


def test_launcher_mixed_precision_is_honoured_when_unset(tmp_path, monkeypatch):
    from dcgen.train import train
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what accelerate launch --mixed_precision sets
    seen = autocast_seen(monkeypatch)
    cfg = toy_cfg(tmp_path)
    assert cfg.train.mixed_precision is None  # unset: defer to the launcher
    train(cfg)
    assert seen and all(d == torch.bfloat16 for d in seen)
    state = json.loads((latest_checkpoint(tmp_path / "run") / "state.json").read_text())
    assert state["mixed_precision"] == "bf16"


def test_explicit_no_wins_over_the_launcher(tmp_path, monkeypatch):
    from dcgen.train import train
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    seen = autocast_seen(monkeypatch)
    train(toy_cfg(tmp_path, "train.mixed_precision=no"))
    assert seen and all(d == torch.float32 for d in seen)


def test_auto_is_fp32_without_a_native_bf16_gpu(monkeypatch):
    from dcgen import train as T
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(T, "native_bf16", lambda: False)
    assert T.resolve_mixed_precision("auto") == "no"
    assert T.resolve_mixed_precision(None) == "no"  # unset and no launcher setting: auto
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert T.resolve_mixed_precision(None) is None  # defer: Accelerate reads the launcher's
    assert T.resolve_mixed_precision("no") == "no"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.setattr(T, "native_bf16", lambda: True)
    assert T.resolve_mixed_precision("auto") == "bf16"


@pytest.mark.parametrize("env,args,needle", [
    ({}, ["train.mixed_precision=fp16"], "fp16"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, [], "fp16"),
    ({}, ["train.mixed_precision=fp8"], "fp8"),  # validate and the loop refuse the same values
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, [], "fp8"),
    ({"ACCELERATE_USE_FSDP": "true"}, [], "FSDP"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], "DeepSpeed"),
])
def test_unsupported_modes_are_refused_before_any_write(tmp_path, monkeypatch, capsys, env, args, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rd = tmp_path / "run"
    code = main(["train", *TOY, "train.max_steps=2", f"run_dir={rd}", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert "supported" in err[0]
    assert not rd.exists()


# ----------------------------------------------------------------------------------------------
# Host synchronisations
# ----------------------------------------------------------------------------------------------

# aten ops that make the host wait for the device on CUDA (scalar reads, data-dependent shapes)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim",
            "unique_consecutive", "equal", "is_nonzero"}


def _host_by_design(stack) -> bool:
    """Reads of tensors that live on the host on every device: the optimizer's step counters
    (torch.optim keeps them on the CPU unless capturable), the data order (a CPU permutation),
    and the objective's and the model's argument checks, which read values only of host
    tensors (skipped for GPU tensors)."""
    for f in stack:
        fn = f.filename.replace("\\", "/")
        if "/torch/optim/" in fn or "/torch/utils/data/" in fn:
            return True
        if fn.endswith("dcgen/train.py") and f.name in ("_index", "__iter__"):
            return True
        if f.name in ("_check_t", "check_inputs"):  # value checks run on host tensors only
            return True
    return False


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.where = collections.Counter()

    def note(self, what):
        stack = traceback.extract_stack()
        if not _host_by_design(stack):
            frames = [f for f in stack if "/dcgen/" in f.filename.replace("\\", "/")]
            self.where[f"{what} @ {frames[-1].name}" if frames else what] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in SYNC_OPS or (name == "repeat_interleave" and (kwargs or {}).get("output_size") is None
                                and args and isinstance(args[0], torch.Tensor)):
            self.note(name)
        return func(*args, **(kwargs or {}))


def count_syncs(tmp_path, steps, monkeypatch, extra=()):
    from dcgen.train import train
    counter = SyncCounter()
    for meth in ("tolist", "numpy"):  # Python-level reads that bypass dispatch on the CPU
        orig = getattr(torch.Tensor, meth)

        def patched(self, *a, _orig=orig, _meth=meth, **k):
            counter.note(_meth)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, meth, patched)
    cfg = toy_cfg(tmp_path / str(steps), *extra, steps=steps)
    with counter:
        train(cfg)
    monkeypatch.undo()
    return counter.where


@pytest.mark.parametrize("accum", [1, 2])
def test_at_most_one_host_sync_per_micro_step(tmp_path, monkeypatch, accum):
    """Runs of 3 and 6 steps, each logging and checkpointing once at its end: the difference is
    what 3 ordinary steps cost."""
    extra = [f"train.grad_accum_steps={accum}"]
    short = count_syncs(tmp_path, 3, monkeypatch, extra)
    long = count_syncs(tmp_path, 6, monkeypatch, extra)
    per_step = {k: long[k] - short.get(k, 0) for k in long if long[k] != short.get(k, 0)}
    total = sum(per_step.values())
    assert total <= 3 * accum, per_step
    assert total >= 3 * accum - 0, per_step  # the packing-length read is the one that remains


def test_dit_steps_need_no_host_sync(tmp_path, monkeypatch):
    extra = ["model=dit_debug", "model.patch_size=2"]
    short = count_syncs(tmp_path, 3, monkeypatch, extra)
    long = count_syncs(tmp_path, 6, monkeypatch, extra)
    assert sum(long.values()) - sum(short.values()) == 0, (long, short)


# ----------------------------------------------------------------------------------------------
# Gradient accumulation
# ----------------------------------------------------------------------------------------------

def test_grad_accum_two_equals_one_step_of_the_doubled_batch(tmp_path):
    """Same global batch (8), same draws: 2 micro-batches of 4 accumulate to the 8-sample step.
    Tolerance: fp32 summation order differs (two means of 4 vs one of 8)."""
    from dcgen.train import train
    base = ["dc.multi_budget=false", "train.grad_clip=0"]
    _, m1, _ = train(toy_cfg(tmp_path / "a", *base, steps=3), return_model=True)
    _, m2, _ = train(toy_cfg(tmp_path / "b", *base, "train.grad_accum_steps=2", steps=3), return_model=True)
    worst = max((p - q).abs().max().item() for p, q in zip(m1.parameters(), m2.parameters()))
    moved = max((p.abs().max().item() for p in m1.parameters()))
    assert worst <= 1e-5, worst
    assert moved > 0


# ----------------------------------------------------------------------------------------------
# Pixel-task flips: (seed, index, epoch), never the global RNG
# ----------------------------------------------------------------------------------------------

def _step_batches(ds, world, workers, start=0, steps=12, seed=5):
    """The global batch of each step as the ranks of a `world`-process job would load it."""
    from dcgen.train import StepBatchSampler
    G, out = 8, {}
    for r in range(world):
        sampler = StepBatchSampler(len(ds), G, world, r, 1, seed, start, steps, with_epoch=ds.wants_epoch)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers)
        for s, (x, _) in zip(range(start, steps), loader):
            out.setdefault(s, {})[r] = x
    return {s: torch.cat([v[r] for r in range(world)]) for s, v in out.items()}


def test_pixel_flips_do_not_depend_on_processes_workers_or_resume():
    from dcgen.tasks.pixel.task import PixelTask
    task = PixelTask(source="digits", hflip=True, seed=5, resolution=8)
    ds = task.train_dataset()
    torch.manual_seed(123)  # the global RNG must play no part
    one = _step_batches(ds, 1, 0)
    torch.manual_seed(999)
    two = _step_batches(ds, 2, 2)
    resumed = _step_batches(ds, 1, 0, start=7)
    plain = PixelTask(source="digits", hflip=False, resolution=8).train_dataset()
    noflip = _step_batches(plain, 1, 0)
    for s in range(12):
        assert torch.equal(one[s], two[s]), s
    for s in range(7, 12):
        assert torch.equal(one[s], resumed[s]), s
    flipped = sum(int(not torch.equal(one[s][i], noflip[s][i])) for s in range(12) for i in range(8))
    assert 20 < flipped < 76  # about half of the 96 draws flip (a few digits are symmetric)


# ----------------------------------------------------------------------------------------------
# What the loop and the sampler ask of the objective
# ----------------------------------------------------------------------------------------------

def test_flow_runs_log_kept_fraction_across_t_buckets(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from dcgen.train import train
    rd = tmp_path / "run"
    train(compose("train", [*TOY, "objective=flow", "model.learn_sigma=false", "train.max_steps=4",
                            "train.log_every=4", "train.ckpt_every=0", "train.log_with=[tensorboard]",
                            f"run_dir={rd}"]))
    acc = EventAccumulator(str(rd / "tb"))
    acc.Reload()
    buckets = {t for t in acc.Tags()["scalars"] if t.startswith("kept_fraction_by_t/bucket")}
    # 32 draws of s ~ U(0, 1) fill most of the 10 buckets (all of them in bucket 0 was the bug)
    assert len(buckets) >= 6, buckets


@pytest.mark.parametrize("objective,sampler,steps,calls", [
    ("flow", "heun", 3, 6), ("flow", "euler", 3, 3), ("gaussian", "ddim", 4, 4)])
def test_boundary_maps_cover_every_model_call(objective, sampler, steps, calls):
    from hydra.utils import instantiate
    from dcgen.sample import generate
    cfg = compose("train", [*TOY, f"objective={objective}"] +
                  (["model.learn_sigma=false"] if objective == "flow" else []))
    task = instantiate(cfg.task, _convert_="all")
    obj = instantiate(cfg.objective, _convert_="all")
    from dcgen.train import build_model
    torch.manual_seed(0)
    model = build_model(cfg, task).eval()
    assert obj.model_calls(steps, sampler) == calls
    res = generate(model, obj, task, num_samples=2, steps=steps, sampler=sampler, map_samples=1,
                   map_timesteps=calls)
    assert len(res["ts"]) == calls  # one record per model call
    assert sorted(res["maps"]) == list(range(calls))  # the first and the last call included


def test_the_loop_does_not_import_checkpoint_conversion():
    """Conversion and upcycling (dcgen.compat) load only when init.from_dit asks for them."""
    import subprocess
    import sys
    code = ("import sys, dcgen.train, dcgen.sample, dcgen.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('dcgen.compat')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"


def test_tasks_declare_numbered_samples_truthfully():
    import inspect as _inspect
    from dcgen.tasks.imagenet_latent.task import ImageNetLatentTask
    from dcgen.tasks.pixel.task import PixelTask
    from dcgen.tasks.toy.task import ToyTask
    from dcgen.tasks.video.task import VideoTask
    from dcgen.tasks.voxel.task import VoxelTask
    for cls in (PixelTask, ImageNetLatentTask, ToyTask, VideoTask, VoxelTask):
        takes = "start_index" in _inspect.signature(cls.write_samples).parameters
        assert takes == cls.numbered_samples, cls.__name__
    assert ImageNetLatentTask.numbered_samples
