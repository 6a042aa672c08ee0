"""tools/compare.py end to end in a tiny configuration: two experiments (DC-DiT and DiT/4 on the
digits), two evaluation points, a few samples, FID through a random-weight Inception."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_writes_table_json_and_plots(tmp_path):
    from dcgen.metrics import save_random_inception_weights
    compare = load_tool("compare")
    weights = save_random_inception_weights(tmp_path / "inception.pt")
    out = tmp_path / "cmp"
    tiny = ["model.hidden_size=64", "model.depth=1", "model.num_heads=2", "train.global_batch_size=8",
            "train.log_every=1", "train.ckpt_every=2", "train.log_with=none"]
    assert compare.main(["--experiments", "digits_dcdit", "digits_dit4", "--out", str(out), "--steps", "4",
                         "--eval-every", "2", "--num-samples", "10", "--sample-steps", "2",
                         "--tail-drops", "0", "0.5", "--inception", str(weights), "--reference-limit", "20",
                         "--batch-size", "10", *tiny]) == 0
    summary = json.loads((out / "compare.json").read_text())
    dc, dit = summary["results"]["digits_dcdit"], summary["results"]["digits_dit4"]
    assert [p["step"] for p in dc["points"]] == [2, 4]
    last = dc["points"][-1]["evals"]
    assert [e["tail_drop"] for e in last] == [0.0, 0.5]  # budgets at the last point, DC-DiT only
    assert len(dit["points"][-1]["evals"]) == 1
    for e in last + dit["points"][-1]["evals"]:
        assert e["fid"] >= 0 and 0 <= e["class_accuracy"] <= 1
        assert e["gflops_per_forward"] > 0 and e["tflops_per_image"] > 0
    assert last[1]["tokens_kept_mean"] <= last[0]["tokens_kept_mean"]
    assert last[1]["gflops_per_forward"] <= last[0]["gflops_per_forward"]
    assert dc["seconds_per_step"] > 0
    md = (out / "compare.md").read_text()
    assert "| digits_dcdit | 4 | 0.5 |" in md and "| digits_dit4 | 4 | 0 |" in md
    for name in ("quality_vs_steps.png", "quality_vs_gflops.png"):
        assert (out / name).stat().st_size > 1000
