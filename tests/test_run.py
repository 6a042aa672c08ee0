"""The run directory has one owner (dcgen.run): its file names are spelt nowhere else, the
config is rewritten atomically, and the loop's numbers are stored as structured records that
readers use instead of the human log."""
import ast
import json
from pathlib import Path

import pytest

from dcgen.run import (CHECKPOINTS, CONFIG_FILE, EVAL, EVAL_CONFIG_FILE, EXPORT, LOG_FILE, METRICS_FILE,
                       SAMPLE_CONFIG_FILE, SAMPLES, Run)

ROOT = Path(__file__).resolve().parents[1]
NAMES = {CONFIG_FILE, LOG_FILE, METRICS_FILE, CHECKPOINTS, EXPORT, SAMPLES, EVAL}
FILE_NAMES = (CONFIG_FILE, LOG_FILE, METRICS_FILE, SAMPLE_CONFIG_FILE, EVAL_CONFIG_FILE)  # unambiguous wherever they appear


def _path_spellings(path: Path):
    """String constants naming a run-dir entry where a path is built: an operand of `/`, an
    argument of Path()/open()/joinpath(), or any text holding a run-dir file name."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and side.value in NAMES:
                    yield node.lineno, side.value
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            if name in ("Path", "open", "joinpath"):
                for a in node.args:
                    if isinstance(a, ast.Constant) and a.value in NAMES:
                        yield node.lineno, a.value
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            for n in FILE_NAMES:
                if n in node.value:
                    yield node.lineno, node.value


def test_run_dir_names_are_spelt_only_in_the_run_module():
    found = []
    for folder in ("dcgen", "tools"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            if p == ROOT / "dcgen" / "run.py":
                continue
            found += [f"{p.relative_to(ROOT)}:{line}: {text!r}" for line, text in _path_spellings(p)]
    assert not found, "run-dir names spelt outside dcgen/run.py:\n" + "\n".join(found)


def test_the_scan_sees_a_spelling(tmp_path):
    """The scan above is not blind: each form it looks for is found in a written file."""
    f = tmp_path / "m.py"
    f.write_text('from pathlib import Path\nr = Path("x")\na = r / "export"\nb = open("log.txt")\n'
                 'c = Path("samples")\nd = f"{r}/config.yaml"\n')
    assert {v for _, v in _path_spellings(f)} == {"export", "log.txt", "samples", "/config.yaml"}


def test_read_metrics_skips_a_torn_line_and_keeps_the_last_record_of_a_step(tmp_path):
    run = Run(tmp_path)
    run.append_metrics({"step": 2, "loss": 1.0})
    run.append_metrics({"step": 4, "loss": 0.9})
    run.append_metrics({"step": 4, "loss": 0.8})  # a resume repeats step 4
    with open(run.metrics_file, "a") as f:
        f.write('{"step": 6, "loss": 0.')  # killed mid-line
    assert [(r["step"], r["loss"]) for r in run.read_metrics()] == [(2, 1.0), (4, 0.8)]


def test_the_loop_writes_one_metrics_record_per_log_line(tmp_path):
    from test_cluster import TOY, cli
    rd = tmp_path / "run"
    cli(["train", *TOY, "train.max_steps=4", "train.ckpt_every=4", "train.log_every=2", f"run_dir={rd}"])
    recs = Run(rd).read_metrics()
    lines = [ln for ln in Run(rd).log_file.read_text().splitlines() if " | loss " in ln or ln.startswith("step ")]
    assert [r["step"] for r in recs] == [2, 4]
    assert len(lines) == 2
    for rec, line in zip(recs, lines):
        assert f"step {rec['step']}/4" in line
        assert f"loss {rec['loss']:.4f}" in line  # the same number the human line shows
        assert rec["samples_per_s"] > 0 and "kept_fraction" in rec and "lr" in rec
    json.dumps(recs)  # plain JSON numbers


def test_the_config_file_is_replaced_not_rewritten_in_place(tmp_path):
    from omegaconf import OmegaConf
    run = Run(tmp_path / "r")
    run.write_config(OmegaConf.create({"a": 1}))
    with open(run.config_file) as reader:
        run.write_config(OmegaConf.create({"a": 2}))
        assert reader.read() == "a: 1\n"
    assert run.config_file.read_text() == "a: 2\n"
    assert sorted(p.name for p in run.root.iterdir()) == [CONFIG_FILE]  # no temporary file left
