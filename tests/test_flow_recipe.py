"""The flow recipe of 2026 (dcgen/diffusion/flow.py): timestep shift, v / ε / x targets, the SDE
sampler. Checked against hand-computed values, a reference Euler/Heun loop written here (the
sampler as it was before these options) and Gaussian data whose exact velocity is known."""
import pytest
import torch

from dcgen.diffusion import FlowMatching
from dcgen.diffusion.flow import shift_time

MU, TAU = 0.7, 0.5


def gauss(x, t, y=None, tail_drop=0.0):
    """The exact velocity E[ε − x_0 | x_s] for data N(MU, TAU²) per coordinate."""
    s = (t / 999.0).view(-1, *([1] * (x.dim() - 1)))
    var = (1 - s) ** 2 * TAU ** 2 + s ** 2
    return -MU + (s - (1 - s) * TAU ** 2) / var * (x - (1 - s) * MU), []


def reference(model, z, steps, method):
    """Euler / Heun on the uniform grid 1 - k/steps, the sampler before shift and targets."""
    x = z
    grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    for k in range(steps):
        s, s2 = grid[k], grid[k + 1]
        t = torch.full((z.shape[0],), s * 999.0, dtype=z.dtype)
        v = model(x, t, None)[0]
        if method == "euler":
            x = x + (s2 - s) * v
        else:
            v2 = model(x + (s2 - s) * v, torch.full_like(t, s2 * 999.0), None)[0]
            x = x + (s2 - s) * 0.5 * (v + v2)
    return x


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_shift_one_is_the_sampler_as_it_was_bit_for_bit(method):
    z = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    got = FlowMatching(shift=1.0).sample(gauss, z.shape, noise=z, steps=9, method=method)
    assert torch.equal(got, reference(gauss, z, 9, method))
    # and a shift moves the result
    assert not torch.equal(FlowMatching(shift=3.0).sample(gauss, z.shape, noise=z, steps=9, method=method), got)


def test_the_shift_rule_and_its_resolution_dependence():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_time(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))  # 3s / (1 + 2s)
    f = FlowMatching(shift=2.0, shift_base_numel=4 * 16)
    assert f.effective_shift((8, 4, 16)) == 2.0 and f.effective_shift((8, 4, 8, 8)) == pytest.approx(2.0 * 2.0)
    # training times: the same draw, shifted
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain = FlowMatching(time_sampling="logit_normal").draw_timesteps(64, g1)
    shifted = FlowMatching(time_sampling="logit_normal", shift=3.0).draw_timesteps(64, g2)
    assert torch.allclose(shifted, shift_time(plain, 3.0)) and (shifted >= plain).all()
    with pytest.raises(ValueError, match="data shape"):
        f.draw_timesteps(4, torch.Generator())
    for bad in ({"shift": 0}, {"target": "score"}, {"sde_diffusion": "cosine"}, {"sde_norm": -1}):
        with pytest.raises(ValueError):
            FlowMatching(**bad)


def test_targets_agree_on_a_hand_checked_case():
    x0, eps, s = torch.tensor([[[1.0]]]), torch.tensor([[[3.0]]]), 0.25
    x_s = FlowMatching.interpolate(x0, torch.tensor([s]), eps)
    assert x_s.item() == 1.5  # 0.75 * 1 + 0.25 * 3
    for target, pred in (("v", 2.0), ("eps", 3.0), ("x", 1.0)):
        f = FlowMatching(target=target)
        assert f.target_of(x0, eps).item() == pred
        # (3 - 1.5) / 0.75 = 2 and (1.5 - 1) / 0.25 = 2: every parameterisation gives v = ε − x_0
        assert f.velocity_from(torch.tensor([[[pred]]]), x_s, s).item() == pytest.approx(2.0)

        def oracle(x, t, y=None, tail_drop=0.0):
            return f.target_of(x0, eps).expand_as(x), []
        terms, _ = f.training_losses(oracle, x0, t=torch.tensor([s]), noise=eps)
        assert terms["loss"].item() == 0.0


@pytest.mark.parametrize("target", ["eps", "x"])
def test_every_target_samples_the_gaussian_as_the_velocity_does(target):
    f = FlowMatching(target=target)

    def as_target(x, t, y=None, tail_drop=0.0):  # the exact velocity, expressed as ε or x_0
        v = gauss(x, t)[0]
        s = (t / 999.0).view(-1, 1, 1)
        return (x + (1 - s) * v if target == "eps" else x - s * v), []
    z = torch.randn(4, 1, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = f.sample(as_target, z.shape, noise=z, steps=50, method="heun")
    want = FlowMatching().sample(gauss, z.shape, noise=z, steps=50, method="heun")
    assert (got - want).abs().max() < 5e-3


def test_sde_with_zero_diffusion_is_the_euler_ode():
    z = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(2))
    ode = FlowMatching(shift=2.0).sample(gauss, z.shape, noise=z, steps=12, method="euler")
    for form in ("sigma", "sbdm", "constant"):
        sde = FlowMatching(shift=2.0, sde_diffusion=form, sde_norm=0.0).sample(
            gauss, z.shape, noise=z, steps=12, method="sde", generator=torch.Generator().manual_seed(3))
        assert torch.equal(sde, ode)


@pytest.mark.parametrize("form", ["sigma", "constant"])
def test_the_sde_sampler_reaches_the_data_distribution(form):
    """On N(MU, TAU²) data the SDE's samples have the data's mean and spread, and are not the ODE's
    map of the same noise (the noise injected along the way is used)."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(4000, 1, 1, generator=g, dtype=torch.float64)
    f = FlowMatching(sde_diffusion=form)
    x = f.sample(gauss, z.shape, noise=z, steps=100, method="sde", generator=g)
    assert abs(float(x.mean()) - MU) < 0.03 and abs(float(x.std()) - TAU) < 0.03
    assert (x - (MU + TAU * z)).abs().mean() > 0.05  # the ODE would map z to MU + TAU z


def test_the_sde_sampler_keeps_the_call_records():
    calls = []
    z = torch.randn(2, 1, 3)
    FlowMatching().sample(gauss, z.shape, noise=z, steps=5, method="sde", generator=torch.Generator(),
                          callback=lambda i, t, x, out, aux: calls.append((i, t)))
    assert [i for i, _ in calls] == list(range(5)) and FlowMatching.model_calls(5, "sde") == 5
    assert calls[0][1] == pytest.approx(999.0)
