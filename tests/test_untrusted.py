"""A shared model never runs code: crafted exports, run dirs and Hub snapshots are refused in one
line (exit 2 through the CLI, a ValueError through the library) and nothing they name runs.

Every payload, if it were built, would create a marker (a directory or a file); each case asserts
that the marker is absent and that the crafted directory gained no file. The payloads follow the
four bypasses of the review (issue 18) and their relatives: module globals reachable under every
prefix the old allow-list accepted, interpolations with resolvers, string nodes parsed as YAML,
Hydra's `_args_`/`_partial_`/`_recursive_`, targets nested in lists and in the model node, a Hub
snapshot, the older single-file export layout and the diffusers pipeline's `from_dcgen`.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from dcgen.cli import main

from test_train import TOY, run_cli

MARK = "MARKER"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rd = tmp_path_factory.mktemp("untrusted") / "run"
    run_cli(["train", *TOY, "train.max_steps=1", "train.ckpt_every=1", f"run_dir={rd}"])
    return rd


def listing(d: Path) -> set:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def run_main(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


# ---- crafted exports (dcgen.json / config.json) ----------------------------------------------

def _maker(marker: str) -> dict:
    return {"_target_": "dcgen.io.os.makedirs", "name": marker}


def edit_extra(key, value):
    def edit(d: Path, marker: str):
        f = d / "dcgen.json"
        cfg = json.loads(f.read_text())
        v = value(marker) if callable(value) else value
        if key is None:
            cfg = v
        else:
            node = cfg
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = v
        f.write_text(json.dumps(cfg))
    return edit


def edit_model(key, value):
    def edit(d: Path, marker: str):
        f = d / "config.json"
        cfg = json.loads(f.read_text())
        cfg[key] = value(marker) if callable(value) else value
        f.write_text(json.dumps(cfg))
    return edit


EXPORT_CASES = {
    # 1. a dotted path under `dcgen.` that reaches a module global (os.makedirs through dcgen.io)
    "task_module_global": edit_extra("task", _maker),
    "task_module_global_checkpoint": edit_extra(
        "task", lambda m: {"_target_": "dcgen.checkpoint.os.makedirs", "name": m}),
    "task_numpy_savetxt": edit_extra(
        "task", lambda m: {"_target_": "dcgen.sample.np.savetxt", "fname": m, "X": [1.0]}),
    "objective_torch_save": edit_extra(
        "objective", lambda m: {"_target_": "dcgen.checkpoint.torch.save", "obj": 1, "f": m}),
    "objective_optim_prefix": edit_extra(
        "objective", lambda m: {"_target_": "torch.optim.optimizer.torch.save", "obj": 1, "f": m}),
    # 3. an interpolation whose resolver would create a node with a target
    "task_resolver": edit_extra(
        "task.seed", lambda m: "${oc.create:{_target_: dcgen.io.os.makedirs, name: %s}}" % m),
    "task_env_resolver": edit_extra("task.seed", "${oc.env:HOME}"),
    # 4. a string where a node is expected (OmegaConf would parse it as YAML)
    "objective_string_node": edit_extra(
        "objective", lambda m: "{_target_: dcgen.io.os.makedirs, name: %s}" % m),
    "task_string_node": edit_extra("task", lambda m: "{_target_: os.makedirs, name: %s}" % m),
    # targets nested in lists and under keys, Hydra's special keys
    "task_nested_list": edit_extra("task.grid", lambda m: [8, _maker(m)]),
    "task_nested_dict": edit_extra("task.extra", _maker),
    "task_args": edit_extra("task", lambda m: {"_target_": "dcgen.io.os.makedirs", "_args_": [m]}),
    "task_args_on_dcgen_class": edit_extra(
        "task", lambda m: {"_target_": "dcgen.tasks.toy.task.ToyTask", "_args_": [_maker(m)]}),
    "objective_partial": edit_extra(
        "objective", lambda m: {"_target_": "dcgen.io.os.makedirs", "_partial_": True, "name": m}),
    "task_recursive": edit_extra(
        "task", lambda m: {"_target_": "dcgen.tasks.toy.task.ToyTask", "_recursive_": True,
                           "grid": _maker(m)}),
    "sample_node_target": edit_extra("sample", _maker),
    "top_level_not_a_mapping": edit_extra(None, lambda m: [_maker(m)]),
    # the model node (config.json)
    "model_foreign": edit_model("_target_", "dcgen.io.os.makedirs"),
    "model_nested": edit_model("norm_groups", _maker),
    "model_resolver": edit_model(
        "hidden_size", lambda m: "${oc.create:{_target_: dcgen.io.os.makedirs, name: %s}}" % m),
}


def _crafted(trained, tmp_path, case) -> tuple[Path, Path]:
    d = tmp_path / "export"
    shutil.copytree(trained / "export", d)
    marker = tmp_path / MARK
    EXPORT_CASES[case](d, str(marker))
    return d, marker


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_crafted_export_is_refused_everywhere(trained, tmp_path, capsys, monkeypatch, case):
    import dcgen
    from dcgen.pipeline import DCDiTPipeline
    monkeypatch.chdir(tmp_path)
    d, marker = _crafted(trained, tmp_path, case)
    before = listing(d)
    for cmd in (["sample", f"run_dir={d}", "num_samples=1", "steps=2"],
                ["evaluate", f"run_dir={d}", "num_samples=1", "steps=2", f"out_dir={tmp_path / 'ev'}"],
                ["export", f"run_dir={d}", f"out_dir={tmp_path / 'exp2'}"]):
        code, err = run_main(cmd, capsys)
        assert code == 2 and len(err) == 1, (cmd, err)
        assert any(w in err[0] for w in ("refusing", "no model description", "mapping")), err
        assert str(d) in err[0], err
        if "string" in case:  # refused as a string, never parsed as YAML
            assert "expected a node" in err[0], err
    with pytest.raises(ValueError, match="refusing|no model description|mapping"):
        dcgen.load_model(d)
    with pytest.raises(ValueError, match="refusing|no model description|mapping"):
        DCDiTPipeline.from_dcgen(d)
    assert not marker.exists()
    assert listing(d) == before
    assert not (tmp_path / "ev").exists() and not (tmp_path / "exp2").exists()


@pytest.mark.parametrize("key,value,why", [
    ("hidden_size", 2 ** 13, "model.safetensors: state dict does not match"),
    ("hidden_size", 2 ** 40, "refusing config.hidden_size=1099511627776: beyond 16384"),
    ("depth", 200_000, "refusing config.depth=200000: beyond 1024"),
    ("num_heads", 0, "cannot build the model: ZeroDivisionError"),
    ("patch_size", 0, "cannot build the model"),
])
def test_bad_model_description_is_refused_without_allocating(trained, tmp_path, capsys, key, value, why):
    """Sizes past the bounds are refused as read; others are built on the meta device and checked
    against the weights' header before anything is allocated; a zero divisor is one line."""
    import resource

    import dcgen
    d = tmp_path / "export"
    shutil.copytree(trained / "export", d)
    edit_model(key, value)(d, "")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=why):
        dcgen.load_model(d)
    code, err = run_main(["sample", f"run_dir={d}", "num_samples=1", "steps=2"], capsys)
    assert code == 2 and len(err) == 1 and why in err[0], err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 500_000  # KiB: < 0.5 GB


