"""dcgen.pipeline: the diffusers DCDiTPipeline against dcgen's own samplers (METHOD §8, §2.16).

The key property: with a DDPMScheduler and the learned variance, the pipeline reproduces dcgen's
respaced DDPM sampler on the same noise to 1e-5 in fp32 (plain, CFG, Lite-CFG), and DDIM matches
dcgen's DDIM on the uniform respacing both can express.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from diffusers import UniPCMultistepScheduler
from test_flops import randomise

from dcgen.diffusion import GaussianDiffusion, guided_model
from dcgen.diffusion.gaussian import space_timesteps
from dcgen.models import DCDiT, DiT
from dcgen.pipeline import DCDiTPipeline, DiffusersSamplers, make_scheduler
from dcgen.sample import generate

C, GRID, NC = 3, (8, 8), 4
# conv width 32 // 4 = 8: with 8 GroupNorm groups each group is one channel and the norm erases the
# additive (t, y) conditioning of the encoder, so the router's p would not depend on the label
GROUPS = 4
TASK = SimpleNamespace(num_classes=NC, channels=C, grid=GRID)
LABELS = torch.tensor([0, 1, 3])
TOL = 1e-5


def tiny_dcdit(in_channels=C, seed=1):
    """Weights off the zero init (test_flops.randomise) and label embeddings large enough that
    guidance moves the samples by ~0.1 (at DiT's init std 0.02 it moves them by ~1e-3)."""
    net = randomise(DCDiT(input_size=GRID, in_channels=in_channels, num_classes=NC, hidden_size=32,
                          depth=1, num_heads=2, norm_groups=GROUPS), seed)
    with torch.no_grad():
        net.y_embedder.embedding_table.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return net


class Denoiser(nn.Module):
    """A randomised DC-DiT made into a sane ε-predictor: ε = x_t + ε_θ, v = tanh(v_θ).

    A raw random network predicts ε unrelated to x_t, so x̂_0 = (x_t − √(1−ᾱ)ε)/√ᾱ and the
    samples grow to O(500), where fp32 rounding alone exceeds an absolute 1e-5. With ε ≈ x_t the
    samples stay O(1) and the DC-DiT (router, tail dropping, labels) still shapes every step."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        for k in ("num_classes", "in_channels", "out_channels", "token_grid", "patch"):
            setattr(self, k, getattr(net, k))

    def forward(self, x, t, y=None, tail_drop=0.0):
        out, aux = self.net(x, t, y, tail_drop=tail_drop)
        c = x.shape[1]
        return torch.cat([x + out[:, :c], torch.tanh(out[:, c:])], 1), aux


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread only adds contention on a shared machine (conftest sets 2)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    return Denoiser(tiny_dcdit()).eval()


@pytest.fixture(scope="module")
def objective():
    return GaussianDiffusion()


def pipe_for(model, kind, objective, vae=None, **kw):
    pipe = DCDiTPipeline(transformer=model, scheduler=make_scheduler(kind, objective), vae=vae, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


GUIDANCE = {"plain": dict(cfg_scale=1.0), "cfg": dict(cfg_scale=2.0),
            "lite": dict(cfg_scale=1.25, tail_drop=0.0, tail_drop_uncond=0.9)}


def pipe_kwargs(g):
    return dict(guidance_scale=g["cfg_scale"], tail_drop=g.get("tail_drop", 0.0),
                tail_drop_uncond=g.get("tail_drop_uncond"))


@pytest.mark.parametrize("mode", list(GUIDANCE))
def test_ddpm_matches_dcgen_generate(model, objective, mode):
    """Same seed, same labels: the pipeline draws the initial noise and every step's noise from
    the generator in dcgen's order, so it reproduces `generate` without being given the noise."""
    g = GUIDANCE[mode]
    ref = generate(model, objective, TASK, num_samples=3, steps=10, sampler="ddpm", labels=LABELS,
                   seed=5, record=False, **g)["samples"]
    pipe = pipe_for(model, "ddpm", objective)
    out = pipe(LABELS, num_inference_steps=10, generator=torch.Generator().manual_seed(5),
               output_type="latent", **pipe_kwargs(g)).images
    assert out.shape == (3, C, *GRID)
    assert (out - ref).abs().max() < TOL
    img = pipe(LABELS, num_inference_steps=10, generator=torch.Generator().manual_seed(5),
               **pipe_kwargs(g)).images
    assert (img - (ref / 2 + 0.5).clamp(0, 1)).abs().max() < TOL
    # guidance and budgets matter at this tolerance (so a swapped or ignored branch shows)
    if mode != "plain":
        plain = pipe(LABELS, num_inference_steps=10, generator=torch.Generator().manual_seed(5),
                     output_type="latent").images
        assert (plain - ref).abs().max() > 100 * TOL


def test_ddpm_matches_dcgen_on_given_noise(model, objective):
    """latents= and the per-step noise from a separate generator, against objective.sample."""
    noise = torch.randn(3, C, *GRID, generator=torch.Generator().manual_seed(11))
    net = guided_model(model, 2.0, NC, tail_drop=0.0, tail_drop_uncond=0.5)
    ref = objective.sample(net, noise.shape, LABELS, steps=10, method="ddpm", noise=noise.clone(),
                           generator=torch.Generator().manual_seed(3))
    pipe = pipe_for(model, "ddpm", objective)
    out = pipe(LABELS, num_inference_steps=10, guidance_scale=2.0, tail_drop_uncond=0.5,
               latents=noise.clone(), generator=torch.Generator().manual_seed(3),
               output_type="latent").images
    assert list(pipe.scheduler.timesteps) == space_timesteps(1000, 10)[::-1]
    assert (out - ref).abs().max() < TOL


def test_ddim_matches_dcgen(model, objective):
    """diffusers' DDIM steps back by T // K: it matches dcgen's uniform "ddimK" respacing."""
    noise = torch.randn(3, C, *GRID, generator=torch.Generator().manual_seed(2))
    net = guided_model(model, 2.0, NC)
    ref = objective.sample(net, noise.shape, LABELS, steps="ddim10", method="ddim", eta=0.0,
                           noise=noise.clone())
    pipe = pipe_for(model, "ddim", objective)
    out = pipe(LABELS, num_inference_steps=10, guidance_scale=2.0, latents=noise.clone(),
               output_type="latent").images
    assert list(pipe.scheduler.timesteps) == space_timesteps(1000, "ddim10")[::-1]
    assert (out - ref).abs().max() < TOL


@pytest.mark.parametrize("kind", ["dpm++", "unipc"])
def test_multistep_schedulers_run(model, objective, kind):
    pipe = pipe_for(model, kind, objective)
    gen = torch.Generator().manual_seed(0)
    out = pipe(LABELS, num_inference_steps=20, guidance_scale=1.5, generator=gen,
               output_type="latent", return_boundary_maps=True)
    assert out.images.shape == (3, C, *GRID) and torch.isfinite(out.images).all()
    assert len(out.timesteps) == 20 and out.kept_fraction.shape == (3, 20)
    # a solver, not noise: near a 50-step DDIM from the same start (on average: the router's
    # discrete choices let single values jump)
    noise = torch.randn(3, C, *GRID, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ddim = objective.sample(guided_model(model, 1.5, NC), noise.shape, LABELS, steps="ddim50",
                                method="ddim", noise=noise)
    assert (out.images - ddim).abs().mean() < 0.1 * ddim.abs().mean()


def test_generate_through_diffusers_samplers(model, objective):
    """The CLI path: generate() with the objective wrapped. Routed through diffusers' DDPM it
    returns exactly what dcgen's DDPM returns, recording included; dpm++ runs like the pipeline."""
    kw = dict(num_samples=5, steps=10, labels=[0, 1, 2, 3, 1], seed=4, batch_size=3,
              cfg_scale=1.25, tail_drop=0.0, tail_drop_uncond=0.9, map_samples=2, map_timesteps=3)
    ref = generate(model, objective, TASK, sampler="ddpm", **kw)
    got = generate(model, DiffusersSamplers(objective, {"ddpm": "ddpm"}), TASK, sampler="ddpm", **kw)
    assert (got["samples"] - ref["samples"]).abs().max() < TOL
    assert got["ts"] == ref["ts"] and torch.equal(got["kept"], ref["kept"])
    assert sorted(got["maps"]) == sorted(ref["maps"])
    dpm = generate(model, DiffusersSamplers(objective), TASK, sampler="dpm++", **{**kw, "steps": 20})
    assert dpm["samples"].shape == (5, C, *GRID) and dpm["kept"].shape == (5, 20)
    pipe = pipe_for(model, "dpm++", objective)
    gen = torch.Generator().manual_seed(4)
    first = pipe(torch.tensor([0, 1, 2]), num_inference_steps=20, guidance_scale=1.25,
                 tail_drop_uncond=0.9, generator=gen, output_type="latent").images
    assert (dpm["samples"][:3] - first).abs().max() < TOL


def test_boundary_maps_are_the_conditional_rows(objective):
    """One (B, L) map per model call: the router's p of the conditional rows; the kept fraction
    is theirs too (ρ_c = 0 while the unconditional half runs at ρ_u = 0.9)."""
    net = tiny_dcdit(seed=3)
    pipe = pipe_for(net, "ddpm", objective)
    seen = []
    out = pipe(LABELS, num_inference_steps=6, guidance_scale=2.0, tail_drop=0.0,
               tail_drop_uncond=0.9, generator=torch.Generator().manual_seed(0),
               return_boundary_maps=True, output_type="latent",
               callback=lambda i, t, x, o, aux: seen.append((t, x.clone())))
    L = int(np.prod(net.token_grid))
    assert len(out.boundary_maps) == 6 and len(seen) == 6
    assert all(m.shape == (3, L) for m in out.boundary_maps)
    assert out.kept_fraction.shape == (3, 6) and out.timesteps == [t for t, _ in seen]
    for (t, x), p, kept in zip(seen, out.boundary_maps, out.kept_fraction.T):
        with torch.no_grad():  # the conditional rows alone (the pipeline ran them in a batch of 6)
            _, aux = net(x, torch.full((3,), t), LABELS, tail_drop=0.0)
        assert (p - aux[0].boundary_prob).abs().max() < 1e-6
        assert torch.equal(kept, aux[0].kept_counts.double() / L)
        with torch.no_grad():  # the unconditional rows differ, so taking them would show
            _, aux_u = net(x, torch.full((3,), t), torch.full((3,), NC), tail_drop=0.9)
        assert (p - aux_u[0].boundary_prob).abs().max() > 1e-4
        assert not torch.equal(kept, aux_u[0].kept_counts.double() / L)
    dit = DiT(input_size=GRID, in_channels=C, num_classes=NC, hidden_size=32, depth=1,
              num_heads=2, patch_size=2).eval()
    res = pipe_for(dit, "ddpm", objective)(LABELS, num_inference_steps=3, return_boundary_maps=True,
                                           generator=torch.Generator().manual_seed(0))
    assert res.boundary_maps is None and torch.equal(res.kept_fraction, torch.ones(3, 3, dtype=torch.float64))


def tiny_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(16, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                         norm_num_groups=16, sample_size=16).eval()


def test_vae_decodes_latents(objective):
    vae = tiny_vae()  # 2x upsampling: 8x8 latents -> 16x16 images
    model = Denoiser(tiny_dcdit(in_channels=4))
    pipe = pipe_for(model, "ddpm", objective, vae=vae, latent_scale=0.5)
    kw = dict(num_inference_steps=4, guidance_scale=1.5)
    lat = pipe(LABELS, generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    img = pipe(LABELS, generator=torch.Generator().manual_seed(0), **kw).images
    assert lat.shape == (3, 4, *GRID) and img.shape == (3, 3, 16, 16)
    with torch.no_grad():
        want = (vae.decode(lat / 0.5).sample / 2 + 0.5).clamp(0, 1)
    assert (img - want).abs().max() < TOL
    arr = pipe(LABELS, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
    assert arr.shape == (3, 16, 16, 3)
    pil = pipe(LABELS[:1], generator=torch.Generator().manual_seed(0), output_type="pil", **kw).images
    assert pil[0].size == (16, 16)


def test_from_dcgen(tmp_path):
    """The export's objective node gives the schedule, its task node the VAE and latent_scale."""
    from dcgen.io import export_model
    net = tiny_dcdit(in_channels=4, seed=2)
    tiny_vae().save_pretrained(tmp_path / "vae")
    obj_node = {"_target_": "dcgen.diffusion.GaussianDiffusion", "num_timesteps": 500,
                "beta_schedule": "cosine", "learn_sigma": True, "loss": "hybrid"}
    task = {"_target_": "dcgen.tasks.imagenet_latent.ImageNetLatentTask", "cache_dir": "x",
            "vae": str(tmp_path / "vae"), "latent_scale": 0.5, "num_classes": NC}
    export_model(net, tmp_path / "exp", extra={"task": task, "objective": obj_node})
    pipe = DCDiTPipeline.from_dcgen(tmp_path / "exp", scheduler="ddpm")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae is not None and pipe.config.latent_scale == 0.5
    objective = GaussianDiffusion(num_timesteps=500, beta_schedule="cosine")
    assert pipe.scheduler.config.num_train_timesteps == 500
    assert np.allclose(pipe.scheduler.alphas_cumprod.numpy(), objective.alphas_cumprod, rtol=0, atol=1e-12)
    noise = torch.randn(3, 4, *GRID, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the raw random DC-DiT: samples of O(100), so a relative 1e-6
        ref = objective.sample(guided_model(net, 1.5, NC), noise.shape, LABELS, steps=8,
                               noise=noise.clone(), generator=torch.Generator().manual_seed(2))
    out = pipe(LABELS, num_inference_steps=8, guidance_scale=1.5, latents=noise.clone(),
               generator=torch.Generator().manual_seed(2), output_type="latent").images
    assert (out - ref).abs().max() < 1e-6 * max(1.0, float(ref.abs().max()))
    img = pipe(LABELS[:1], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 3, 16, 16)
    for kind in ("ddim", "dpm++", "unipc"):
        assert DCDiTPipeline.from_dcgen(tmp_path / "exp", scheduler=kind, vae=False).vae is None
    task["vae"] = str(tmp_path / "missing")
    export_model(net, tmp_path / "exp", extra={"task": task, "objective": obj_node})
    with pytest.raises(ValueError, match="cannot load the VAE"):
        DCDiTPipeline.from_dcgen(tmp_path / "exp")
    pixel = tiny_dcdit()
    export_model(pixel, tmp_path / "pix", extra={"task": {"_target_": "dcgen.tasks.pixel.task.PixelTask"}})
    with pytest.raises(ValueError, match="pixel space"):
        DCDiTPipeline.from_dcgen(tmp_path / "pix", vae=tiny_vae())
    pix = DCDiTPipeline.from_dcgen(tmp_path / "pix", scheduler="unipc")
    pix.set_progress_bar_config(disable=True)
    out = pix(LABELS, num_inference_steps=5, generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (3, C, *GRID) and isinstance(pix.scheduler, UniPCMultistepScheduler)


def test_dcgen_sample_runs_dpm_solver_in_20_steps(tmp_path):
    """`dcgen sample sampler=dpm++ steps=20` end to end on a freshly trained tiny run."""
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rd, out = tmp_path / "run", tmp_path / "samples"
    common = [sys.executable, "-m", "dcgen"]
    p = subprocess.run(common + ["train", "task=toy", "task.grid=[8,8]", "task.num_samples=32",
                                 "model=dcdit_debug", "train.global_batch_size=8", "train.max_steps=1",
                                 "train.sample_every=0", "train.log_with=none", "dc.ratio_group_size=4",
                                 f"run_dir={rd}"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    p = subprocess.run(common + ["sample", f"run_dir={rd}", "sampler=dpm++", "steps=20", "num_samples=3",
                                 "boundary_maps=1", "map_timesteps=4", f"out_dir={out}"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    stats = json.loads((out / "stats.json").read_text())
    assert len(stats["timesteps"]) == 20 and stats["num_samples"] == 3
    samples = np.load(out / "samples_model_space.npy")
    assert samples.shape == (3, 3, 8, 8) and np.isfinite(samples).all()


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind,with_vae", [("ddpm", True), ("dpm++", False)])
def test_save_pretrained_load_model_save_pretrained_is_bit_exact(tmp_path, kind, with_vae):
    """The pipeline folder is symmetric: save -> dcgen.load_model -> save gives the same bytes,
    and DCDiTPipeline.from_pretrained samples exactly as the saved pipeline did."""
    import dcgen
    net = tiny_dcdit(in_channels=4 if with_vae else C, seed=3)
    objective = GaussianDiffusion(num_timesteps=500, beta_schedule="cosine")
    pipe = DCDiTPipeline(transformer=net, scheduler=make_scheduler(kind, objective),
                         vae=tiny_vae() if with_vae else None, latent_scale=0.5)
    pipe.save_pretrained(tmp_path / "a")
    back = dcgen.load_model(tmp_path / "a")  # the transformer of a pipeline folder
    assert type(back) is DCDiT
    a, b = net.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = DCDiTPipeline(transformer=back, scheduler=make_scheduler(kind, objective),
                          vae=tiny_vae() if with_vae else None, latent_scale=0.5)
    again.save_pretrained(tmp_path / "b")
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa.keys() == fb.keys() and "transformer/config.json" in fa and "model_index.json" in fa
    assert all(fa[k] == fb[k] for k in fa), [k for k in fa if fa[k] != fb[k]]
    loaded = DCDiTPipeline.from_pretrained(tmp_path / "a")
    assert type(loaded.scheduler) is type(pipe.scheduler) and loaded.config.latent_scale == 0.5
    assert torch.equal(loaded.scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)
    for p in (pipe, loaded):
        p.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, guidance_scale=1.5, output_type="latent")
    x = pipe(LABELS, generator=torch.Generator().manual_seed(0), **kw).images
    y = loaded(LABELS, generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(x, y)


def test_a_pipeline_folder_naming_another_class_is_refused(tmp_path):
    import json
    pipe = DCDiTPipeline(transformer=tiny_dcdit(), scheduler=make_scheduler("ddim"))
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    for key, bad in (("scheduler", ["diffusers", "FlaxDDPMScheduler"]), ("scheduler", ["os", "system"]),
                     ("vae", ["diffusers", "UNet2DModel"]), ("_class_name", "StableDiffusionPipeline"),
                     ("latent_scale", "0.5"), ("cfg_channels", "${oc.env:HOME}")):
        (tmp_path / "p" / "model_index.json").write_text(json.dumps({**index, key: bad}))
        with pytest.raises(ValueError, match=f"refusing {key}="):
            DCDiTPipeline.from_pretrained(tmp_path / "p")
