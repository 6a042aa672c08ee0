"""Guidance interval and autoguidance (dcgen/diffusion/guidance.py), through generate() with both
objectives, and the interval through the diffusers pipeline."""
import pytest
import torch
from hydra.utils import instantiate

from dcgen.cli import compose
from dcgen.diffusion.guidance import guided_model
from dcgen.evaluate import cost_summary, dc_step_recorder
from dcgen.sample import generate
from dcgen.train import build_model

TOY = ["task=toy", "task.grid=[8,8]", "task.num_samples=16", "task.num_classes=4"]


def _parts(model_args, objective="gaussian"):
    cfg = compose("train", [*TOY, *model_args, f"objective={objective}"] +
                  (["model.learn_sigma=false"] if objective == "flow" else []))
    task = instantiate(cfg.task, _convert_="all")
    torch.manual_seed(0)
    model = build_model(cfg, task).eval()
    with torch.no_grad():  # leave adaLN-Zero's identity blocks: a model whose label matters
        for p in model.parameters():
            if p.dim() > 0 and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model, instantiate(cfg.objective, _convert_="all"), task


DC = ["model=dcdit_debug"]
DIT = ["model=dit_debug", "model.patch_size=2"]
KW = dict(num_samples=4, steps=6, cfg_scale=3.0, labels=[0, 1, 2, 3], seed=1, batch_size=4)


@pytest.mark.parametrize("objective,sampler", [("gaussian", "ddim"), ("flow", "euler")])
def test_an_interval_over_the_whole_range_is_plain_cfg(objective, sampler):
    model, obj, task = _parts(DC, objective)
    plain = generate(model, obj, task, sampler=sampler, **KW)
    whole = generate(model, obj, task, sampler=sampler, cfg_interval=[0.0, 1.0], **KW)
    assert torch.equal(plain["samples"], whole["samples"])
    assert whole["guided_calls"].all()
    # an interval between two calls' noise levels covers none of them: no guidance at all
    tau = sorted(t / 999 for t in plain["ts"])
    gap = [tau[0] + (tau[1] - tau[0]) / 3, tau[0] + 2 * (tau[1] - tau[0]) / 3]
    none = generate(model, obj, task, sampler=sampler, cfg_interval=gap, **KW)
    cond = generate(model, obj, task, sampler=sampler, **{**KW, "cfg_scale": 1.0})
    assert torch.equal(none["samples"], cond["samples"]) and not none["guided_calls"].any()


def test_an_interval_guides_only_its_calls_and_costs_one_branch_elsewhere():
    model, obj, task = _parts(DC)
    rec = dc_step_recorder(model, 2)
    full = generate(model, obj, task, sampler="ddim", flop_fn=rec, **KW)
    mid = generate(model, obj, task, sampler="ddim", flop_fn=rec, cfg_interval=[0.3, 0.7], **KW)
    ts = torch.tensor(mid["ts"]) / 999
    assert torch.equal(mid["guided_calls"], (ts >= 0.3) & (ts <= 0.7)) and 0 < int(mid["guided_calls"].sum()) < 6
    # the first call (pure noise, outside) equals the unguided model's first step: cost of one branch
    one = mid["step_flops"][:, ~mid["guided_calls"], 0]
    two = mid["step_flops"][:, mid["guided_calls"], 0]
    assert torch.equal(mid["step_flops"][:, ~mid["guided_calls"], 1], one)  # all MACs = the conditional's
    assert (two > mid["step_flops"][:, mid["guided_calls"], 1]).all()
    assert cost_summary(model, mid, 2)["per_image"][:, 0].mean() < cost_summary(model, full, 2)["per_image"][:, 0].mean()
    assert not torch.equal(mid["samples"], full["samples"])
    # the DiT's analytic count: K one-branch forwards plus one more per guided call
    dit, obj, task = _parts(DIT)
    res = generate(dit, obj, task, sampler="ddim", cfg_interval=[0.3, 0.7], **KW)
    from dcgen.flops import per_sample_macs
    one = float(per_sample_macs(dit, batch=1)["total"][0])
    assert cost_summary(dit, res, 2)["per_image"][0, 0] == pytest.approx(one * (6 + int(res["guided_calls"].sum())))