def test_old_layout_export_with_foreign_target_is_refused(trained, tmp_path, capsys):
    import dcgen
    d = tmp_path / "old"
    d.mkdir()
    shutil.copy(trained / "export" / "model.safetensors", d)
    model = json.loads((trained / "export" / "config.json").read_text())
    model.pop("_target_")
    model["arch"] = "dcdit"
    extra = json.loads((trained / "export" / "dcgen.json").read_text())
    marker = tmp_path / MARK
    extra["task"] = _maker(str(marker))
    (d / "config.yaml").write_text(yaml.safe_dump({"model": model, **extra}))
    with pytest.raises(ValueError, match="refusing task._target_='dcgen.io.os.makedirs'"):
        dcgen.load_model(d)
    code, err = run_main(["sample", f"run_dir={d}", "num_samples=1", "steps=2"], capsys)
    assert code == 2 and len(err) == 1 and "config.yaml" in err[0], err
    assert not marker.exists()


def test_hub_snapshot_is_checked_like_a_local_export(trained, tmp_path, capsys, monkeypatch):
    """A Hub id resolves to a snapshot in the Hugging Face cache (offline here: the cache layout
    the real download writes); its files are refused like a local export's."""
    import dcgen
    cache = tmp_path / "hub"
    repo = cache / "models--someone--dcdit"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in (trained / "export").iterdir():  # the real layout: snapshot files link to blobs/
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    assert dcgen.load_model("someone/dcdit") is not None  # the intact snapshot loads
    marker = tmp_path / MARK
    for f in snap.iterdir():  # edit the blobs through real files
        target = f.resolve()
        f.unlink()
        shutil.copy(target, f)
    edit_extra("objective", lambda m: "{_target_: dcgen.io.os.makedirs, name: %s}" % m)(snap, str(marker))
    with pytest.raises(ValueError, match="refusing objective="):
        dcgen.load_model("someone/dcdit")
    code, err = run_main(["sample", "run_dir=someone/dcdit", "num_samples=1", "steps=2"], capsys)
    assert code == 2 and len(err) == 1 and "refusing objective=" in err[0], err
    assert not marker.exists()


