"""Runs that survive a real cluster: requeue with the identical command, preemption signals
(1 process and a real 2-process gloo job), nothing written before the config is valid, readable
logs, the CLI's help and search path, and loading that never builds foreign classes."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dcgen.checkpoint import latest_checkpoint
from dcgen.cli import main
from test_train import final_weights, run_cli

PY = sys.executable
TOY = ["task=toy", "task.grid=[8,8]", "task.num_samples=64", "model=dcdit_debug",
       "train.global_batch_size=8", "train.sample_every=0", "train.log_every=2", "dc.ratio_group_size=4",
       "dc.multi_budget_start_step=2", "train.ema_decay=0.9"]
EXIT_PREEMPTED = 75


def cli(args, env=None, check=True):
    """`dcgen ...` in a subprocess with one thread (test_train.run_cli)."""
    return run_cli(args, env={"OMP_NUM_THREADS": "1", **(env or {})}, check=check)


def assert_same_weights(a_dir, b_dir):
    (ma, ea, ca), (mb, eb, cb) = final_weights(a_dir), final_weights(b_dir)
    assert ca.name == cb.name
    for a, b in ((ma, mb), (ea, eb)):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def snapshot(d: Path) -> dict:
    """Every file under d with its size and mtime: 'untouched' means equal snapshots."""
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*"))}


# ----------------------------------------------------------------------------------------------
# Requeue-safe resume
# ----------------------------------------------------------------------------------------------

def test_identical_command_resumes_after_sigkill_bit_exact(tmp_path, toy6):
    cmd = [*TOY, "train.max_steps=6", "train.ckpt_every=3"]
    ref, crash = toy6, tmp_path / "crash"
    p = cli(["train", *cmd, f"run_dir={crash}"], env={"DCGEN_FAULT_KILL_AFTER_STEP": "3"}, check=False)
    assert p.returncode == -9 and latest_checkpoint(crash).name == "step_00000003"
    p = cli(["train", *cmd, f"run_dir={crash}"])  # the requeued job: the very same command line
    assert "resumed from" in p.stderr
    assert_same_weights(ref, crash)


def test_restart_may_raise_max_steps(tmp_path, toy6):
    ref, run = toy6, tmp_path / "run"
    p = cli(["train", *TOY, "train.max_steps=4", "train.ckpt_every=2", f"run_dir={run}"],
            env={"DCGEN_FAULT_KILL_AFTER_STEP": "2"}, check=False)
    assert p.returncode == -9
    p = cli(["train", *TOY, "train.max_steps=6", "train.ckpt_every=2", f"run_dir={run}"])
    assert "train.max_steps: 4 -> 6" in p.stderr  # said, not silent
    assert_same_weights(ref, run)


def test_config_rewrite_is_atomic_for_a_concurrent_reader(tmp_path):
    """Under DDP a resuming rank reads config.yaml while rank 0 rewrites it (CI caught a rank
    reading a truncated file): the rewrite replaces the file, it never truncates the one a reader
    has open."""
    rd = tmp_path / "run"
    cli(["train", *TOY, "train.max_steps=2", "train.ckpt_every=2", f"run_dir={rd}"])
    with open(rd / "config.yaml") as reader:
        before = reader.read()
        cli(["train", *TOY, "train.max_steps=3", "train.ckpt_every=2", f"run_dir={rd}"])
        reader.seek(0)
        assert reader.read() == before  # the file the reader holds is whole and unchanged
    assert "max_steps: 3" in (rd / "config.yaml").read_text()


@pytest.mark.parametrize("change,keys", [
    (["model=dit_debug"], ["model._target_", "choices.model"]),
    (["task.grid=[4,4]"], ["task.grid"]),
])
def test_restart_with_other_model_or_grid_is_refused_untouched(tmp_path, change, keys):
    rd = tmp_path / "run"
    cli(["train", *TOY, "train.max_steps=2", "train.ckpt_every=2", f"run_dir={rd}"])
    before = snapshot(rd)
    time.sleep(0.01)
    args = [a for a in TOY if not a.startswith(change[0].split("=")[0] + "=")] + change
    p = cli(["train", *args, "train.max_steps=2", "train.ckpt_every=2", f"run_dir={rd}"], check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "started with another config" in lines[0]
    for k in keys:
        assert k in lines[0], (k, lines[0])
    assert snapshot(rd) == before


def test_run_dir_only_resume_and_extend_keeps_working(tmp_path):
    rd = tmp_path / "run"
    cli(["train", *TOY, "train.max_steps=2", "train.ckpt_every=2", f"run_dir={rd}"])
    cli(["train", f"run_dir={rd}", "train.max_steps=4"])
    assert latest_checkpoint(rd).name == "step_00000004"
    p = cli(["train", f"run_dir={rd}", "seed=3"], check=False)  # not a restart key: refused
    assert p.returncode == 2 and "seed" in p.stderr


# ----------------------------------------------------------------------------------------------
# Preemption
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_at_a_step_boundary_and_resume_is_bit_exact(tmp_path, sig, toy6):
    cmd = [*TOY, "train.max_steps=6", "train.ckpt_every=0"]
    ref, run = toy6, tmp_path / "run"
    # a real signal, delivered to the process as step 2 begins (the handler does the rest)
    p = cli(["train", *cmd, f"run_dir={run}"], env={"DCGEN_FAULT_SIGNAL_AT_STEP": f"2:{sig}"}, check=False)
    assert p.returncode == EXIT_PREEMPTED, p.stderr[-2000:]
    assert "preempted" in p.stderr and "rerun the same command" in p.stderr
    ck = latest_checkpoint(run)
    assert ck.name in ("step_00000003", "step_00000004")  # the step boundary after the signal
    cli(["train", *cmd, f"run_dir={run}"])
    assert_same_weights(ref, run)


def test_external_sigterm_mid_training(tmp_path):
    """The signal comes from outside (as from SLURM) while the run is mid-way."""
    rd = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([PY, "-m", "dcgen", "train", *TOY, "train.max_steps=400", "train.ckpt_every=0",
                             "train.log_every=1", f"run_dir={rd}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    log = rd / "log.txt"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "step 3/400" in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    step = int(latest_checkpoint(rd).name.split("_")[1])
    assert 3 <= step < 400


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(args, env=None, timeout=300, script=None):
    """A real 2-process gloo job: two processes with RANK/WORLD_SIZE set (what torchrun sets),
    started directly so that each rank's exit code is seen."""
    port = _free_port()
    procs = []
    for r in range(2):
        e = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                 RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", **(env or {}))
        e.pop("DCGEN_DEBUG", None)
        cmd = [PY, str(script), *args] if script else [PY, "-m", "dcgen", *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a rank hung")
        outs.append((p.returncode, out, err))
    return outs


def test_two_process_sigterm_to_one_rank_stops_both_and_resumes_bit_exact(tmp_path):
    cmd = [*TOY, "train.max_steps=5", "train.ckpt_every=0", "train.log_every=5"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    res = launch_two(["train", *cmd, f"run_dir={ref}"])
    assert all(rc == 0 for rc, _, _ in res), res[0][2][-2000:]
    # only rank 1 is signalled: the collective decision stops rank 0 at the same step
    res = launch_two(["train", *cmd, f"run_dir={run}"], env={"DCGEN_FAULT_SIGNAL_AT_STEP": "1:SIGTERM:1"})
    codes = [rc for rc, _, _ in res]
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], (codes, res[0][2][-1500:], res[1][2][-1500:])
    ck = latest_checkpoint(run)
    assert ck.name == "step_00000003"  # signal in step index 1, decision read one step later
    import json
    assert json.loads((ck / "state.json").read_text())["world"] == 2
    res = launch_two(["train", *cmd, f"run_dir={run}"])
    assert all(rc == 0 for rc, _, _ in res), (res[0][2][-2000:], res[1][2][-2000:])
    assert_same_weights(ref, run)


def test_two_process_nan_on_one_rank_stops_both_with_the_same_message(tmp_path):
    script = tmp_path / "poison.py"
    script.write_text(
        "import os, sys\n"
        "from dcgen.diffusion import GaussianDiffusion\n"
        "orig = GaussianDiffusion.training_losses\n"
        "n = {'calls': 0}\n"
        "def poisoned(self, *a, **k):\n"
        "    terms, aux = orig(self, *a, **k)\n"
        "    n['calls'] += 1\n"
        "    if os.environ['RANK'] == '1' and n['calls'] == 3:\n"
        "        terms['loss'] = terms['loss'] * float('nan')\n"
        "    return terms, aux\n"
        "GaussianDiffusion.training_losses = poisoned\n"
        "from dcgen.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    rd = tmp_path / "run"
    res = launch_two(["train", *TOY, "train.max_steps=8", "train.ckpt_every=0", "train.log_every=8",
                      f"run_dir={rd}"], script=script, timeout=180)
    codes = [rc for rc, _, _ in res]
    assert codes == [2, 2], (codes, res[0][2][-1500:], res[1][2][-1500:])
    msgs = [err.strip().splitlines()[-1] for _, _, err in res]
    assert msgs[0] == msgs[1], msgs
    assert "non-finite loss at step 2 (rank 1)" in msgs[0]
    assert latest_checkpoint(rd) is None


# ----------------------------------------------------------------------------------------------
# Validation before any work; one-line errors; nothing written
# ----------------------------------------------------------------------------------------------

def run_main(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_bad_max_steps_writes_nothing_and_the_corrected_command_trains(tmp_path, capsys):
    rd = tmp_path / "run"
    code, err = run_main(["train", *TOY, "train.max_steps=abc", f"run_dir={rd}"], capsys)
    assert code == 2 and len(err) == 1
    assert "train.max_steps" in err[0] and "'abc'" in err[0] and "integer" in err[0]
    assert not rd.exists()
    cli(["train", *TOY, "train.max_steps=2", f"run_dir={rd}"])
    assert latest_checkpoint(rd).name == "step_00000002"


@pytest.mark.parametrize("cmd,key", [
    (["train", *TOY, "train.grad_accum_steps=0"], "train.grad_accum_steps"),
    (["train", *TOY, "train.global_batch_size=-8"], "train.global_batch_size"),
    (["train", *TOY, "train.mixed_precision=fp32"], "train.mixed_precision"),
    (["sample", "run_dir=R", "num_samples=0"], "num_samples"),
    (["sample", "run_dir=R", "num_samples=abc"], "num_samples"),
    (["sample", "run_dir=R", "steps=0"], "steps"),
    (["sample", "run_dir=R", "cfg_scale=-1"], "cfg_scale"),
    (["sample", "run_dir=R", "tail_drop=1.5"], "tail_drop"),
    (["sample"], "run_dir"),
    (["evaluate", "run_dir=R", "num_samples=0"], "num_samples"),
])
def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, cmd, key):
    monkeypatch.chdir(tmp_path)
    cmd = [a.replace("run_dir=R", f"run_dir={tmp_path / 'R'}") for a in cmd]
    code, err = run_main(cmd + [f"run_dir={tmp_path / 'new'}"] if cmd[0] == "train" else cmd, capsys)
    assert code == 2 and len(err) == 1, err
    assert key in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_group_node_given_a_scalar_names_its_keys(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(["prepare", "task=imagenet_latent", "task.source=/data"], capsys)
    assert code == 2 and len(err) == 1
    assert "'task.source'" in err[0] and "'image_dir'" in err[0] and "'file_list'" in err[0]
    assert "task.source.image_dir=/data" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_prepare_checks_the_image_folder_before_loading_the_vae(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no_such_images"
    # the VAE id does not exist either: the folder must be the first thing checked
    code, err = run_main(["prepare", "task=imagenet_latent", f"task.source.image_dir={missing}",
                          "task.vae=/nonexistent/vae", f"task.cache_dir={tmp_path / 'cache'}"], capsys)
    assert code == 2 and len(err) == 1
    assert "task.source.image_dir" in err[0] and str(missing) in err[0]
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------------------------
# Logs
# ----------------------------------------------------------------------------------------------

def test_redirected_stdout_has_one_plain_line_per_log_step_and_log_txt_the_same(tmp_path):
    rd = tmp_path / "run"
    p = cli(["train", *TOY, "train.max_steps=6", "train.log_every=2", "train.ckpt_every=0", f"run_dir={rd}"])
    assert "\r" not in p.stdout and "\r" not in p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("step ")]
    assert [ln.split(" |")[0] for ln in lines] == ["step 2/6", "step 4/6", "step 6/6"]
    for ln in lines:
        for field in ("loss ", "ratio_loss ", "kept ", "lr ", "samples/s", "ETA "):
            assert field in ln, (field, ln)
    logged = [ln for ln in (rd / "log.txt").read_text().splitlines() if ln.startswith("step ")]
    assert logged == lines


def test_cpu_threads_auto_shares_the_cores():
    from dcgen.train import cpu_threads
    n, why = cpu_threads("auto", local_world=64)
    assert n == 1 and "64 local" in why
    assert cpu_threads(3, local_world=1)[0] == 3


# ----------------------------------------------------------------------------------------------
# CLI conventions
# ----------------------------------------------------------------------------------------------

def test_help_lists_groups_choices_and_keys(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: dcgen train" in out
    assert "task" in out and "*pixel" in out and "toy" in out and "imagenet_latent" in out
    assert "*dcdit_small" in out and "experiment" in out and "dcdit_b_256" in out
    assert "train.max_steps=3000" in out and "train.log_every=25" in out
    assert main(["sample", "--help"]) == 0
    out = capsys.readouterr().out
    assert "num_samples=16" in out and "run_dir=???" in out


def test_cfg_job_prints_the_composed_config(capsys):
    assert main(["train", "--cfg", "job", "task=toy", "train.max_steps=7"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["max_steps"] == 7 and cfg["task"]["_target_"].endswith("ToyTask")
    assert cfg["choices"]["task"] == "toy"


def test_user_search_path_supplies_experiment_model_and_task(tmp_path, capsys):
    user = tmp_path / "myconf"
    (user / "experiment").mkdir(parents=True)
    (user / "model").mkdir()
    (user / "task").mkdir()
    (user / "model" / "tiny32.yaml").write_text("defaults:\n  - dcdit_debug\nhidden_size: 32\n")
    (user / "task" / "toy_small.yaml").write_text("defaults:\n  - toy\ngrid: [4, 4]\nnum_samples: 16\n")
    (user / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /task: toy_small\n  - override /model: tiny32\n"
        "train:\n  max_steps: 7\n")
    sp = f"hydra.searchpath=[file://{user}]"
    assert main(["train", "--cfg", "job", sp, "experiment=mine"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["hidden_size"] == 32 and cfg["task"]["grid"] == [4, 4]
    assert cfg["train"]["max_steps"] == 7 and cfg["choices"]["experiment"] == "mine"
    assert main(["train", "--help", sp]) == 0
    assert "tiny32" in capsys.readouterr().out
    rd = tmp_path / "run"
    cli(["train", sp, "experiment=mine", "train.global_batch_size=4", "train.sample_every=0",
         "dc.ratio_group_size=4", f"run_dir={rd}"])
    assert latest_checkpoint(rd).name == "step_00000007"


# ----------------------------------------------------------------------------------------------
# Loading never builds foreign classes
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    rd = tmp_path_factory.mktemp("exp") / "run"
    cli(["train", *TOY, "train.max_steps=1", f"run_dir={rd}"])
    return rd


def _poison(src: Path, dst: Path, node: str):
    """Copy the run's export and point one node's _target_ at os.system (the model node lives in
    config.json, the task and objective nodes in dcgen.json)."""
    import json
    import shutil
    shutil.copytree(src / "export", dst)
    f = dst / ("config.json" if node == "model" else "dcgen.json")
    cfg = json.loads(f.read_text())
    target = cfg if node == "model" else cfg[node]
    target["_target_"] = "os.system"
    target["command"] = "touch PWNED"
    f.write_text(json.dumps(cfg))


@pytest.mark.parametrize("node", ["task", "objective", "model"])
def test_export_with_foreign_target_is_refused(trained_export, tmp_path, capsys, monkeypatch, node):
    import dcgen
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad"
    _poison(trained_export, bad, node)
    with pytest.raises(ValueError, match="refusing .*os.system"):
        dcgen.load_model(bad)
    for cmd in (["sample", f"run_dir={bad}", "num_samples=1", "steps=1"],
                ["evaluate", f"run_dir={bad}", "num_samples=1", "steps=1"]):
        code, err = run_main(cmd, capsys)
        assert code == 2 and len(err) == 1 and "os.system" in err[0], err
    assert not (tmp_path / "PWNED").exists()


def test_run_dir_config_with_foreign_target_is_refused_on_resume(trained_export, tmp_path, capsys, monkeypatch):
    import shutil
    monkeypatch.chdir(tmp_path)
    rd = tmp_path / "run"
    shutil.copytree(trained_export, rd)
    cfg = yaml.safe_load((rd / "config.yaml").read_text())
    cfg["task"]["_target_"] = "os.system"
    (rd / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, err = run_main(["train", f"run_dir={rd}", "train.max_steps=2"], capsys)
    assert code == 2 and "os.system" in err[0]


@pytest.mark.parametrize("arch", ["dcdit", "dit"])
def test_model_rejects_wrong_grid_and_labels_with_a_clear_error(arch):
    from dcgen.models import DCDiT, DiT
    cls = DCDiT if arch == "dcdit" else DiT
    kw = dict(norm_groups=8) if arch == "dcdit" else dict(patch_size=2)
    m = cls(input_size=(8, 8), in_channels=3, num_classes=10, hidden_size=32, depth=1, num_heads=2, **kw)
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 6\).*\(B, 3, 8, 8\)"):
        m(torch.zeros(2, 3, 8, 6), t, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 10\].*\[3, 11\]"):
        m(torch.zeros(2, 3, 8, 8), t, torch.tensor([3, 11]))
    with pytest.raises(ValueError, match=r"\[0, 10\].*\[-1, 3\]"):
        m(torch.zeros(2, 3, 8, 8), t, torch.tensor([3, -1]))
    out, _ = m(torch.zeros(2, 3, 8, 8), t, torch.tensor([3, 10]))  # 10 = the null label
    assert out.shape[:2] == (2, 6)


def test_a_run_from_before_a_key_existed_resumes_with_the_identical_command(tmp_path):
    """A run dir whose stored config predates keys dcgen added since (here the `repa` node and
    the toy task's `seed`) resumes with the identical command: the new keys come at their
    defaults, the old behaviour. The same key at another value is still refused."""
    rd = tmp_path / "run"
    cmd = [*TOY, "train.ckpt_every=2"]
    main(["train", *cmd, "train.max_steps=2", f"run_dir={rd}"])
    stored = yaml.safe_load((rd / "config.yaml").read_text())
    del stored["repa"], stored["task"]["seed"]
    (rd / "config.yaml").write_text(yaml.safe_dump(stored))
    p = cli(["train", *cmd, "train.max_steps=3", "repa.weight=0.5", "repa.encoder=random:8", f"run_dir={rd}"],
            check=False)
    assert p.returncode == 2 and "repa.weight: '<absent>' -> 0.5" in p.stderr
    p = cli(["train", *cmd, "task.seed=1", "train.max_steps=3", f"run_dir={rd}"], check=False)
    assert p.returncode == 2 and "task.seed: '<absent>' -> 1" in p.stderr
    p = cli(["train", *cmd, "train.max_steps=4", f"run_dir={rd}"])
    assert "resumed from" in p.stderr and latest_checkpoint(rd).name == "step_00000004"
    assert "repa" in yaml.safe_load((rd / "config.yaml").read_text())
