"""`dcgen compare` end to end in a tiny configuration: two experiments (DC-DiT and DiT/4 on the
digits), two seeds trained side by side, two evaluation points, a few samples, FID through a
random-weight Inception, two guidance scales, boundary maps."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dcgen(*args) -> int:
    from dcgen.cli import main
    return main(["compare", *args])


def overrides(keys) -> str:
    return "train_overrides=[" + ",".join(f"'{k}'" for k in keys) + "]"


def test_compare_writes_table_json_and_plots(tmp_path):
    """Two seeds side by side; the DiT baseline built by the token rule; at the last point tail
    drops, step caching with and without them, a second guidance scale and fewer sampler steps."""
    from dcgen.metrics import save_random_inception_weights
    weights = save_random_inception_weights(tmp_path / "inception.pt")
    out = tmp_path / "cmp"
    tiny = ["model.hidden_size=64", "model.depth=1", "model.num_heads=2", "train.global_batch_size=8",
            "train.log_every=1", "train.ckpt_every=2", "train.log_with=none"]
    assert dcgen("experiments=[digits_dcdit]", "baselines=[token]", f"out={out}", "steps=4", "eval_every=2",
                 "sample.num_samples=6", "sample.steps=2", "tail_drops=[0,0.5]", f"inception={weights}",
                 "reference_limit=12", "sample.batch_size=6", "seeds=[0,1]", "jobs=2", "sample.cfg_scale=2",
                 "extra_cfg_scales=[1]", "cache_thresholds=[1e6]", "extra_sample_steps=[1]", "map_samples=2",
                 "lite_cfg=[0.5]", overrides(tiny)) == 0
    summary = json.loads((out / "compare.json").read_text())
    dc, dit = summary["results"]["digits_dcdit"]["seeds"], summary["results"]["digits_dcdit@token"]["seeds"]
    sizes = summary["models"]
    assert sizes["digits_dcdit@token"]["rule"] == "token" and sizes["digits_dcdit"]["rule"] == "dc-dit"
    assert sizes["digits_dcdit@token"]["params"] < sizes["digits_dcdit"]["params"]
    assert sizes["digits_dcdit"]["gflops"] == 2 * sizes["digits_dcdit"]["gmacs"]  # both conventions
    assert sorted(dc) == sorted(dit) == ["0", "1"]

    def key(e):
        return e["tail_drop"], e["cfg_scale"], e["cache_threshold"], e["sample_steps"]
    for seed in ("0", "1"):
        assert [p["step"] for p in dc[seed]["points"]] == [2, 4]
        last = dc[seed]["points"][-1]["evals"]
        # budgets at the last point (DC-DiT only), with and without the cache; the second scale
        # and the shorter sampler at rho 0; Lite-CFG (the unconditional branch at rho_u 0.5)
        assert [key(e) for e in last] == [(0, 2, None, 2), (0.5, 2, None, 2), (0, 2, 1e6, 2), (0.5, 2, 1e6, 2),
                                          (0, 1, None, 2), (0, 2, None, 1), (0, 2, None, 2)]
        assert [e.get("tail_drop_uncond") for e in last] == [None] * 6 + [0.5]
        # the unconditional branch pruned: fewer FLOPs
        assert last[6]["tflops_per_image"] < last[0]["tflops_per_image"]
        assert [key(e) for e in dit[seed]["points"][-1]["evals"]] == [(0, 2, None, 2), (0, 2, 1e6, 2),
                                                                        (0, 1, None, 2), (0, 2, None, 1)]
        assert [e["cfg_scale"] for e in dc[seed]["points"][0]["evals"]] == [2.0]
        for e in last + dit[seed]["points"][-1]["evals"]:
            assert e["fid"] >= 0 and 0 <= e["class_accuracy"] <= 1
            assert e["gflops_per_forward"] > 0 and e["tflops_per_image"] > 0
        assert last[1]["tokens_kept_mean"] <= last[0]["tokens_kept_mean"]
        assert last[1]["gflops_per_forward"] <= last[0]["gflops_per_forward"]
        # the guided rows pay for two branches, the DiT convention counts one forward
        assert last[0]["tflops_per_image"] > last[4]["tflops_per_image"]
        # half the steps, about half the sampling compute (the router keeps other counts)
        assert 0.4 < last[5]["tflops_per_image"] / last[0]["tflops_per_image"] < 0.6
        # the cache, counted: 2 calls, the second reused; it costs less, the router's counts unchanged
        for row, plain in ((last[2], last[0]), (dit[seed]["points"][-1]["evals"][1], dit[seed]["points"][-1]["evals"][0])):
            assert (row["backbone_calls"], row["backbone_reused"]) == (2, 1)
            assert row["tflops_per_image"] < plain["tflops_per_image"]
            assert row["tokens_kept_mean"] == plain["tokens_kept_mean"]
        assert dc[seed]["seconds_per_step"] > 0
        maps = out / "digits_dcdit" / f"seed{seed}" / "maps"
        assert (maps / "kept_fraction_vs_t.png").is_file() and (maps / "boundary_map_00.png").is_file()
        cost = summary["results"]["digits_dcdit"]["training"][seed]
        assert cost["steps"] == [0, 1, 2, 3, 4] and cost["seconds"][-1] > 0
        dcost = summary["results"]["digits_dcdit@token"]["training"][seed]
        # the DiT's training FLOPs per step are constant: 3 forwards of 8 samples at its GMACs
        assert abs(dcost["train_gflops"][1] - 3 * 2 * 8 * sizes["digits_dcdit@token"]["gmacs"]) < 1e-6
    # two seeds of the same run differ (the seed reaches training and sampling)
    assert dc["0"]["points"][-1]["evals"][0]["fid"] != dc["1"]["points"][-1]["evals"][0]["fid"]
    md = (out / "compare.md").read_text()
    assert "| digits_dcdit | 4 | 0.5 | 2 | – | 2 |" in md and "| digits_dcdit@token | 4 | 0 | 1 | – | 2 |" in md
    assert "| digits_dcdit | 4 | 0.5 | 2 | 1e+06 | 2 |" in md and "| digits_dcdit@token | token |" in md
    assert "| Lite-CFG ρ_u=0.5 |" in md
    assert "At equal training cost" in md and "| digits_dcdit@token | 2 | " in md  # both seeds, equal_cost
    assert " ± " in md  # mean and spread over the two seeds
    kept = json.loads((out / "kept_fraction_vs_t.json").read_text())
    assert list(kept) == ["digits_dcdit"] and kept["digits_dcdit"]["seeds"] == 2  # DC-DiT only, both seeds
    plots = ("quality_vs_steps.png", "quality_vs_training_cost.png", "quality_vs_inference_tflops.png",
             "samples_side_by_side.png", "kept_fraction_vs_t.png")
    for name in plots:
        assert (out / name).stat().st_size > 1000
    # the same runs reported at an equal earlier step, elsewhere; the full report stays as it was
    early = tmp_path / "at2"
    assert dcgen("report=true", "experiments=[digits_dcdit]", "baselines=[token]", "seeds=[0,1]", f"out={out}",
                 "upto_step=2", f"report_to={early}") == 0
    md2 = (early / "compare.md").read_text()
    assert "| digits_dcdit | 2 | 0 | 2 | – | 2 | 2 |" in md2 and "| digits_dcdit@token | 2 | 0 | 2 | – | 2 | 2 |" in md2
    assert "| 4 |" not in md2 and (out / "compare.md").read_text() == md
    for name in plots:
        assert (early / name).stat().st_size > 1000
    # seeds reported apart and merged: the same tables and the same kept-fraction curve as one report
    alone = tmp_path / "seed0"
    assert dcgen("report=true", "experiments=[digits_dcdit]", "baselines=[token]", "seeds=[0]", f"out={out}",
                 f"report_to={alone}", overrides(tiny)) == 0
    both = tmp_path / "merged"
    assert dcgen("report=true", "experiments=[digits_dcdit]", "baselines=[token]", "seeds=[1]", f"out={out}",
                 f"merge=[{alone}]", f"report_to={both}", overrides(tiny)) == 0
    body = (both / "compare.md").read_text().split("\n", 1)[1]
    assert body == md.split("\n", 1)[1] and json.loads((alone / "compare.json").read_text())["seeds"] == [0]
    assert json.loads((both / "compare.json").read_text())["seeds"] == [0, 1]
    kept2 = json.loads((both / "kept_fraction_vs_t.json").read_text())["digits_dcdit"]
    assert kept2["seeds"] == 2 and kept2["kept_fraction"] == pytest.approx(kept["digits_dcdit"]["kept_fraction"])
    # a seed held twice is refused, and so is a file that is not a report
    with pytest.raises(SystemExit, match="seed 0 of digits_dcdit is both"):
        dcgen("report=true", "experiments=[digits_dcdit]", "baselines=[token]", "seeds=[0,1]", f"out={out}",
              f"merge=[{alone}]", f"report_to={tmp_path / 'twice'}")
    (tmp_path / "bad.json").write_text(json.dumps({"results": {"digits_dcdit": {"seeds": {"7": {"points": 3}}}}}))
    with pytest.raises(SystemExit, match="not those of a compare report"):
        dcgen("report=true", "experiments=[digits_dcdit]", "baselines=[token]", "seeds=[1]", f"out={out}",
              f"merge=[{tmp_path / 'bad.json'}]", f"report_to={tmp_path / 'bad'}")


def test_make_shapes_writes_closed_varied_reproducible_meshes(tmp_path):
    import numpy as np
    import trimesh
    shapes = load_tool("make_shapes")
    a = shapes.write_shapes(tmp_path / "a", per_class=2, seed=3)
    b = shapes.write_shapes(tmp_path / "b", per_class=2, seed=3)
    assert len(a) == 2 * len(shapes.CLASSES)
    assert sorted(p.parent.name for p in a) == sorted(list(shapes.CLASSES) * 2)
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()  # the seed decides everything
    meshes = [trimesh.load(p) for p in a]
    assert all(m.is_watertight for m in meshes)
    # two draws of one class differ in proportions (not only in size, which voxelising removes)
    ext = [np.sort(m.extents) / m.extents.max() for m in meshes[:2]]
    assert np.abs(ext[0] - ext[1]).max() > 1e-3


def test_compare_scores_voxels_with_shape_metrics(tmp_path):
    """The voxel comparison: procedural shapes, 1-NNA/COV/MMD instead of FID."""
    shapes = load_tool("make_shapes")
    root = tmp_path / "shapes"
    shapes.write_shapes(root, per_class=2, seed=0)
    out = tmp_path / "cmp"
    tiny = [f"task.root={root}", "task.resolution=8", "model.hidden_size=64", "model.depth=1",
            "model.num_heads=2", "train.global_batch_size=4", "train.log_every=1",
            "train.ckpt_every=2", "train.log_with=none"]
    assert dcgen("experiments=[voxels_dcdit,voxels_dit4]", f"out={out}", "steps=2", "eval_every=2",
                 "sample.num_samples=6", "sample.steps=2", "tail_drops=[0,0.5]", "num_reference=6",
                 "sample.batch_size=6", "map_samples=0", overrides(tiny)) == 0
    summary = json.loads((out / "compare.json").read_text())
    for exp in ("voxels_dcdit", "voxels_dit4"):
        e = summary["results"][exp]["seeds"]["0"]["points"][-1]["evals"][0]
        assert 0 <= e["1nna_cd"] <= 1 and 0 <= e["cov_cd"] <= 1 and e["mmd_cd"] >= 0 and "fid" not in e
    md = (out / "compare.md").read_text()
    assert "1-NNA (CD)" in md and "| voxels_dcdit | 2 | 0.5 |" in md
    assert (out / "quality_vs_inference_tflops.png").stat().st_size > 1000


def test_compare_extends_a_comparison_reusing_scored_points(tmp_path, capsys):
    """A second call with more steps resumes the run and reuses the rows already scored with the
    same sampling settings; a call with other settings scores again."""
    from dcgen.metrics import save_random_inception_weights
    weights = save_random_inception_weights(tmp_path / "inception.pt")
    out = tmp_path / "cmp"
    tiny = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.global_batch_size=4",
            "train.log_every=1", "train.ckpt_every=2", "train.log_with=none"]

    def call(steps, num_samples, scales=("1",), *extra, rc=0):
        assert dcgen("experiments=[digits_dit4]", f"out={out}", f"steps={steps}", "eval_every=2",
                     f"sample.num_samples={num_samples}", "sample.steps=2", f"inception={weights}",
                     "reference_limit=20", "sample.batch_size=10", f"sample.cfg_scale={scales[0]}",
                     f"extra_cfg_scales=[{','.join(scales[1:])}]", "map_samples=0", overrides(tiny), *extra) == rc
        return json.loads((out / "compare.json").read_text())["results"]["digits_dit4"]["seeds"]["0"]

    first = call(2, 6, ("1", "2"))
    row2 = out / "digits_dit4" / "seed0" / "step000002_rho0.00_cfg1" / "row.json"
    stamp = row2.stat().st_mtime_ns
    second = call(4, 6)
    assert [p["step"] for p in second["points"]] == [2, 4]
    assert row2.stat().st_mtime_ns == stamp  # not scored again
    # the step-2 rows, the second scale included, come back unchanged
    assert second["points"][0]["evals"] == first["points"][0]["evals"]
    assert [e["cfg_scale"] for e in second["points"][0]["evals"]] == [1.0, 2.0]
    run_log = (out / "digits_dit4" / "seed0" / "run" / "log.txt").read_text()
    assert "step 4/4" in run_log and "resumed" in run_log
    # a point the run has passed, scored again: with the weights of its kept step-2 checkpoint, not
    # the latest (the same rows as when the run was at step 2) ...
    shutil.rmtree(row2.parent)
    assert call(4, 6, ("1", "2"))["points"][0]["evals"] == first["points"][0]["evals"]
    # other sampling settings: both points scored again; at the last point also another sampler
    # and a guidance interval over half the trajectory
    third = call(4, 8, ("2",), "extra_samplers=[ddim]", "cfg_intervals=[[0.5,1]]")
    assert all(e["num_samples"] == 8 for p in third["points"] for e in p["evals"])
    main, ddim, interval = third["points"][-1]["evals"]
    assert ddim["sampler"] == "ddim" and interval["cfg_interval"] == [0.5, 1.0] and "sampler" not in main
    assert ddim["fid"] != main["fid"]  # (4 steps in, guidance barely moves the samples: not compared)
    # 2 steps, one inside [0.5, 1]: 3 branch-calls instead of 4
    assert interval["tflops_per_image"] == pytest.approx(0.75 * main["tflops_per_image"], rel=1e-6)
    md = (out / "compare.md").read_text()
    assert "| ddim |" in md and "| CFG in [0.5, 1] |" in md
    # a sampler the objective does not have: refused at the first point, before any scoring
    assert dcgen("experiments=[digits_dit4]", f"out={out}", "steps=6", "eval_every=2", "sample.steps=2",
                 "extra_samplers=[sde]", overrides(tiny)) == 2
    assert not list((out / "digits_dit4" / "seed0").glob("step000006_*"))
    # a passed point to score again whose checkpoint is gone: refused, naming the steps
    shutil.rmtree(row2.parent)
    shutil.rmtree(out / "digits_dit4" / "seed0" / "run" / "checkpoints" / "step_00000002")
    call(4, 6, ("1", "2"), rc=2)
    assert "is at step 4, past the evaluation point 2, and keeps no checkpoint of step 2" in capsys.readouterr().err
    assert not row2.exists()


def test_speed_driver_trains_a_copy_and_times_only_the_new_steps(toy6, tmp_path):
    """tools/bench_train_speed.py's pieces: the comparison's runs in order (each DC-DiT before
    its baselines), a copy trained further without touching the original, and seconds per step
    read from the records after a given step only."""
    import hashlib
    from omegaconf import OmegaConf
    from dcgen.compare import copy_run, resume_copy, seconds_per_step, trained_runs
    from dcgen.run import Run

    out = tmp_path / "cmp"
    for e in ["e@flops", "e", "e@upcycle", "e@token", "e@params", "f"]:
        Run(out / e / "seed0" / "run").write_config(OmegaConf.create({}))
    (out / "g" / "seed1" / "run").mkdir(parents=True)  # another seed's run only
    assert list(trained_runs(out, 0)) == ["e", "e@token", "e@params", "e@flops", "e@upcycle", "f"]
    with pytest.raises(SystemExit, match="g has no run of seed 0"):
        trained_runs(out, 0, ["e", "g"])

    def digest(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(Path(root).rglob("*")) if p.is_file()}
    before = digest(toy6)
    copy = copy_run(toy6, tmp_path / "copy")
    start = resume_copy(copy, 4, 1, 2)
    assert start == 6
    records = Run(copy).read_metrics()
    assert [r["step"] for r in records if r["step"] > 6] == [8, 10]
    assert digest(toy6) == before  # the original run is untouched
    # the speed of the new steps only, whatever the old ones were
    timed = Run(tmp_path / "timed")
    timed.write_config(OmegaConf.create({"train": {"global_batch_size": 8}}))
    for step, rate in [(2, 1.0), (4, 10.0), (6, 10.0), (8, 10.0), (10, 80.0), (12, 40.0)]:
        timed.append_metrics({"step": step, "samples_per_s": rate})
    assert seconds_per_step(timed.root) == pytest.approx(8 / 10.0)  # first window dropped
    assert seconds_per_step(timed.root, after_step=8) == pytest.approx(8 / 60.0)


def test_pareto_front_keeps_only_the_rows_nothing_cheaper_beats():
    from dcgen.compare import pareto_front
    costs = [0.020, 0.018, 0.016, 0.017, 0.010, 0.021]
    fids = [88.0, 91.0, 96.0, 99.0, 99.5, 85.0]
    # 0.017/99 loses to 0.016/96; 0.010/99.5 is the cheapest; 0.021/85 the best
    assert pareto_front(costs, fids) == [4, 2, 1, 0, 5]
    assert pareto_front([1.0, 1.0], [3.0, 2.0]) == [1]  # the same cost: only the better one
    assert pareto_front([2.0, 1.0], [3.0, 3.0]) == [1]  # the same score: only the cheaper one


def test_equal_cost_reads_the_dc_dit_at_the_baselines_training_flops_and_time(tmp_path):
    """Hand-made curves: the DC-DiT spends 2 GFLOPs and 1 s per step, the DiT 1 GFLOP and 0.25 s;
    the DC-DiT's FID falls 300 -> 200 -> 100 at steps 500, 1000, 1500."""
    from dcgen.compare import equal_cost, equal_cost_summary

    def runs(points, gflops, seconds, steps=1500):
        grid = list(range(0, steps + 1, 100))
        return {"points": [{"step": k, "evals": [{"tail_drop": 0.0, "cfg_scale": 3.0, "sample_steps": 50, "fid": q}]}
                           for k, q in points]}, \
            {"steps": grid, "train_gflops": [gflops * k for k in grid], "seconds": [seconds * k for k in grid]}

    dc, dc_cost = runs([(500, 300.0), (1000, 200.0), (1500, 100.0)], 2.0, 1.0)
    dit, dit_cost = runs([(1500, 150.0)], 1.0, 0.25)
    results = {"E": {"seeds": {"0": dc}, "training": {"0": dc_cost}},
               "E@token": {"seeds": {"0": dit}, "training": {"0": dit_cost}}}
    (row,) = equal_cost(results)
    assert row["dit"] == [150.0] and row["dit_step"] == [1500]
    # 1500 DiT GFLOPs = DC-DiT step 750: halfway between 300 and 200
    assert row["flops"][0]["step"] == pytest.approx(750) and row["flops"][0]["quality"] == pytest.approx(250)
    # 375 DiT seconds = DC-DiT step 375: before its first point, no value
    assert row["time"][0]["quality"] is None and "before its first point" in row["time"][0]["note"]
    # side-by-side s/step instead of the run clocks: 1500 * 0.8 / 1.0 = step 1200 -> 160
    (row,) = equal_cost(results, {"E": 1.0, "E@token": 0.8})
    assert row["time"][0]["step"] == pytest.approx(1200) and row["time"][0]["quality"] == pytest.approx(160)
    # a DiT that costs more than the DC-DiT's whole run: the DC-DiT's last point, said so
    results["E@flops"] = {"seeds": {"0": runs([(1500, 150.0)], 3.0, 0.25)[0]},
                          "training": {"0": runs([(1500, 150.0)], 3.0, 0.25)[1]}}
    flops_row = equal_cost(results)[1]
    assert flops_row["flops"][0] == {"step": 1500, "quality": 100.0, "note": "whole run"}
    md = equal_cost_summary(results)
    assert "| E@token | 1 | 150.00 (1500) | 250.00 (step 750) | before its first point (step 500, which costs more: 300.00) |" in md
    # the bench tool reads a report (here: a folder holding this compare.json) with s/step saved by
    # an earlier run of it, without timing anything
    import json
    bench = load_tool("bench_train_speed")
    report = tmp_path / "report"
    report.mkdir()
    (report / "compare.json").write_text(json.dumps({"results": results}))
    speeds = tmp_path / "speeds.json"
    speeds.write_text(json.dumps({"out": str(tmp_path / "gone"), "median": {"E": 1.0, "E@token": 0.8, "X": 9.0}}))
    got = bench.main(["--speeds", str(speeds), "--report", str(report), "--json", str(tmp_path / "again.json")])
    assert got["equal_cost"] == equal_cost({e: results[e] for e in ("E", "E@token")}, {"E": 1.0, "E@token": 0.8})
    assert got["equal_cost"][0]["time"][0]["quality"] == pytest.approx(160)
    assert json.loads((tmp_path / "again.json").read_text())["equal_cost"] == got["equal_cost"]
    # saved s/step that name no comparison folder need --report: said so, nothing read
    speeds.write_text(json.dumps({"out": None, "median": {"E": 1.0}}))
    with pytest.raises(SystemExit):
        bench.main(["--speeds", str(speeds)])