def test_pipeline_objective_node_is_built_from_the_table_only(tmp_path):
    from dcgen.pipeline import make_scheduler, objective_from_config
    marker = tmp_path / MARK
    for node in ({"_target_": "dcgen.io.os.makedirs", "name": str(marker)},
                 "{_target_: dcgen.io.os.makedirs, name: %s}" % marker,
                 {"_target_": "dcgen.diffusion.GaussianDiffusion", "_args_": [str(marker)]}):
        with pytest.raises(ValueError, match="refusing"):
            objective_from_config(node)
        with pytest.raises(ValueError, match="refusing"):
            make_scheduler("ddpm", node)
    assert not marker.exists()
    assert objective_from_config({"_target_": "dcgen.diffusion.GaussianDiffusion",
                                  "learn_sigma": False, "loss": "mse"}).learn_sigma is False


# ---- crafted run directories (config.yaml) -----------------------------------------------------

def edit_run(key, value):
    def edit(rd: Path, marker: str):
        f = rd / "config.yaml"
        cfg = yaml.safe_load(f.read_text())
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value(marker) if callable(value) else value
        f.write_text(yaml.safe_dump(cfg))
    return edit


RUN_CASES = {
    # 2. the optimizer prefix reached all of torch
    "optim_torch_save": edit_run("optim._target_", "torch.optim.optimizer.torch.save"),
    "optim_makedirs": edit_run("optim", lambda m: {"_target_": "torch.optim.optimizer.os.makedirs",
                                                   "_partial_": False, "name": m}),
    "optim_partial_false": edit_run("optim._partial_", False),
    "task_module_global": edit_run("task", _maker),
    "objective_module_global": edit_run("objective", lambda m: {"_target_": "dcgen.train.os.makedirs",
                                                                "name": m}),
    "model_module_global": edit_run("model._target_", "dcgen.models.dit.torch.save"),
    # 3. interpolations hide nested targets from a check that does not resolve
    "task_resolver": edit_run("task.seed",
                              lambda m: "${oc.create:{_target_: dcgen.io.os.makedirs, name: %s}}" % m),
    "train_resolver": edit_run("train.ema_decay", "${oc.env:HOME}"),
    "string_objective": edit_run("objective", lambda m: "{_target_: dcgen.io.os.makedirs, name: %s}" % m),
    "nested_target_in_dc": edit_run("dc.budgets", lambda m: [0.0, _maker(m)]),
    "target_in_init": edit_run("init", _maker),
}


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_crafted_run_dir_is_refused_on_resume(trained, tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    rd = tmp_path / "run"
    shutil.copytree(trained, rd)
    marker = tmp_path / MARK
    RUN_CASES[case](rd, str(marker))
    before = {p: p.stat().st_mtime_ns for p in rd.rglob("*")}
    code, err = run_main(["train", f"run_dir={rd}", "train.max_steps=2"], capsys)
    assert code == 2 and len(err) == 1, err
    assert "refusing" in err[0] and "config.yaml" in err[0], err
    assert not marker.exists()
    assert {p: p.stat().st_mtime_ns for p in rd.rglob("*")} == before  # nothing written or touched


def test_garbage_run_config_is_one_line(trained, tmp_path, capsys):
    rd = tmp_path / "run"
    shutil.copytree(trained, rd)
    (rd / "config.yaml").write_text("train: [unclosed\n  : : :\n")
    code, err = run_main(["train", f"run_dir={rd}"], capsys)
    assert code == 2 and len(err) == 1 and "not valid YAML" in err[0], err
    (rd / "config.yaml").write_text("- just\n- a list\n")
    code, err = run_main(["train", f"run_dir={rd}"], capsys)
    assert code == 2 and len(err) == 1 and "mapping" in err[0], err


def test_intact_run_dir_still_resumes_and_samples(trained, tmp_path, capsys):
    """The tables admit what dcgen writes: the untouched run resumes from its file alone and its
    export samples."""
    rd = tmp_path / "run"
    shutil.copytree(trained, rd)
    assert main(["train", f"run_dir={rd}", "train.max_steps=2"]) == 0
    assert (rd / "checkpoints" / "step_00000002").is_dir()
    assert main(["sample", f"run_dir={rd}", "num_samples=2", "steps=2", f"out_dir={tmp_path / 's'}"]) == 0
    assert (tmp_path / "s" / "samples.png").is_file()


def test_the_command_line_may_still_name_the_users_own_class(tmp_path, capsys, monkeypatch):
    """Trust comes from where a config came from: a task class of the user's own, named in their
    search-path config, trains; a resume from the run dir's file alone refuses it (the file is
    not trusted) and says how to resume."""
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from dcgen.tasks.toy.task import ToyTask\n"
        "class MyTask(ToyTask):\n    pass\n")
    conf = tmp_path / "conf" / "task"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text("defaults:\n  - toy\n_target_: userpkg.MyTask\ngrid: [8, 8]\n"
                                    "num_samples: 64\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rd = tmp_path / "run"
    args = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "task=mine", *TOY[3:], "train.max_steps=1",
            f"run_dir={rd}"]
    assert main(["train", *args]) == 0
    assert (rd / "checkpoints" / "step_00000001").is_dir()
    code, err = run_main(["train", f"run_dir={rd}", "train.max_steps=2"], capsys)
    assert code == 2 and len(err) == 1 and "userpkg.MyTask" in err[0], err
    args[-2] = "train.max_steps=2"
    assert main(["train", *args]) == 0  # the full command (trusted) resumes it
    assert (rd / "checkpoints" / "step_00000002").is_dir()


