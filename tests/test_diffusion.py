"""Objectives, samplers and CFG (dcgen.diffusion). CPU, tiny shapes.

Reference numbers are computed here independently (numpy/scipy closed forms), never through the
module's own helpers.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.stats import norm

from dcgen.diffusion import (FlowMatching, GaussianDiffusion, build_objective, guided_model,
                             space_timesteps)

GRIDS = {1: (6,), 2: (3, 4), 3: (2, 3, 2)}


# --------------------------------------------------------------------------------------------
# Stand-in models
# --------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Pointwise (1x1) net over channels for any grid rank, with timestep and label embeddings
    and an optional learned-σ head (v squashed to [-1, 1])."""

    def __init__(self, C=2, num_classes=3, learn_sigma=True, hidden=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.C, self.learn_sigma = C, learn_sigma
        self.inp = nn.Linear(C, hidden)
        self.y_emb = nn.Embedding(num_classes + 1, hidden)
        self.out = nn.Linear(hidden, 2 * C if learn_sigma else C)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        self.calls = []

    def forward(self, x, t, y, tail_drop=0.0):
        self.calls.append({"B": x.shape[0], "t": t.clone(), "y": None if y is None else y.clone(),
                           "tail_drop": tail_drop})
        B, n = x.shape[0], x.dim() - 2
        h = self.inp(x.movedim(1, -1))                                  # (B, *G, H)
        e = torch.sin(t.to(h.dtype)[:, None] / 1000.0 * torch.arange(1, h.shape[-1] + 1, dtype=h.dtype))
        if y is not None:
            e = e + self.y_emb(y)
        h = torch.tanh(h + e.view(B, *([1] * n), -1))
        out = self.out(h).movedim(-1, 1)                                # (B, C|2C, *G)
        if self.learn_sigma:
            out = torch.cat([out[:, :self.C], torch.tanh(out[:, self.C:])], dim=1)
        return out, []


class FixedOut(nn.Module):
    """Returns given ε and v as trainable parameters, ignoring its input."""

    def __init__(self, eps, v):
        super().__init__()
        self.eps, self.v = nn.Parameter(eps.clone()), nn.Parameter(v.clone())
        self.seen_t = None

    def forward(self, x, t, y, tail_drop=0.0):
        self.seen_t = t
        return torch.cat([self.eps, self.v], dim=1), []


def ref_alphas_cumprod():
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


# --------------------------------------------------------------------------------------------
# Hybrid loss
# --------------------------------------------------------------------------------------------


def test_hybrid_loss_matches_closed_forms():
    g = torch.Generator().manual_seed(1)
    B, C, G = 4, 2, (5,)
    t = torch.tensor([0, 1, 500, 999])
    x0 = torch.rand((B, C, *G), generator=g, dtype=torch.float64) * 2 - 1
    x0[0, 0, 0], x0[0, 1, 0] = -1.0, 1.0                                # edge bins at t = 0
    noise = torch.randn((B, C, *G), generator=g, dtype=torch.float64)
    eps = noise + 0.3 * torch.randn((B, C, *G), generator=g, dtype=torch.float64)
    v = torch.rand((B, C, *G), generator=g, dtype=torch.float64) * 2 - 1
    model = FixedOut(eps, v)
    diff = GaussianDiffusion()
    terms, aux = diff.training_losses(model, x0, None, t=t, noise=noise)
    assert aux == [] and set(terms) == {"loss", "mse", "vb"}

    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    x0n, nn_, en, vn = (a.numpy() for a in (x0, noise, eps, v))
    want_vb, want_mse = [], []
    for b, tb in enumerate(t.tolist()):
        a, beta = abar[tb], betas[tb]
        a_prev = abar[tb - 1] if tb > 0 else 1.0
        xt = math.sqrt(a) * x0n[b] + math.sqrt(1 - a) * nn_[b]
        var_q = beta * (1 - a_prev) / (1 - a)
        var_q_clip = betas[1] * (1 - abar[0]) / (1 - abar[1]) if tb == 0 else var_q

        def post_mean(x0_):
            return (math.sqrt(a_prev) * beta / (1 - a)) * x0_ + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)) * xt

        mu_q = post_mean(x0n[b])
        mu_p = post_mean((xt - math.sqrt(1 - a) * en[b]) / math.sqrt(a))
        f = (vn[b] + 1) / 2
        var_p = np.exp(f * np.log(beta) + (1 - f) * np.log(var_q_clip))
        if tb == 0:
            sd = np.sqrt(var_p)
            up = norm.cdf(x0n[b] + 1 / 255, mu_p, sd)
            lo = norm.cdf(x0n[b] - 1 / 255, mu_p, sd)
            p = np.where(x0n[b] <= -1 + 1e-9, up, np.where(x0n[b] >= 1 - 1e-9,
                                                          norm.sf(x0n[b] - 1 / 255, mu_p, sd), up - lo))
            want_vb.append(np.mean(-np.log(p)) / np.log(2))
        else:
            # KL(N(μ_q, σ_q²) ‖ N(μ_p, σ_p²)) = log(σ_p/σ_q) + (σ_q² + (μ_q − μ_p)²)/(2σ_p²) − 1/2
            kl = 0.5 * np.log(var_p / var_q) + (var_q + (mu_q - mu_p) ** 2) / (2 * var_p) - 0.5
            want_vb.append(np.mean(kl) / np.log(2))
        want_mse.append(np.mean((nn_[b] - en[b]) ** 2))
    np.testing.assert_allclose(terms["vb"].detach().numpy(), want_vb, rtol=1e-9)
    np.testing.assert_allclose(terms["mse"].detach().numpy(), want_mse, rtol=1e-12)
    np.testing.assert_allclose(terms["loss"].detach().numpy(), np.add(want_vb, want_mse), rtol=1e-9)

    # ADM's tanh-approximated Φ only moves the t = 0 term slightly.
    terms_tanh, _ = GaussianDiffusion(decoder_cdf="tanh").training_losses(model, x0, None, t=t, noise=noise)
    np.testing.assert_allclose(terms_tanh["vb"].detach().numpy(), want_vb, rtol=2e-2)
    np.testing.assert_allclose(terms_tanh["vb"][1:].detach().numpy(), want_vb[1:], rtol=1e-9)


