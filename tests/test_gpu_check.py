"""tools/gpu_check.py --smoke: the GPU check's code paths on the CPU, CUDA-only parts skipped."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((tmp_path / "gpu_check").glob("*.json"))
    assert len(files) == 1 and files[0].name.endswith("-smoke.json")
    run = json.loads(files[0].read_text())
    assert run["smoke"] and run["ok"] and run["machine"]["device_type"] == "cpu"
    S = run["sections"]
    # CUDA-only parts are skipped and say why
    assert S["pytest"]["status"] == "skipped" and "CUDA" in S["pytest"]["reason"]
    assert S["ddp"]["status"] == "skipped" and "CUDA" in S["ddp"]["reason"]
    # the rest ran on device cpu
    assert S["chunking"]["status"] == "pass"
    ranks = {len(c["grid"]) for c in S["chunking"]["cases"]}
    assert ranks == {1, 2, 3}
    assert all(c["plug_back"] and c["tail_drop"] and c["router_mask"] for c in S["chunking"]["cases"])
    assert S["attention"]["status"] == "pass"
    rows = S["attention"]["rows"]
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    for r in rows:
        assert r["auto"] == ("sdpa" if r["case"] == "equal" else "loop")
        assert {"auto", "sdpa", "loop", "compiled-op"} <= set(r["backends"])
    runs = S["training"]["runs"]
    assert S["training"]["status"] == "pass" and len(runs) == 4
    assert {(r["model"], r["compiled"]) for r in runs} == {
        ("tiny-dit", False), ("tiny-dcdit", False), ("tiny-dit", True), ("tiny-dcdit", True)}
    assert all(r["samples_per_s"] > 0 and r["finite"] for r in runs)
    assert all("n/a" in r["host_syncs"] for r in runs)
    md = (tmp_path / "performance.md").read_text()
    assert f"## GPU check: {run['machine']['name']} (cpu, smoke)" in md
    assert "| training | pass |" in md


def test_smoke_run_leaves_the_checkout_clean(tmp_path):
    """Without --out the report goes to runs/gpu_check/<time>/ under the current directory; only
    --write-docs touches docs/."""
    def status():
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    before = status()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--smoke", "--only", "chunking"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert status() == before
    reports = list((tmp_path / "runs" / "gpu_check").glob("*/gpu_check/*.json"))
    assert len(reports) == 1 and json.loads(reports[0].read_text())["sections"]["chunking"]["status"] == "pass"
