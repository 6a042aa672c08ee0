"""Upcycling (METHOD §9.1): teachers from the original DiT format, diffusers and dcgen exports;
block reuse, frozen embedders, distillation, and an upcycled training run."""
import pytest
import torch
from omegaconf import OmegaConf

from dcgen.cli import compose
from dcgen.io import export_model
from dcgen.models import DCDiT, DiT
from dcgen.compat.upcycle import distill_terms, init_from_dit, load_dit_teacher
from test_convert import dit_layout, mae_pos_table, random_state


def save_original_dit(path, D, depth, C=4, p=2, num_classes=1000, grid=16, seed=0):
    """A random DiT checkpoint with facebookresearch/DiT's key names, written with torch.save."""
    sd = random_state(dit_layout(D, depth, C=C, p=p, num_classes=num_classes), seed=seed, std=0.02)
    sd["pos_embed"] = torch.from_numpy(mae_pos_table(D, grid))[None]
    torch.save(sd, path)
    return sd


def test_dit_s2_blocks_and_embedders_identical_after_init(tmp_path):
    sd = save_original_dit(tmp_path / "DiT-S-2-256x256.pt", 384, 12)
    teacher = load_dit_teacher(tmp_path / "DiT-S-2-256x256.pt")
    assert isinstance(teacher, DiT) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    model = DCDiT(input_size=(32, 32), in_channels=4, num_classes=1000, hidden_size=384, depth=12,
                  num_heads=6, cond_adaptor=True, pe_coord_scale=0.5)
    report = init_from_dit(model, teacher)
    ours = model.state_dict()
    reused = [k for k in sd if k.startswith(("blocks.", "t_embedder.", "y_embedder."))]
    assert len(reused) == 12 * 10 + 5
    for k in reused:  # identical to the file, tensor by tensor
        assert torch.equal(ours[k], sd[k]), k
    assert report["blocks"] == 12 and report["tensors_copied"] == len(reused)
    assert report["params_copied"] == sum(sd[k].numel() for k in reused)
    assert report["frozen"] == ["t_embedder", "y_embedder"] and report["pe_coord_scale"] == 0.5
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in ours if n.startswith(("t_embedder.", "y_embedder."))}
    # new modules stay new: the P = 1 embed and the final layer have other shapes than the teacher's
    assert model.x_embedder.proj.weight.shape[-1] == 3 and model.cond_adaptor is not None

    small = DCDiT(input_size=(32, 32), in_channels=4, num_classes=1000, hidden_size=384, depth=6,
                  num_heads=6)
    with pytest.raises(ValueError, match="teacher depth=12 but model.depth=6"):
        init_from_dit(small, teacher)
    with pytest.raises(ValueError, match="upcycles into a DC-DiT"):
        init_from_dit(teacher, teacher)


def test_distill_terms_is_full_output_mse():
    from dcgen.diffusion import FlowMatching, GaussianDiffusion
    torch.manual_seed(0)
    teacher = DiT(input_size=(8, 8), in_channels=4, num_classes=3, hidden_size=64, depth=2, num_heads=4).eval()
    for p in teacher.parameters():  # non-zero everywhere (adaLN-Zero would hide mistakes)
        p.data.add_(0.05 * torch.randn_like(p))
    twin = DiT(**{k: v for k, v in teacher.config.items()})
    twin.load_state_dict(teacher.state_dict())
    x0, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 3])
    g = GaussianDiffusion()
    terms, aux = distill_terms(g, twin, teacher, x0, y, t=torch.tensor([5, 500, 999]), noise=torch.randn_like(x0))
    assert aux == [] and terms["loss"].shape == (3,) and torch.all(terms["loss"] == 0)
    student = DCDiT(input_size=(8, 8), in_channels=4, num_classes=3, hidden_size=64, depth=2, num_heads=4,
                    norm_groups=8, cond_adaptor=True, pe_coord_scale=0.5)
    init_from_dit(student, teacher)
    t, noise = torch.tensor([5, 500, 999]), torch.randn_like(x0)
    terms, aux = distill_terms(g, student, teacher, x0, y, t=t, noise=noise, tail_drop=0.3)
    with torch.no_grad():
        x_t = g.q_sample(x0, t, noise)
        want = ((student(x_t, t, y, tail_drop=0.3)[0] - teacher(x_t, t, y)[0]) ** 2)
    assert torch.allclose(terms["loss"], want.flatten(1).mean(1), atol=1e-6)
    assert torch.allclose(terms["mse"], want[:, :4].flatten(1).mean(1), atol=1e-6)
    assert len(aux) == 1 and terms["loss"].requires_grad
    terms["loss"].mean().backward()
    assert student.t_embedder.mlp[0].weight.grad is None  # frozen
    assert all(p.grad is None for p in teacher.parameters())
    # flow matching: t is the flow time s
    terms, _ = distill_terms(FlowMatching(), student, teacher, x0, y, t=torch.tensor([0.1, 0.5, 0.9]),
                             noise=noise)
    assert terms["loss"].shape == (3,) and torch.isfinite(terms["loss"]).all()