def test_vb_trains_only_v_and_mse_only_eps():
    g = torch.Generator().manual_seed(2)
    B, C, G = 3, 2, (2, 3)
    x0 = torch.rand((B, C, *G), generator=g) * 2 - 1
    model = FixedOut(torch.randn((B, C, *G), generator=g), 0.5 * torch.randn((B, C, *G), generator=g))
    terms, _ = GaussianDiffusion().training_losses(model, x0, None, t=torch.tensor([0, 7, 400]),
                                                   generator=g)
    g_eps, g_v = torch.autograd.grad(terms["vb"].sum(), [model.eps, model.v], allow_unused=True)
    assert (g_eps is None or torch.all(g_eps == 0)) and g_v.abs().sum() > 0
    g_eps, g_v = torch.autograd.grad(terms["mse"].sum(), [model.eps, model.v], allow_unused=True)
    assert (g_v is None or torch.all(g_v == 0)) and g_eps.abs().sum() > 0


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_training_losses_shapes_and_reproducibility(rank):
    C, B = 2, 3
    x0 = torch.randn((B, C, *GRIDS[rank]), generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2])
    model = TinyNet(C)
    diff = GaussianDiffusion()
    a, _ = diff.training_losses(model, x0, y, tail_drop=0.3, generator=torch.Generator().manual_seed(4))
    b, _ = diff.training_losses(model, x0, y, tail_drop=0.3, generator=torch.Generator().manual_seed(4))
    assert all(a[k].shape == (B,) and torch.isfinite(a[k]).all() for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert model.calls[-1]["tail_drop"] == 0.3 and model.calls[-1]["t"].dtype == torch.long
    a["loss"].mean().backward()

    plain = GaussianDiffusion(learn_sigma=False, loss="mse")
    terms, _ = plain.training_losses(TinyNet(C, learn_sigma=False), x0, y)
    assert set(terms) == {"loss", "mse"} and torch.equal(terms["loss"], terms["mse"])


def test_gaussian_bad_arguments():
    with pytest.raises(ValueError, match="hybrid"):
        GaussianDiffusion(learn_sigma=False)
    with pytest.raises(ValueError, match="beta_schedule"):
        GaussianDiffusion(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="channels"):
        GaussianDiffusion().training_losses(TinyNet(2, learn_sigma=False), torch.zeros(1, 2, 4), None)
    with pytest.raises(ValueError, match="t must"):
        GaussianDiffusion().training_losses(TinyNet(2), torch.zeros(1, 2, 4), None, t=torch.tensor([1000]))
    with pytest.raises(ValueError, match="objective"):
        build_objective("score")


# --------------------------------------------------------------------------------------------
# Respacing
# --------------------------------------------------------------------------------------------


def test_space_timesteps_and_respaced_tables():
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999 and kept == sorted(kept)
    assert set(np.diff(kept)) == {4, 5}
    assert space_timesteps(1000, "10") == list(range(0, 1000, 111))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    # Two sections of 50 steps each: 10 from [0, 50), 5 from [50, 100) (ADM example).
    assert space_timesteps(100, "10,5") == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 62, 74, 87, 99]
    with pytest.raises(ValueError):
        space_timesteps(10, "20")
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim7x")

    base = GaussianDiffusion()
    r = base.respaced(250)
    abar = ref_alphas_cumprod()
    np.testing.assert_allclose(r.alphas_cumprod, abar[kept], rtol=1e-12)
    np.testing.assert_array_equal(r.timestep_map, kept)
    assert r.num_timesteps == 250 and base.respaced(None) is base and base.respaced("1000") is base
    # The model receives the ORIGINAL t (no rescaling), also when training on a respaced diffusion.
    model = FixedOut(torch.zeros(2, 1, 3), torch.zeros(2, 1, 3))
    r.training_losses(model, torch.zeros(2, 1, 3), None, t=torch.tensor([1, 249]))
    assert model.seen_t.tolist() == [kept[1], 999]


