"""Step caching (dcgen/diffusion/caching.py): threshold 0 is sampling without a cache, a positive
threshold skips backbone calls, counted, and the FLOP accounting drops exactly their backbone."""
import pytest
import torch
from hydra.utils import instantiate

from dcgen.cli import compose
from dcgen.evaluate import cost_summary, dc_step_recorder
from dcgen.flops import per_sample_macs
from dcgen.sample import generate
from dcgen.train import build_model

TOY = ["task=toy", "task.grid=[8,8]", "task.num_samples=16", "task.num_classes=4"]
MODELS = {"dcdit": ["model=dcdit_debug"], "dit": ["model=dit_debug", "model.patch_size=2"]}


def _parts(name):
    cfg = compose("train", [*TOY, *MODELS[name]])
    task = instantiate(cfg.task, _convert_="all")
    torch.manual_seed(0)
    model = build_model(cfg, task).eval()
    # a trained-looking model: adaLN-Zero leaves every block the identity at initialisation
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() > 0:
                p.normal_(0, 0.02)
    return model, instantiate(cfg.objective, _convert_="all"), task


KW = dict(num_samples=4, steps=8, sampler="ddim", cfg_scale=2.0, labels=[0, 1, 2, 3], seed=3, batch_size=4)


@pytest.mark.parametrize("name", ["dcdit", "dit"])
def test_threshold_zero_is_sampling_without_a_cache(name):
    model, obj, task = _parts(name)
    ref = generate(model, obj, task, **KW)
    got = generate(model, obj, task, cache_threshold=0.0, **KW)
    assert torch.equal(ref["samples"], got["samples"])
    assert got["backbone_reused"] == 0 and got["backbone_calls"] == 8
    assert torch.equal(ref["kept"], got["kept"])


@pytest.mark.parametrize("name", ["dcdit", "dit"])
def test_a_threshold_skips_backbone_calls_and_their_flops(name):
    model, obj, task = _parts(name)
    branches = 2
    rec = dc_step_recorder(model, branches) if model.drops_tokens else None
    ref = generate(model, obj, task, flop_fn=rec, cache_threshold=0.0, **KW)
    got = generate(model, obj, task, flop_fn=rec, cache_threshold=0.5, **KW)
    n = got["backbone_reused"]
    assert 0 < n < got["backbone_calls"] == 8
    assert int(got["reused"][0].sum()) == n and not bool(got["reused"][:, 0].any())  # the first call runs
    assert not torch.equal(ref["samples"], got["samples"])  # reuse changes the result, a little
    assert (got["samples"] - ref["samples"]).abs().mean() < 0.5 * ref["samples"].abs().mean()
    full = cost_summary(model, ref, branches)["per_image"][:, 0]
    cut = cost_summary(model, got, branches)["per_image"][:, 0]
    if model.drops_tokens:  # a reused call is counted as the DC-DiT at 0 kept tokens
        zero = per_sample_macs(model, torch.zeros(branches * 4))["total"].view(branches, 4).sum(0)
        sf = got["step_flops"][:, :, 0]  # (N, K) MACs per call
        assert torch.equal(sf[got["reused"]], zero[:, None].expand_as(sf)[got["reused"]])
        assert torch.equal(got["step_flops"][:, :, 3], got["kept"] * 64)  # the router's counts still reported
        assert (sf[~got["reused"]] > zero.max()).all()  # a computed call costs its backbone
        assert torch.allclose(torch.as_tensor(cut), sf.sum(1))
        assert (torch.as_tensor(cut) < torch.as_tensor(full)).all()
    else:
        backbone = float(per_sample_macs(model, batch=1)["backbone"][0])
        assert cut == pytest.approx(full - branches * n * backbone)


def test_the_cache_reuses_the_dit_residual_exactly():
    """A reused DiT step adds the cached residual (out - in) of the last computed step to the
    current embedded input: forward twice on the same input with a huge threshold gives the same
    output as the computed forward."""
    from dcgen.diffusion.caching import StepCache, step_caching
    model, _, _ = _parts("dit")
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 10])
    y = torch.tensor([0, 1])
    out, _ = model(x, t, y)
    cache = StepCache(1e9)
    with step_caching(model, cache):
        a, _ = model(x, t, y)
        b, _ = model(x + 0.1, t, y)  # reused: the blocks do not run
    assert cache.reused == 1 and model.step_cache is None
    # threshold 0 never reuses, not even an identical input (relative change exactly 0)
    zero = StepCache(0.0)
    with step_caching(model, zero):
        model(x, t, y)
        model(x, t, y)
    assert zero.calls == 2 and zero.reused == 0
    assert torch.equal(a, out)
    # the reused forward equals embedding x + 0.1 and adding the residual the blocks gave on x
    h0 = model.x_embedder(x) + model.pos_embed
    c = model.conditioning(t, y)
    residual = model.run_blocks(h0, c) - h0
    h1 = model.x_embedder(x + 0.1) + model.pos_embed + residual
    from dcgen.models.layers import unpatchify
    want = unpatchify(model.final_layer(h1, c), model.token_grid, model.patch, model.out_channels)
    assert torch.allclose(b, want, atol=1e-6)


def test_bad_thresholds_are_refused():
    model, obj, task = _parts("dit")
    for bad in (-0.1, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="cache_threshold"):
            generate(model, obj, task, cache_threshold=bad, **KW)