def test_hydra_core_is_pinned_to_the_tested_minor():
    """Loading no longer depends on Hydra's own blocklist, but the config machinery is pinned to
    the release line the suite runs on."""
    import hydra
    from importlib.metadata import requires
    req = [r for r in requires("dcgen") if r.startswith("hydra-core")]
    assert req and "<1.4" in req[0], req
    assert hydra.__version__.startswith("1.3.")


def test_checkpoint_pointer_outside_the_run_is_refused(trained, tmp_path, capsys):
    rd = tmp_path / "run"
    shutil.copytree(trained, rd)
    (rd / "checkpoints" / "latest").write_text("../../elsewhere")
    code, err = run_main(["train", f"run_dir={rd}", "train.max_steps=3"], capsys)
    assert code == 2 and "not a step_NNNNNNNN folder" in err[-1], err
    assert not any("Traceback" in e for e in err)



# ---- the run dir's own files: links, special files, damaged checkpoints ---------------------------

def _link(rd: Path, rel: str, target: Path):
    p = rd / rel
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()
    p.parent.mkdir(parents=True, exist_ok=True)
    p.symlink_to(target)


@pytest.mark.parametrize("rel", ["log.txt", "checkpoints/.latest.tmp", "samples", "tb", "config.yaml",
                                 "checkpoints/step_00000001/state.json", "export/dcgen.json"])
def test_links_inside_a_run_dir_are_refused(trained, tmp_path, capsys, rel):
    """A link would send dcgen's writes (log lines, the checkpoint pointer, samples, events) or
    reads to a place the file chose: the run dir is refused, the target untouched."""
    rd = tmp_path / "run"
    shutil.copytree(trained, rd)
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    _link(rd, rel, victim)
    for cmd in (["train", f"run_dir={rd}", "train.max_steps=2"],
                ["sample", f"run_dir={rd}", "num_samples=1", "steps=2"]):
        code, err = run_main(cmd, capsys)
        assert code == 2 and "a symbolic link inside a run or export directory" in err[-1], err
    assert victim.read_text() == "untouched\n"


def test_a_run_dir_of_your_own_may_link_with_the_switch(trained, tmp_path, monkeypatch):
    rd = tmp_path / "run"
    shutil.copytree(trained, rd)
    scratch = tmp_path / "scratch"
    shutil.move(str(rd / "checkpoints"), scratch)
    (rd / "checkpoints").symlink_to(scratch)
    monkeypatch.setenv("DCGEN_ALLOW_RUN_DIR_LINKS", "1")
    assert main(["train", f"run_dir={rd}", "train.max_steps=2"]) == 0
    assert (scratch / "step_00000002").is_dir()


