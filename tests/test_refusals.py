"""Bad input and bad luck end cleanly (issue 18): samplers refuse what they cannot do and never
write a non-finite sample; a stop signal never checkpoints a non-finite step; Ctrl-C checkpoints
and resumes bit-exact; previews are checked at start and sample like `dcgen sample`; a torn
checkpoint falls back to the previous one; a failed save leaves nothing behind; every bad value
is one line, exit 2, before any folder exists."""
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcgen.checkpoint import latest_checkpoint
from dcgen.cli import compose, main

from test_train import PY, TOY, assert_identical, final_weights, run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rd = tmp_path_factory.mktemp("refusals") / "run"
    run_cli(["train", *TOY, "train.max_steps=1", f"run_dir={rd}"])
    return rd


def run_main(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def tree(d: Path) -> set:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


# ---- samplers --------------------------------------------------------------------------------

BAD_SAMPLING = [
    (["sampler=dpm++", "steps=1000"], "dpm++ takes 1 to 999 steps"),
    (["sampler=dpm++", "steps=1001"], "dpm++ takes 1 to 999 steps"),
    (["sampler=unipc", "steps=1500"], "unipc takes 1 to 999 steps"),
    (["sampler=dpm++", "steps=2000"], "dpm++ takes 1 to 999 steps"),
    (["steps=5000"], "ddpm takes 1 to 1000 steps"),
    (["sampler=ddim", "steps=1001"], "ddim takes 1 to 1000 steps"),
    (["sampler=euler"], "euler and heun need the flow objective"),
    (["sampler=foo"], "sampler='foo'"),
    (["num_samples=1e20"], "num_samples=1e+20"),
    (["num_samples=1000000000000"], "more than half of this machine's"),
    (["labels=[0,1,2,3]", "num_samples=2"], "4 labels for num_samples=2"),
    (["labels=[7]"], "labels must be class ids in [0, 4)"),
    (["device=foo"], "device='foo'"),
    (["seed=1e20"], "seed=1e+20"),
    (["seed=100000000000000000000"], "seed=100000000000000000000"),
    (["batch_size=0"], "batch_size=0"),
    (["tail_drop=1.5"], "tail_drop=1.5"),
]


@pytest.mark.parametrize("command", ["sample", "evaluate"])
@pytest.mark.parametrize("args,why", BAD_SAMPLING, ids=[" ".join(a) for a, _ in BAD_SAMPLING])
def test_bad_sampling_request_is_one_line_and_writes_nothing(trained, tmp_path, capsys, monkeypatch,
                                                           command, args, why):
    monkeypatch.chdir(tmp_path)
    if command == "evaluate" and args[0].startswith("labels"):
        why = "unknown config key 'labels'"  # evaluate draws its labels (uniform or balanced)
    before = tree(trained)
    out = tmp_path / "out"
    code, err = run_main([command, f"run_dir={trained}", "num_samples=2", *args, f"out_dir={out}"], capsys)
    assert code == 2 and len(err) == 1, err
    assert why in err[0], err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert tree(trained) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_is_one_line(trained, tmp_path, capsys):
    for command in ("sample", "evaluate"):
        code, err = run_main([command, f"run_dir={trained}", "device=cuda", f"out_dir={tmp_path / 'o'}"],
                             capsys)
        assert code == 2 and len(err) == 1 and "no CUDA GPU" in err[0], err
    assert not (tmp_path / "o").exists()


def test_diffusers_samplers_at_their_limit_give_distinct_timesteps_and_finite_samples():
    from dcgen.diffusion import GaussianDiffusion
    from dcgen.pipeline import DiffusersSamplers, make_scheduler, set_timesteps
    obj = DiffusersSamplers(GaussianDiffusion())
    for kind in ("dpm++", "unipc"):
        obj.check_sampler(999, kind)
        ts = set_timesteps(make_scheduler(kind, obj.objective), 999)
        assert len(set(ts)) == len(ts) == 999
        with pytest.raises(ValueError, match="1 to 999"):
            obj.check_sampler(1000, kind)
        with pytest.raises(ValueError, match="distinct timesteps"):  # the scheduler itself
            set_timesteps(make_scheduler(kind, obj.objective), 1000)

    # 999 steps of a model that predicts ε = x_t (a stand-in with the model interface) stay finite
    def net(x, t, y=None, **kw):
        return torch.cat([x * 0.1, torch.zeros_like(x)], 1), []
    x = obj.sample(net, (2, 1, 4, 4), steps=999, method="dpm++", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()


def test_non_finite_samples_are_an_error_and_nothing_is_written(trained, tmp_path, capsys, monkeypatch):
    from dcgen.models import DCDiT
    orig = DCDiT.forward

    def poisoned(self, *a, **k):
        out, aux = orig(self, *a, **k)
        return out * float("nan"), aux

    monkeypatch.setattr(DCDiT, "forward", poisoned)
    for command in ("sample", "evaluate"):
        out = tmp_path / command
        code, err = run_main([command, f"run_dir={trained}", "num_samples=2", "steps=3", f"out_dir={out}"],
                             capsys)
        # (the progress bar shares stderr; the error is one line, the last)
        assert code == 2 and "non-finite values" in err[-1] and not any("Traceback" in e for e in err), err
        assert not out.exists()


def test_tensor_budgets_are_range_checked_like_floats():
    from dcgen.diffusion import guided_model
    from dcgen.models import DCDiT
    from dcgen.pipeline import DCDiTPipeline, make_scheduler
    m = DCDiT(input_size=(8, 8), in_channels=3, num_classes=4, hidden_size=32, depth=1, num_heads=2,
              norm_groups=8)
    for bad in (1.5, torch.tensor([0.0, 1.5]), torch.tensor(-0.1)):
        with pytest.raises(ValueError, match=r"tail_drop must lie in \[0, 1\)"):
            guided_model(m, 2.0, 4, tail_drop=bad)
        with pytest.raises(ValueError, match=r"tail_drop_uncond must lie in \[0, 1\)"):
            guided_model(m, 2.0, 4, tail_drop=0.0, tail_drop_uncond=bad)
    pipe = DCDiTPipeline(m, make_scheduler("ddpm"))
    with pytest.raises(ValueError, match=r"tail_drop must lie in \[0, 1\)"):
        pipe(class_labels=[0, 1], num_inference_steps=2, guidance_scale=2.0, tail_drop=1.5)


# ---- training: previews ----------------------------------------------------------------------

def test_previews_sample_through_the_dcgen_sample_samplers(tmp_path):
    rd = tmp_path / "run"
    run_cli(["train", *TOY, "train.max_steps=2", "train.sample_every=2", "sample.sampler=dpm++",
             "sample.steps=3", "sample.num_samples=2", f"run_dir={rd}"])
    assert (rd / "samples" / "step_00000002" / "samples.png").is_file()


@pytest.mark.parametrize("args,why", [
    (["sample.sampler=foo"], "sample.sampler='foo'"),
    (["sample.batch_size=0"], "sample.batch_size=0"),
    (["sample.tail_drop=1.5"], "sample.tail_drop=1.5"),
    (["sample.sampler=dpm++", "sample.steps=1000"], "dpm++ takes 1 to 999 steps"),
    (["sample.sampler=heun"], "euler and heun need the flow objective"),
])
def test_preview_settings_are_refused_before_the_run_dir_exists(tmp_path, capsys, args, why):
    rd = tmp_path / "run"
    code, err = run_main(["train", *TOY, "train.sample_every=2", *args, f"run_dir={rd}"], capsys)
    assert code == 2 and len(err) == 1 and why in err[0], err
    assert not rd.exists()


# ---- training: signals -----------------------------------------------------------------------

def test_signal_then_non_finite_step_writes_no_checkpoint_after_it(tmp_path, monkeypatch):
    """SIGTERM arrives as step 5 begins; step 6's loss is NaN, and neither is a log or checkpoint
    step, so the stop is read one step late, at the end of step 6. The stop decision (from step
    5's flags) must not checkpoint step 6's weights: the run reports the non-finite loss."""
    from dcgen.diffusion import GaussianDiffusion
    from dcgen.train import NonFiniteLossError, train
    orig = GaussianDiffusion.training_losses
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        terms, aux = orig(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 7:  # step 6 (one micro-step per step, steps count from 0)
            terms["loss"] = terms["loss"] * float("nan")
        return terms, aux

    monkeypatch.setattr(GaussianDiffusion, "training_losses", poisoned)
    monkeypatch.setenv("DCGEN_FAULT_SIGNAL_AT_STEP", "5:SIGTERM")
    rd = tmp_path / "run"
    cfg = compose("train", [*TOY, "train.max_steps=10", "train.ckpt_every=5", "train.log_every=10",
                            f"run_dir={rd}"])
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 6"):
        train(cfg)
    m, e, ck = final_weights(rd)
    assert ck.name == "step_00000005"
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == ["latest", "step_00000005"]
    assert all(torch.isfinite(v).all() for v in [*m.values(), *e.values()])
    exported = load_file(rd / "export" / "model.safetensors")  # the export of step 5
    assert all(torch.isfinite(v).all() for v in exported.values())


def test_sigint_checkpoints_exits_130_and_the_identical_command_resumes_bit_exact(tmp_path, toy6):
    cmd = [*TOY, "train.max_steps=6", "train.ckpt_every=0"]
    ref, run = toy6, tmp_path / "run"
    p = run_cli(["train", *cmd, f"run_dir={run}"], env={"DCGEN_FAULT_SIGNAL_AT_STEP": "2:SIGINT"},
                check=False)
    assert p.returncode == 130, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("dcgen train: interrupted (Ctrl-C): checkpoint")
    assert latest_checkpoint(run).name in ("step_00000003", "step_00000004")
    run_cli(["train", *cmd, f"run_dir={run}"])
    m1, e1, _ = final_weights(ref)
    m2, e2, ck = final_weights(run)
    assert ck.name == "step_00000006"
    assert_identical(m1, m2)
    assert_identical(e1, e2)


def test_a_second_ctrl_c_exits_at_once():
    # (a process-directed signal may land on another thread: wait until the handler has run)
    code = ("import os, signal, time\nfrom dcgen.train import _Signals\ns = _Signals()\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "for _ in range(500):\n    if s.received is not None: break\n    time.sleep(0.01)\n"
            "print('first', s.received, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGINT)\nprint('not reached', flush=True)\n")
    p = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 130 and p.stdout.split() == ["first", str(int(signal.SIGINT))], (p.stdout, p.stderr)


# ---- training: checkpoints -------------------------------------------------------------------

CKPT_RUN = [*TOY, "train.ckpt_every=2", "train.ckpt_keep=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    rd = tmp_path_factory.mktemp("ckpt") / "ref"
    run_cli(["train", *CKPT_RUN, "train.max_steps=6", f"run_dir={rd}"])
    return final_weights(rd)


@pytest.mark.parametrize("damage", ["truncate:model.safetensors", "truncate:optimizer.pt",
                                    "empty:ema.safetensors", "remove:rng_rank0.pt",
                                    "garbage:state.json"])
def test_torn_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, uninterrupted, damage):
    rd = tmp_path / "run"
    run_cli(["train", *CKPT_RUN, "train.max_steps=4", f"run_dir={rd}"])
    how, name = damage.split(":")
    f = rd / "checkpoints" / "step_00000004" / name
    if how == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "empty":
        f.write_bytes(b"")
    elif how == "remove":
        f.unlink()
    else:
        f.write_text("{not json")
    p = run_cli(["train", *CKPT_RUN, "train.max_steps=6", f"run_dir={rd}"])
    notices = [ln for ln in (p.stdout + p.stderr).splitlines() if "falling back to" in ln]
    assert len(notices) == 1 and "step_00000004" in notices[0] and "step_00000002" in notices[0], notices
    assert "resumed from" in (rd / "log.txt").read_text() and "(step 2)" in (rd / "log.txt").read_text()
    m, e, ck = final_weights(rd)
    assert ck.name == "step_00000006"
    assert_identical(m, uninterrupted[0])  # resumed from step 2: the same run, bit for bit
    assert_identical(e, uninterrupted[1])


def test_no_loadable_checkpoint_is_one_line(tmp_path, capsys):
    rd = tmp_path / "run"
    run_cli(["train", *TOY, "train.max_steps=2", "train.ckpt_every=2", f"run_dir={rd}"])
    (rd / "checkpoints" / "step_00000002" / "model.safetensors").write_bytes(b"\0" * 10)
    code, err = run_main(["train", f"run_dir={rd}", "train.max_steps=4"], capsys)
    assert code == 2 and err[-1].startswith("dcgen train: error: no checkpoint of") and "cannot be read" in err[-1]
    assert sum("Traceback" in ln for ln in err) == 0


def test_disk_full_during_a_save_exits_2_and_leaves_no_temporary_folder(tmp_path, capsys, monkeypatch):
    """A stand-in for a full disk: the EMA file's write raises ENOSPC (as save_file would)."""
    import dcgen.checkpoint as ck
    rd = tmp_path / "run"
    run_cli(["train", *TOY, "train.max_steps=2", "train.ckpt_every=2", f"run_dir={rd}"])
    before = final_weights(rd)
    real = ck.save_file

    def full(tensors, filename, *a, **k):
        if str(filename).endswith("ema.safetensors"):
            with open(filename, "wb") as f:
                f.write(b"\0" * 100)  # a partial write, then the error
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(ck, "save_file", full)
    code, err = run_main(["train", f"run_dir={rd}", "train.max_steps=4"], capsys)
    assert code == 2, err
    assert err[-1].startswith("dcgen train: error: cannot write the checkpoint of step 4: No space left"), err
    assert not any(p.name.startswith(".tmp") for p in (rd / "checkpoints").iterdir())
    m, e, ckpt = final_weights(rd)
    assert ckpt.name == "step_00000002"
    assert_identical(m, before[0])


def test_every_checkpoint_file_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    import dcgen.checkpoint as ck
    from dcgen.train import train
    events = []
    real_sync, real_replace = ck.fsync_file, os.replace
    monkeypatch.setattr(ck, "fsync_file", lambda p: (events.append(("fsync", Path(p).name)), real_sync(p)))
    monkeypatch.setattr(ck.os, "replace", lambda a, b: (events.append(("replace", Path(b).name)),
                                                       real_replace(a, b)))
    train(compose("train", [*TOY, "train.max_steps=2", "train.ckpt_every=2", f"run_dir={tmp_path / 'r'}"]))
    first_rename = events.index(("replace", "step_00000002"))
    synced = {name for kind, name in events[:first_rename] if kind == "fsync"}
    assert synced == {"model.safetensors", "ema.safetensors", "optimizer.pt", "state.json", "rng_rank0.pt"}
    assert events.index(("fsync", ".latest.tmp")) < events.index(("replace", "latest"))


def test_max_steps_below_the_checkpoint_changes_nothing(tmp_path, capsys):
    rd = tmp_path / "run"
    run_cli(["train", *TOY, "train.max_steps=4", "train.ckpt_every=2", f"run_dir={rd}"])
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in rd.rglob("*") if p.is_file()}
    code, err = run_main(["train", f"run_dir={rd}", "train.max_steps=2"], capsys)
    assert code == 0 and "past train.max_steps=2: nothing to train" in err[-1], err
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in rd.rglob("*") if p.is_file()} == before
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((rd / "config.yaml").read_text())))
    assert cfg["train"]["max_steps"] == 4


def test_a_changed_thread_count_on_resume_is_said(tmp_path):
    """train.num_threads may change on a restart (a requeue onto another machine), but it
    changes the float summation order: the resume says so."""
    rd = tmp_path / "run"
    run_cli(["train", *TOY, "train.max_steps=2", "train.ckpt_every=2", "train.num_threads=1", f"run_dir={rd}"])
    p = run_cli(["train", f"run_dir={rd}", "train.max_steps=3", "train.num_threads=2"])
    assert "differs from the 1 thread(s) this run started with" in p.stdout + p.stderr