@pytest.mark.parametrize("objective,sampler", [("gaussian", "ddim"), ("flow", "heun")])
def test_autoguidance_by_the_model_itself_is_no_guidance(objective, sampler):
    model, obj, task = _parts(DC, objective)
    cond = generate(model, obj, task, sampler=sampler, **{**KW, "cfg_scale": 1.0})
    self_guided = generate(model, obj, task, sampler=sampler, guide=model, **KW)
    # equal up to the rounding of a 2B-row forward against a B-row one
    a, b = self_guided["samples"], cond["samples"]
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert not torch.allclose(generate(model, obj, task, sampler=sampler, **KW)["samples"], b, rtol=1e-3)


def test_autoguidance_by_a_weaker_model_and_by_itself_at_a_higher_tail_drop():
    model, obj, task = _parts(DC)
    weak, _, _ = _parts(DC[:1] + ["model.hidden_size=32", "model.num_heads=2"])
    x = torch.randn(4, 3, 8, 8)
    t = torch.full((4,), 500)
    y = torch.tensor([0, 1, 2, 3])
    net = guided_model(model, 2.0, None, guide=weak)
    cond = model(x, t, y)[0]
    g = weak(x, t, y)[0]
    out, aux = net(x, t, y)
    assert torch.allclose(out[:, :3], g[:, :3] + 2.0 * (cond[:, :3] - g[:, :3]), atol=1e-6)
    assert aux[0].kept_counts.numel() == 4  # the guide's rows are not the model's aux
    # the model guiding itself at tail drop 0.6: one forward of 2B rows, the second half pruned
    # (a router that keeps most tokens, so that the budget bites)
    with torch.no_grad():
        model.router.residual_scorer[-1].bias.fill_(1.0)
    cond = model(x, t, y)[0]
    net = guided_model(model, 2.0, None, guide=model, guide_tail_drop=0.6)
    out, aux = net(x, t, y)
    pruned = model(x, t, y, tail_drop=0.6)[0]
    assert aux[0].kept_counts.numel() == 8
    assert (aux[0].kept_counts[4:] < aux[0].kept_counts[:4]).all()
    assert torch.allclose(out[:, :3], pruned[:, :3] + 2.0 * (cond[:, :3] - pruned[:, :3]), atol=1e-5)
    # unconditional models can be autoguided too, and a separate guide's FLOPs are not faked
    with pytest.raises(ValueError, match="separate guide"):
        generate(model, obj, task, sampler="ddim", guide=weak, flop_fn=dc_step_recorder(model, 2), **KW)
    # rows at different noise levels: only those inside the interval are guided
    net = guided_model(model, 2.0, 4, interval=[0.3, 0.7])
    tm = torch.tensor([100, 500, 900, 600])
    out = net(x, tm, y)[0]
    full = guided_model(model, 2.0, 4)(x, tm, y)[0]
    plain = model(x, tm, y)[0]
    inside = torch.tensor([False, True, False, True])
    assert torch.allclose(out[inside], full[inside], atol=1e-5)
    assert torch.allclose(out[~inside, :3], plain[~inside, :3], atol=1e-5)
    assert not torch.allclose(full[~inside, :3], plain[~inside, :3], atol=1e-3)
    with pytest.raises(ValueError, match="cfg_interval"):
        guided_model(model, 2.0, 4, interval=[0.8, 0.2])


def test_the_pipeline_takes_the_interval():
    from dcgen.pipeline import DCDiTPipeline, make_scheduler
    model, obj, task = _parts(DC)
    pipe = DCDiTPipeline(transformer=model, scheduler=make_scheduler("ddim", obj), vae=None)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 3, 8, 8, generator=g)

    def run(**kw):
        return pipe(class_labels=[0, 1], num_inference_steps=4, guidance_scale=3.0, latents=lat,
                    output_type="latent", return_dict=False, **kw)[0]
    a = run()
    assert torch.equal(a, run(cfg_interval=[0, 1])) and not torch.equal(a, run(cfg_interval=[0.4, 0.6]))