def test_kept_vs_t_weights_a_merged_report_by_its_seeds(tmp_path):
    """One seed's maps under the runs (kept 0.2 everywhere) and a merged report whose curve is the
    mean of 3 seeds (kept 0.6): the mean counts 4 seeds, 0.2 once and 0.6 three times."""
    from dcgen.compare import kept_vs_t
    t = [999, 500, 0]
    maps = tmp_path / "runs" / "E" / "seed5" / "maps"
    maps.mkdir(parents=True)
    (maps / "stats.json").write_text(json.dumps({"timesteps": t, "kept_fraction_mean": [0.2, 0.2, 0.2]}))
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "compare.json").write_text("{}")
    (earlier / "kept_fraction_vs_t.json").write_text(json.dumps(
        {"E": {"t": [x / 999 for x in t], "kept_fraction": [0.6, 0.6, 0.6], "seeds": 3}}))
    results = {"E": {"seeds": {0: {}, 1: {}, 2: {}, 5: {}}}}
    assert kept_vs_t(results, tmp_path / "runs", tmp_path, [earlier], {"E": [5]}) is not None
    kept = json.loads((tmp_path / "kept_fraction_vs_t.json").read_text())["E"]
    assert kept["seeds"] == 4 and kept["kept_fraction"] == pytest.approx([0.5, 0.5, 0.5])


