"""DiT baselines by rule (dcgen/matching.py): token-, parameter- and FLOP-matched within 5 %, and
the overrides it returns train exactly the DiT it measured."""
import math

import pytest

from dcgen.cli import compose
from dcgen.flops import dit_gflops
from dcgen.matching import RULES, baseline, token_matched_patch

TINY = ["model.hidden_size=64", "model.depth=2", "model.num_heads=2"]


def _built(cfg):
    from hydra.utils import instantiate
    from dcgen.train import build_model
    task = instantiate(cfg.task, _convert_="all")
    return build_model(cfg, task), task


@pytest.mark.parametrize("n", [4, 16])
@pytest.mark.parametrize("rule", RULES)
def test_each_rule_matches_within_five_percent_and_its_overrides_build_that_dit(rule, n):
    base = ["experiment=digits_dcdit", *TINY, f"dc.target_n={n}"]
    cfg = compose("train", base)
    b = baseline(cfg, rule)
    dc, task = _built(cfg)
    L = math.prod(dc.token_grid)
    M = round(L / n)
    assert b.kept_tokens == M
    assert b.reference_params == sum(p.numel() for p in dc.parameters())
    assert b.reference_gflops == pytest.approx(dit_gflops(dc, kept_counts=M))
    # the overrides, composed onto the same experiment, train the DiT that was measured
    dit, _ = _built(compose("train", [*base, *b.overrides]))
    assert type(dit).__name__ == "DiT" and not dit.drops_tokens
    assert math.prod(dit.token_grid) == M  # every rule keeps the token-matched sequence length
    assert sum(p.numel() for p in dit.parameters()) == b.params
    assert dit_gflops(dit, batch=1) == pytest.approx(b.gflops)
    if rule == "params":
        assert abs(b.params_error) <= 0.05
    elif rule == "flops":
        assert abs(b.gflops_error) <= 0.05
    else:  # the backbone as it is: same width and depth, no encoder, router or decoder
        assert (dit.blocks[0].mlp.fc1.in_features, len(dit.blocks)) == (64, 2)
        assert b.params < b.reference_params and b.gflops < b.reference_gflops


def test_no_candidate_within_the_tolerance_is_an_error_naming_the_closest():
    cfg = compose("train", ["experiment=digits_dcdit", *TINY])
    with pytest.raises(ValueError, match=r"no DiT within 0% .*closest: (depth|width) \d+"):
        baseline(cfg, "params", tol=1e-9)


def test_token_matching_needs_an_integer_patch_factor():
    assert token_matched_patch((2, 2), (32, 32), 4) == [4, 4]
    assert token_matched_patch((1, 2, 2), (8, 32, 32), 8) == [2, 4, 4]
    with pytest.raises(ValueError, match="integer patch factor"):
        token_matched_patch((2, 2), (32, 32), 8)
    with pytest.raises(ValueError, match="does not divide"):
        token_matched_patch((2, 2), (36, 36), 16)


def test_a_dit_experiment_has_no_baseline_and_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="not a DC-DiT"):
        baseline(compose("train", ["experiment=digits_dit4"]), "flops")
    with pytest.raises(ValueError, match="matching rule"):
        baseline(compose("train", ["experiment=digits_dcdit"]), "tokens")


def test_upcycled_runs_start_from_their_seeds_trained_token_baseline(tmp_path):
    from dcgen.compare import experiment_overrides
    with pytest.raises(SystemExit, match="does not exist yet"):
        experiment_overrides("digits_dcdit@upcycle", TINY, tmp_path, 1)
    teacher = tmp_path / "digits_dcdit@token" / "seed1" / "run" / "export"
    teacher.mkdir(parents=True)
    ov = experiment_overrides("digits_dcdit@upcycle", TINY, tmp_path, 1)
    # patch 2 under a patch-4 teacher: the teacher's position frequencies at half the step
    assert ov == ["experiment=digits_dcdit", *TINY, f"init.from_dit={teacher}", "model.cond_adaptor=true",
                  "model.pe_coord_scale=0.5"]
    cfg = compose("train", ov)
    assert cfg.model.cond_adaptor is True and cfg.init.from_dit == str(teacher)


def test_upcycling_summary_interpolates_the_step_that_reaches_the_scratch_fid():
    from dcgen.compare import upcycling_summary

    def run(fids):
        return {"seeds": {0: {"points": [{"step": s, "evals": [{"tail_drop": 0.0, "cfg_scale": 3.0,
                                                                 "sample_steps": 50, "fid": f}]}
                                         for s, f in fids]}}}
    results = {"e": run([(500, 90.0), (1000, 60.0), (2000, 40.0)]),
               "e@upcycle": run([(500, 50.0), (1000, 30.0), (2000, 20.0)])}
    text = upcycling_summary(results)
    # 50 at 500, 30 at 1000: the scratch run's final 40 is reached half way, at step 750
    assert "at step 750: 2.7x fewer steps" in text
    results["e@upcycle"] = run([(500, 95.0), (2000, 41.0)])
    assert "does not reach e's final fid 40.00" in upcycling_summary(results)