def test_fifo_anchors_and_deep_nesting_are_one_line(trained, tmp_path, capsys):
    import os
    rd = tmp_path / "run"
    shutil.copytree(trained, rd)
    good = (rd / "config.yaml").read_text()
    (rd / "config.yaml").unlink()
    os.mkfifo(rd / "config.yaml")  # a read would hang
    code, err = run_main(["train", f"run_dir={rd}"], capsys)
    assert code == 2 and "not a regular file" in err[-1], err
    (rd / "config.yaml").unlink()
    (rd / "config.yaml").write_text(good + "a0: &a0 [x, x, x]\na1: [*a0, *a0, *a0]\n")
    code, err = run_main(["train", f"run_dir={rd}"], capsys)
    assert code == 2 and "anchors and aliases" in err[-1], err
    (rd / "config.yaml").write_text(good + "extra: " + "[" * 200 + "]" * 200 + "\n")
    code, err = run_main(["train", f"run_dir={rd}"], capsys)
    assert code == 2 and "nested deeper" in err[-1], err
    d = tmp_path / "export"
    shutil.copytree(trained / "export", d)
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    code, err = run_main(["sample", f"run_dir={d}"], capsys)
    assert code == 2 and "not valid JSON" in err[-1], err


@pytest.mark.parametrize("edit,why", [
    ({"dc": None}, "refusing dc=None: expected a section"),
    ({"init": 5}, "refusing init=5: expected a section or null"),
    ({"train.grad_accum_steps": "DELETE"}, "without train.grad_accum_steps"),
])
def test_a_run_config_missing_what_the_loop_reads_is_refused(trained, tmp_path, capsys, edit, why):
    rd = tmp_path / "run"
    shutil.copytree(trained, rd)
    cfg = yaml.safe_load((rd / "config.yaml").read_text())
    for key, value in edit.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        if value == "DELETE":
            del node[leaf]
        else:
            node[leaf] = value
    (rd / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, err = run_main(["train", f"run_dir={rd}", "train.max_steps=2"], capsys)
    assert code == 2 and why in err[-1], err


def test_video_task_from_a_file_may_not_name_a_program(trained, tmp_path, capsys):
    """An I3D or Inception TorchScript runs its own code when loaded: never named by a file."""
    marker = tmp_path / MARK
    for key in ("i3d", "inception_weights"):
        d = tmp_path / key
        shutil.copytree(trained / "export", d)
        edit_extra("task", {"_target_": "dcgen.tasks.video.VideoTask", "root": str(tmp_path),
                            key: str(marker)})(d, "")
        code, err = run_main(["evaluate", f"run_dir={d}", "num_samples=1", f"out_dir={tmp_path / 'ev'}"], capsys)
        assert code == 2 and f"refusing task.{key}=" in err[-1] and "program" in err[-1], err
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["rng", "state", "optimizer"])
def test_malformed_checkpoint_files_are_one_line(trained, tmp_path, capsys, damage):
    import json as _json

    import torch
    rd = tmp_path / "run"
    shutil.copytree(trained, rd)
    ck = rd / "checkpoints" / "step_00000001"
    if damage == "rng":
        torch.save({"global": {"torch": torch.zeros(3)}}, ck / "rng_rank0.pt")
    elif damage == "state":
        st = _json.loads((ck / "state.json").read_text())
        st["num_threads"] = -1
        (ck / "state.json").write_text(_json.dumps(st))
    else:
        torch.save({"state": {}, "param_groups": 5}, ck / "optimizer.pt")
    code, err = run_main(["train", f"run_dir={rd}", "train.max_steps=2"], capsys)
    assert code == 2 and err[-1].startswith("dcgen train: error: no checkpoint of"), err
    assert not any("Traceback" in e for e in err)


def test_checking_an_rng_file_leaves_the_process_generators_alone():
    """check_rng_state restores a candidate checkpoint's state into fresh generators: a resume
    that checks a state and then falls back past it (or re-derives the state) must not have
    changed the process's torch, Python or NumPy generators on the way."""
    import random

    import numpy as np
    import torch

    from dcgen.rng import check_rng_state, rng_state
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    other = rng_state()
    torch.manual_seed(2)
    random.seed(2)
    np.random.seed(2)
    before = (torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy())
    check_rng_state(other)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