def test_only_trains_the_named_experiments_and_an_upcycled_runs_teacher_unscored(tmp_path):
    """only=[E@upcycle]: the token-matched teacher of that seed is trained to the same steps but not
    scored (no rows, no result), the DC-DiT and its other baselines are not trained; a later
    only=[E@token] scores the teacher from its finished run; a name outside the comparison is refused."""
    from omegaconf import OmegaConf
    from dcgen.metrics import save_random_inception_weights
    from dcgen.run import Run
    weights = save_random_inception_weights(tmp_path / "inception.pt")
    out = tmp_path / "cmp"
    tiny = ["model.hidden_size=64", "model.depth=1", "model.num_heads=2", "train.global_batch_size=4",
            "train.log_every=1", "train.ckpt_every=2", "train.log_with=none"]

    def call(*only, rc=0):
        assert dcgen("experiments=[digits_dcdit]", "baselines=[params]", "upcycle=true", f"out={out}", "steps=2",
                     "eval_every=2", "sample.num_samples=4", "sample.steps=2", "tail_drops=[0]",
                     f"inception={weights}", "reference_limit=8", "sample.batch_size=4", "seeds=[1]",
                     "map_samples=0", f"only=[{','.join(only)}]", overrides(tiny)) == rc
        return json.loads((out / "compare.json").read_text())["results"] if rc == 0 else None

    results = call("digits_dcdit@upcycle")
    assert list(results) == ["digits_dcdit@upcycle"] and list(results["digits_dcdit@upcycle"]["seeds"]) == ["1"]
    teacher = out / "digits_dcdit@token" / "seed1"
    assert (teacher / "run" / "export").is_dir() and not (teacher / "result.json").exists()
    assert not list(teacher.glob("step*"))  # not scored
    assert not (out / "digits_dcdit").exists() and not (out / "digits_dcdit@params").exists()
    assert [r["step"] for r in Run(teacher / "run").read_metrics()][-1] == 2
    up = OmegaConf.load(Run(out / "digits_dcdit@upcycle" / "seed1" / "run").config_file)
    assert up.init.from_dit == str(teacher / "run" / "export")
    # the teacher scored later from its finished run (nothing trained again): both rows reported
    stamp = (teacher / "run" / "export").stat().st_mtime_ns
    results = call("digits_dcdit@token")
    assert sorted(results) == ["digits_dcdit@token", "digits_dcdit@upcycle"]
    assert (teacher / "result.json").is_file() and (teacher / "run" / "export").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match=r"only=\['digits_dcdit@flops'\] is not among"):
        call("digits_dcdit@flops")
    with pytest.raises(SystemExit, match="only= trains"):  # a report trains nothing
        dcgen("report=true", "experiments=[digits_dcdit]", "upcycle=true", f"out={out}", "seeds=[1]",
              "only=[digits_dcdit@upcycle]")