def test_teacher_from_diffusers_directory_and_export(tmp_path):
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    hf = DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                               num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=3).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
        # diffusers' own conversion copies DiT's one embedder into every block
        hf.transformer_blocks[1].norm1.emb.load_state_dict(hf.transformer_blocks[0].norm1.emb.state_dict())
    hf.save_pretrained(tmp_path / "pipe" / "transformer")  # the hub pipeline layout
    teacher = load_dit_teacher(tmp_path / "pipe")
    assert teacher.config["patch_size"] == 2 and teacher.config["num_classes"] == 3
    # same forward once diffusers' timestep embedding uses DiT's frequencies (it divides by
    # half - 1 instead of half: downscale_freq_shift=1)
    for blk in hf.transformer_blocks:
        blk.norm1.emb.time_proj.downscale_freq_shift = 0
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 2])
    with torch.no_grad():
        want = hf(x, timestep=t, class_labels=y).sample
        got = teacher(x, t, y)[0]
    assert (got - want).abs().max() < 1e-4
    # a dcgen export of the teacher loads as the same DiT
    export_model(teacher, tmp_path / "export")
    again = load_dit_teacher(tmp_path / "export")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), teacher.state_dict().values()))
    # embedders that disagree across blocks cannot become one DiT
    with torch.no_grad():
        hf.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(1.0)
    hf.save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="block 1's embedder differs"):
        load_dit_teacher(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="init.from_dit=.*no such file"):
        load_dit_teacher(tmp_path / "missing.pt")
    dc = DCDiT(input_size=(8, 8), in_channels=4, num_classes=3, hidden_size=64, depth=2, num_heads=4, norm_groups=8)
    export_model(dc, tmp_path / "dc_export")
    with pytest.raises(ValueError, match="must be a DiT"):
        load_dit_teacher(tmp_path / "dc_export")


def test_upcycled_training_run(tmp_path, monkeypatch):
    """A one-block DiT-S-width teacher in the original format upcycled into a one-block DC-DiT:
    2 distillation steps, then normal training; the frozen embedders keep the teacher's values.
    (D = 384 because the original format does not record the head count of other widths.)"""
    import dcgen.compat.upcycle as U
    from dcgen.train import train
    sd = save_original_dit(tmp_path / "teacher.pt", 384, 1, C=4, p=2, num_classes=4, grid=4)
    calls = []
    orig = U.distill_terms
    monkeypatch.setattr(U, "distill_terms", lambda *a, **k: calls.append(1) or orig(*a, **k))
    cfg = compose("train", ["task=toy", "task.grid=[8,8]", "task.channels=4", "task.num_classes=4",
                            "task.num_samples=32", "model=dcdit_debug", "model.hidden_size=384", "model.depth=1",
                            "model.num_heads=6", "+model.cond_adaptor=true",
                            "+model.pe_coord_scale=0.5", f"init.from_dit={tmp_path / 'teacher.pt'}",
                            "init.distill_steps=2", "train.max_steps=3", "train.global_batch_size=4",
                            "train.sample_every=0", "train.ckpt_every=0", "train.log_every=1",
                            "dc.ratio_group_size=4", f"run_dir={tmp_path / 'run'}"])
    _, model, ema = train(cfg, return_model=True)
    assert len(calls) == 2  # distillation for steps 0 and 1 only
    for k in ("t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight"):
        assert torch.equal(model.state_dict()[k], sd[k]), k  # frozen: still the teacher's
    assert not torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.model.cond_adaptor is True and saved.init.distill_steps == 2


def test_distill_terms_against_an_independent_computation():
    """The distillation target recomputed without dcgen's diffusion code: the linear beta schedule
    and x_t written out by hand (float64), flow's x_s = (1 - s) x0 + s eps at model time 999 s."""
    import math
    from dcgen.diffusion import FlowMatching, GaussianDiffusion
    torch.manual_seed(1)
    teacher = DiT(input_size=(8, 8), in_channels=4, num_classes=3, hidden_size=64, depth=2, num_heads=4).eval()
    for p in teacher.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    student = DCDiT(input_size=(8, 8), in_channels=4, num_classes=3, hidden_size=64, depth=2, num_heads=4,
                    norm_groups=8, cond_adaptor=True, pe_coord_scale=0.5)
    init_from_dit(student, teacher)
    student.eval()
    x0, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 2, 3])
    noise = torch.randn_like(x0)
    t = [7, 420, 998]
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]  # DiT's linear schedule
    abar = [math.prod(1 - b for b in betas[:i + 1]) for i in t]
    x_t = torch.stack([math.sqrt(a) * x0[j].double() + math.sqrt(1 - a) * noise[j].double()
                       for j, a in enumerate(abar)]).float()
    terms, _ = distill_terms(GaussianDiffusion(), student, teacher, x0, y, t=torch.tensor(t), noise=noise)
    with torch.no_grad():
        s_out = student(x_t, torch.tensor(t), y)[0].double()
        t_out = teacher(x_t, torch.tensor(t), y)[0].double()
    want = ((s_out - t_out) ** 2).mean(dim=(1, 2, 3))
    assert want.min() > 0  # a real difference to match
    assert torch.allclose(terms["loss"].double(), want, rtol=1e-4, atol=1e-7)
    want_eps = ((s_out[:, :4] - t_out[:, :4]) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(terms["mse"].double(), want_eps, rtol=1e-4, atol=1e-7)
    s = torch.tensor([0.1, 0.5, 0.9])
    x_s = (1 - s.view(3, 1, 1, 1)) * x0 + s.view(3, 1, 1, 1) * noise
    terms, _ = distill_terms(FlowMatching(), student, teacher, x0, y, t=s, noise=noise)
    with torch.no_grad():
        want = ((student(x_s, 999 * s, y)[0] - teacher(x_s, 999 * s, y)[0]).double() ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(terms["loss"].double(), want, rtol=1e-4, atol=1e-7)