# --------------------------------------------------------------------------------------------
# Samplers on 1D / 2D / 3D grids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("method", ["ddpm", "ddim", "euler", "heun"])
def test_samplers_shape_finite_deterministic(rank, method):
    C, B = 2, 3
    shape = (B, C, *GRIDS[rank])
    y = torch.tensor([0, 2, 1])
    model = TinyNet(C)
    seen = []

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        cb = lambda i, t, x, out, aux: seen.append((i, t, tuple(x.shape), tuple(out.shape), aux))
        if method == "ddpm":
            budgeted = lambda x, t, y, **k: model(x, t, y, tail_drop=0.5, **k)  # ρ rides with the model
            return GaussianDiffusion().p_sample_loop(budgeted, shape, y, steps=10, generator=g,
                                                     callback=cb)
        if method == "ddim":
            return GaussianDiffusion().ddim_sample_loop(model, shape, y, steps=10, generator=g, callback=cb)
        return FlowMatching().sample(model, shape, y, steps=5, method=method, generator=g, callback=cb)

    a = run(0)
    assert a.shape == shape and torch.isfinite(a).all()
    n_calls = len(seen)
    assert n_calls == {"ddpm": 10, "ddim": 10, "euler": 5, "heun": 10}[method]
    assert all(s[2] == shape and s[3] == (B, 2 * C, *GRIDS[rank]) and s[4] == [] for s in seen)
    if method in ("ddpm", "ddim"):
        assert [s[1] for s in seen] == list(range(999, -1, -111))   # original t, noisiest first
    else:
        assert seen[0][1] == pytest.approx(999.0) and seen[-1][1] == pytest.approx(
            0.0 if method == "heun" else 999.0 / 5)
    assert [s[0] for s in seen] == list(range(n_calls))
    if method == "ddpm":
        assert model.calls[-1]["tail_drop"] == 0.5
    assert torch.equal(a, run(0))
    assert not torch.equal(a, run(1))


def test_ddim_eta_and_given_noise():
    shape = (2, 2, 4)
    model = TinyNet(2)
    diff = GaussianDiffusion()
    z = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    a = diff.ddim_sample_loop(model, shape, None, steps=8, noise=z)
    b = diff.ddim_sample_loop(model, shape, None, steps=8, noise=z, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)                       # η = 0: deterministic given the initial noise
    c = diff.ddim_sample_loop(model, shape, None, steps=8, eta=1.0, noise=z,
                              generator=torch.Generator().manual_seed(9))
    assert torch.isfinite(c).all() and not torch.equal(a, c)


