"""Smoke tests of the benchmark (dcgen.benchmark, driven by tools/bench.py; no performance
assertions: timings depend on the machine)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tools" / "bench.py"


def load_bench():
    import dcgen.benchmark
    return dcgen.benchmark


def test_quick_run_writes_json_and_markdown(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list((tmp_path / "bench").glob("*.json"))
    assert len(files) == 1
    run = json.loads(files[0].read_text())
    assert run["machine"]["device_type"] in ("cpu", "cuda")
    assert run["machine"]["name"] and run["machine"]["threads"] >= 1
    assert run["results"], "no configuration was measured"
    for res in run["results"]:
        assert not res["skipped"], res["skipped"]
        for group in ("forward", "fwd_bwd", "sample_step"):
            for model in ("dit", "dcdit"):
                assert res[group][model]["median_s"] > 0
        assert res["sample_step"]["dcdit_rho0.5"]["median_s"] > 0
        # the forced kept fraction reaches the backbone: ~1/prod(patch) of the grid tokens
        assert abs(res["kept_fraction_mean"] - res["kept_target"]) < 0.05
        shares = res["forward"]["dcdit"]["components_share"]
        assert set(shares) >= {"router", "chunk", "dechunk", "backbone"}
        assert 0 < sum(shares.values()) <= 1.05
        assert res["derived"]["forward_efficiency_ratio"] > 0
        assert set(res["backends"]) == {"sdpa", "loop"} or run["machine"]["device_type"] == "cuda"
    # the attention path `auto` takes with unequal kept lengths, against per-sample and padded
    assert [a["grid"] for a in run["attention_choice"]] == ["image:8x8", "image:16x16"]
    for ac in run["attention_choice"]:
        assert ac["kept"] == ac["lengths"] and len(set(ac["kept"])) > 1
        assert ac["pad_waste"] > 0.3
        for b in ("auto", "loop", "sdpa"):
            assert ac["forward"][b]["median_s"] > 0
        if run["machine"]["device_type"] == "cpu":
            assert ac["auto"] == "loop"  # never the padded path when lengths differ
        assert ac["auto_vs_loop"] > 0 and ac["noise"] >= 0.03
    rows = [r for r in run["targets"] if r["target"] == "attention"]
    assert len(rows) == 2 and all(r["pass"] is not None for r in rows)
    md = (tmp_path / "performance.md").read_text()
    assert "Attention path chosen by `auto`" in md
    assert run["machine"]["name"] in md
    assert "| size | grid | B | model |" in md and "### Targets" in md
    # --render rebuilds the same markdown from the JSON alone
    (tmp_path / "performance.md").unlink()
    proc = subprocess.run([sys.executable, str(BENCH), "--render", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "performance.md").read_text() == md


@pytest.mark.parametrize("batch", [1, 3])
def test_fixed_mask_gives_the_target_density(batch):
    bench = load_bench()
    spec = bench.parse_grid("16x16")
    _, dc = bench.build_models("T", spec, torch.device("cpu"))
    x = torch.randn(batch, spec.channels, *spec.grid)
    t = torch.zeros(batch, dtype=torch.long)
    y = torch.zeros(batch, dtype=torch.long)
    fracs = bench.kept_fractions(0.25, 0.2, batch)
    assert math.isclose(sum(fracs) / batch, 0.25)
    kept = bench.KeptFraction(dc, "mask", fracs, x, t, y)
    with torch.no_grad():
        _, aux = dc(x, t, y)
        _, aux_half = dc(x, t, y, tail_drop=0.5)
    kept.remove()
    counts = aux[0].kept_counts.tolist()
    assert counts == [round(f * spec.L) for f in fracs]
    assert aux[0].kept_mask[:, [0, spec.L - 1]].all()  # corners stay forced
    assert all(h < c for h, c in zip(aux_half[0].kept_counts.tolist(), counts))


def test_attention_lengths_parsing():
    bench = load_bench()
    (spec, lengths), = bench.parse_attn_lengths("64x64:882,351")
    assert spec.grid == (64, 64) and lengths == [882, 351]
    assert len(bench.parse_attn_lengths("32x32:387,226;64x64:882,351")) == 2
    with pytest.raises(ValueError, match="attn-lengths"):
        bench.parse_attn_lengths("8x8:100,3")


def test_grid_parsing_and_matched_patch():
    bench = load_bench()
    assert bench.parse_grid("64x64").dit_patch == (2, 2)
    assert bench.parse_grid("video:8x32x32").dit_patch == (1, 2, 2)
    vox = bench.parse_grid("voxel:32x32x32")
    assert vox.dit_patch == (2, 2, 2) and vox.channels == 1
    with pytest.raises(ValueError, match="unknown grid kind"):
        bench.parse_grid("audio:16x16")