# --------------------------------------------------------------------------------------------
# Analytically known cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixed_variance", ["fixedlarge", "fixedsmall"])
def test_oracle_point_mass_gaussian(fixed_variance):
    """Data = a point mass at x0*: the exact ε-model makes DDPM and DDIM return x0*."""
    abar = torch.from_numpy(ref_alphas_cumprod())
    x_star = torch.tensor([[0.3, -0.7, 0.1], [1.2, 0.0, -0.4]], dtype=torch.float64)    # (C, L)

    def oracle(x, t, y, tail_drop=0.0):
        a = abar[t].view(-1, 1, 1)
        return (x - a.sqrt() * x_star) / (1 - a).sqrt(), []

    diff = GaussianDiffusion(learn_sigma=False, loss="mse", fixed_variance=fixed_variance)
    shape = (3, 2, 3)
    g = torch.Generator().manual_seed(6)
    for steps in (10, 250):
        x = diff.p_sample_loop(oracle, shape, steps=steps, generator=g, dtype=torch.float64)
        assert (x - x_star).abs().max() < 1e-3
    x = diff.ddim_sample_loop(oracle, shape, steps=10, generator=g, dtype=torch.float64)
    assert (x - x_star).abs().max() < 1e-3


def test_oracle_flow():
    """Point mass: Euler never evaluates s = 0 and follows the straight path exactly. Gaussian data
    N(μ, τ²): the exact flow maps noise n to μ + τ·n; Heun is within 1e-3 and beats Euler."""
    x_star = torch.tensor([[0.5, -1.0, 0.25]], dtype=torch.float64)

    def point(x, t, y, tail_drop=0.0):
        s = (t / 999.0).view(-1, 1, 1)
        return (x - x_star) / s, []

    z = torch.randn((2, 1, 3), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x = FlowMatching().sample(point, z.shape, noise=z, steps=7, method="euler")
    assert (x - x_star).abs().max() < 1e-10

    mu, tau = 0.7, 0.5

    def gauss(x, t, y, tail_drop=0.0):
        s = (t / 999.0).view(-1, 1, 1)
        var = (1 - s) ** 2 * tau ** 2 + s ** 2
        return -mu + (s - (1 - s) * tau ** 2) / var * (x - (1 - s) * mu), []

    err = {m: (FlowMatching().sample(gauss, z.shape, noise=z, steps=50, method=m) - (mu + tau * z)).abs().max()
           for m in ("euler", "heun")}
    assert err["heun"] < 1e-3 and err["heun"] < err["euler"] / 10


# --------------------------------------------------------------------------------------------
# Flow objective
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal"])
def test_flow_training_losses(time_sampling):
    g = torch.Generator().manual_seed(8)
    B, C = 3, 2
    x0, noise = torch.randn((B, C, 2, 3), generator=g), torch.randn((B, C, 2, 3), generator=g)
    model = TinyNet(C)                                                  # emits 2C: extra C ignored
    fm = build_objective("flow", time_sampling=time_sampling)
    terms, aux = fm.training_losses(model, x0, torch.tensor([0, 1, 2]), noise=noise,
                                    generator=torch.Generator().manual_seed(3), tail_drop=0.2)
    t_seen = model.calls[-1]["t"]
    assert t_seen.is_floating_point() and ((t_seen > 0) & (t_seen < 999)).all() and aux == []
    assert model.calls[-1]["tail_drop"] == 0.2
    s = (t_seen / 999.0).view(-1, 1, 1, 1)
    out, _ = model((1 - s) * x0 + s * noise, t_seen, torch.tensor([0, 1, 2]))
    want = ((noise - x0 - out[:, :C]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(terms["mse"], want)
    assert torch.equal(terms["loss"], terms["mse"])
    again, _ = fm.training_losses(model, x0, torch.tensor([0, 1, 2]), noise=noise,
                                  generator=torch.Generator().manual_seed(3))
    assert torch.equal(again["loss"], terms["loss"])
    with pytest.raises(ValueError):
        fm.training_losses(model, x0, None, t=torch.tensor([0, 1, 2]))      # integer flow time
    with pytest.raises(ValueError):
        FlowMatching().sample(model, (1, C, 4), method="rk4")


# --------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------


class LabelModel(nn.Module):
    """Per-sample output that depends on y, with distinct values on every channel; records calls."""

    def __init__(self, learn_sigma=True):
        super().__init__()
        self.learn_sigma, self.calls = learn_sigma, []

    def forward(self, x, t, y, tail_drop=0.0):
        self.calls.append({"B": x.shape[0], "y": y.clone(), "tail_drop": tail_drop})
        C = x.shape[1]
        k = torch.arange(2 * C if self.learn_sigma else C, dtype=x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
        yy = y.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        xx = torch.cat([x, x], 1) if self.learn_sigma else x
        return xx * (1 + 0.1 * (yy + 1) * (k + 1)) + 0.01 * t.to(x.dtype).view_as(yy) + k * yy, ["aux"]


@pytest.mark.parametrize("channels", ["all", "legacy3"])
def test_cfg_combination(channels):
    B, C, null, s = 3, 4, 10, 1.5
    x = torch.randn((B, C, 2, 2), generator=torch.Generator().manual_seed(9))
    t, y = torch.tensor([5, 6, 7]), torch.tensor([1, 4, 2])
    model = LabelModel()
    out, aux = guided_model(model, s, null, cfg_channels=channels)(x, t, y)
    assert aux == ["aux"] and out.shape == (B, 2 * C, 2, 2)
    call = model.calls[-1]
    assert call["B"] == 2 * B and call["y"].tolist() == [1, 4, 2, null, null, null]
    assert torch.equal(call["tail_drop"], torch.zeros(2 * B))
    cond, _ = LabelModel()(x, t, y)
    unc, _ = LabelModel()(x, t, torch.full_like(y, null))
    k = C if channels == "all" else 3
    want = cond.clone()
    want[:, :k] = unc[:, :k] + s * (cond[:, :k] - unc[:, :k])
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    if channels == "legacy3":
        assert torch.equal(out[:, 3:], cond[:, 3:])          # ε channel 3 unguided (DiT quirk)
    else:
        assert not torch.allclose(out[:, 3], cond[:, 3])


def test_cfg_budgets_and_scale_one():
    B, C, null = 2, 3, 5
    x = torch.randn((B, C, 4), generator=torch.Generator().manual_seed(10))
    t, y = torch.tensor([3, 900]), torch.tensor([0, 4])
    model = LabelModel()
    # Lite-CFG: conditional half at ρ_c = 0, unconditional at ρ_u = 0.9, one batched forward.
    guided_model(model, 1.25, null, tail_drop=0.0, tail_drop_uncond=0.9)(x, t, y)
    assert len(model.calls) == 1
    torch.testing.assert_close(model.calls[-1]["tail_drop"], torch.tensor([0.0, 0.0, 0.9, 0.9]))
    # Per-sample ρ_c, ρ_u defaults to ρ_c.
    guided_model(model, 2.0, null, tail_drop=torch.tensor([0.1, 0.3]))(x, t, y)
    torch.testing.assert_close(model.calls[-1]["tail_drop"], torch.tensor([0.1, 0.3, 0.1, 0.3]))
    # One route: the budgets are the wrapper's; a call cannot pass another tail_drop.
    guided_model(model, 2.0, null, tail_drop=0.5, tail_drop_uncond=0.9)(x, t, y)
    torch.testing.assert_close(model.calls[-1]["tail_drop"], torch.tensor([0.5, 0.5, 0.9, 0.9]))
    with pytest.raises(TypeError):
        guided_model(model, 2.0, null)(x, t, y, tail_drop=0.5)
    # Scale 1: exactly the plain forward, batch B.
    out, aux = guided_model(model, 1.0, null, tail_drop=0.4)(x, t, y)
    assert model.calls[-1]["B"] == B and model.calls[-1]["tail_drop"] == 0.4
    plain, _ = LabelModel()(x, t, y, tail_drop=0.4)
    assert torch.equal(out, plain) and aux == ["aux"]
    # Through a sampler, on an ε-only model (C channels), with C = 3 both modes coincide.
    outs = [GaussianDiffusion(learn_sigma=False, loss="mse").ddim_sample_loop(
        guided_model(LabelModel(learn_sigma=False), 1.5, null, cfg_channels=m), (B, C, 4), y, steps=4,
        generator=torch.Generator().manual_seed(0)) for m in ("all", "legacy3")]
    assert torch.equal(outs[0], outs[1]) and torch.isfinite(outs[0]).all()
    with pytest.raises(ValueError):
        guided_model(model, 1.5, null, cfg_channels="first3")
    with pytest.raises(ValueError):
        guided_model(model, 1.5, null)(x, t, None)
