"""REPA (dcgen/repa.py): the alignment loss reads each kept token's target at its own grid
position, weighs samples equally, leaves the encoder frozen, reaches only the chosen block (and
what feeds it), decreases in a short toy run, and never enters the export."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from dcgen.chunking.chunk import ChunkIndex
from dcgen.models import DCDiT, DiT
from dcgen.repa import Repa, alignment_loss, grid_targets, load_encoder


class ImageTask(SimpleNamespace):
    def decode(self, x):
        return x


def cfg(**kw):
    return SimpleNamespace(**{"weight": 0.5, "depth": 1, "encoder": "random:16", "projector_dim": 32, **kw})


def dcdit(grid=(8, 8), depth=3):
    torch.manual_seed(0)
    m = DCDiT(input_size=grid, in_channels=3, num_classes=4, hidden_size=32, depth=depth, num_heads=2,
              norm_groups=8)
    for blk in m.blocks:  # adaLN-Zero would make every block the identity at init
        nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.1)
    return m


def test_targets_are_read_at_each_kept_tokens_grid_position_and_samples_weigh_equally():
    """Hand-checked: sample 0 keeps 1 token, aligned (cos 1); sample 1 keeps 3, anti-aligned
    (cos -1). Per-sample means: loss -(1 + -1)/2 = 0 (a mean over tokens would give 0.5)."""
    B, grid, d = 2, (2, 3), 4
    L = 6
    targets = torch.randn(B, L, d)
    kept = torch.zeros(B, L, dtype=torch.bool)
    kept[0, 4] = True
    kept[1, [1, 2, 5]] = True
    pack = ChunkIndex.from_mask(kept, grid)
    assert pack.pos_idx.tolist() == [4, 1, 2, 5]
    h = torch.stack([targets[0, 4], -targets[1, 1], -targets[1, 2], -targets[1, 5]])
    assert alignment_loss(h, pack, targets, nn.Identity()).item() == pytest.approx(0.0, abs=1e-6)
    aligned = targets[pack.batch_idx, pack.pos_idx] * torch.rand(4, 1).add(0.5)  # scale does not matter
    assert alignment_loss(aligned, pack, targets, nn.Identity()).item() == pytest.approx(-1.0, abs=1e-6)
    # dense (a DiT): every token, same arithmetic
    assert alignment_loss(targets * 3, None, targets, nn.Identity()).item() == pytest.approx(-1.0, abs=1e-6)
    # the encoder map onto the token grid: area means when it divides, the map itself when equal
    f = torch.arange(2 * 4 * 6, dtype=torch.float32).view(1, 2, 4, 6)
    t = grid_targets(f, (2, 3))
    assert t.shape == (1, 6, 2) and t[0, 0, 0].item() == f[0, 0, :2, :2].mean().item()
    assert torch.equal(grid_targets(f, (4, 6))[0, 7], f[0, :, 1, 1])  # raster position 7 = (1, 1)
    # a finer map the grid does not divide: still area means, no aliasing (alternating rows of
    # 1 and 0 onto 6 rows: each target averages 2-4 rows, within [1/3, 2/3]; point samples would not)
    stripes = torch.zeros(1, 1, 16, 16)
    stripes[:, :, ::2] = 1.0
    st = grid_targets(stripes, (6, 6))
    assert st.min().item() >= 1 / 3 - 1e-6 and st.max().item() <= 2 / 3 + 1e-6


def test_a_copy_of_the_model_shares_repa_and_records_nothing():
    """The EMA is a deep copy of the model, hooks included: it must not duplicate the encoder
    (a second DINOv2 per process) nor record its own forwards into the training step's loss."""
    import copy
    from dcgen.ema import EMA
    model = dcdit(depth=2)
    repa = Repa(cfg(depth=1), model, ImageTask(grid=(8, 8), channels=3))
    ema = EMA(model, 0.9)
    hook = next(iter(ema.model.blocks[0]._forward_hooks.values()))
    assert hook.__self__ is repa and copy.deepcopy(repa) is repa
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    ema.model(x, torch.tensor([5, 500]), torch.tensor([0, 1]))
    assert repa._seen is None
    model(x, torch.tensor([5, 500]), torch.tensor([0, 1]))
    assert repa._seen is not None and torch.isfinite(repa.loss(model, x))


def test_the_encoder_is_frozen_and_only_the_chosen_blocks_tokens_carry_the_loss():
    model = dcdit(depth=3)
    task = ImageTask(grid=(8, 8), channels=3)
    repa = Repa(cfg(depth=2), model, task)
    outputs = []

    def keep(module, args, out):
        out.retain_grad()
        outputs.append(out)

    handles = [blk.register_forward_hook(keep) for blk in model.blocks]
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    t = torch.tensor([10, 200, 500, 900])
    model(x, t, torch.tensor([0, 1, 2, 3]))
    loss = repa.loss(model, x)
    loss.backward()
    for h in handles:
        h.remove()
    enc = repa.encoder.module
    assert all(not p.requires_grad and p.grad is None for p in enc.parameters())
    # the chosen block (2nd): a gradient on every kept token; the block after it: none
    g = outputs[1].grad
    assert g is not None and bool((g.abs().sum(-1) > 0).all())
    assert outputs[2].grad is None or not outputs[2].grad.any()
    assert all(p.grad is None or not p.grad.any() for p in model.blocks[2].parameters())
    for part in (model.decoder, model.final_layer, model.backbone_norm):
        assert all(p.grad is None or not p.grad.any() for p in part.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.blocks[0].parameters())
    assert all(p.grad is not None for p in model.repa_projector.parameters())


def test_a_dit_aligns_every_token_and_bad_settings_are_refused():
    torch.manual_seed(0)
    dit = DiT(input_size=(8, 8), in_channels=3, num_classes=4, hidden_size=32, depth=2, num_heads=2, patch_size=2)
    task = ImageTask(grid=(8, 8), channels=3)
    repa = Repa(cfg(depth=1), dit, task)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    dit(x, torch.tensor([1, 2]), torch.tensor([0, 1]))
    h, pack = repa._seen
    assert pack is None and h.shape == (2, 16, 32)  # the 4x4 token grid, all of it
    assert torch.isfinite(repa.loss(dit, x))
    with pytest.raises(ValueError, match="repa.depth=3: the model has 2 blocks"):
        Repa(cfg(depth=3), dit, task)
    with pytest.raises(ValueError, match="needs repa.encoder"):
        Repa(cfg(encoder=None), dit, task)
    with pytest.raises(ValueError, match="2D token grid"):
        Repa(cfg(), DCDiT(input_size=(4, 4, 4), in_channels=1, num_classes=0, hidden_size=32, depth=1,
                          num_heads=2, norm_groups=8), task)
    with pytest.raises(ValueError, match="expected random:WIDTH"):
        load_encoder("dinov2")


def test_a_torchscript_encoder_giving_patch_tokens(tmp_path):
    class Tokens(nn.Module):  # (B, 3, S, S) -> one prefix token + (S/8)^2 patch tokens of width 5
        def forward(self, x):
            p = nn.functional.avg_pool2d(x, 8)  # (B, 3, S/8, S/8)
            tok = torch.cat([p, p[:, :2] * 2], 1).flatten(2).transpose(1, 2)  # (B, N, 5)
            return torch.cat([tok.mean(1, keepdim=True), tok], 1)

    path = tmp_path / "enc.pt"
    torch.jit.script(Tokens()).save(str(path))
    enc = load_encoder(f"torchscript:{path}")
    assert enc.width == 5  # the class-like first token is recognised as a prefix
    f = enc.features(torch.zeros(2, 1, 32, 32))  # grey images in [-1, 1] -> 0.5 in [0, 1]
    assert f.shape == (2, 5, 4, 4) and torch.allclose(f[:, :3], torch.full_like(f[:, :3], 0.5))


def test_the_loss_under_bf16_autocast_stays_close_to_fp32():
    model = dcdit(depth=2)
    repa = Repa(cfg(depth=1), model, ImageTask(grid=(8, 8), channels=3))
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    args = (x, torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 2, 3]))
    model(*args)
    ref = repa.loss(model, x).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(*args)
        low = repa.loss(model, x)
    assert low.dtype == torch.float32 and abs(low.item() - ref) < 2e-2, (low.item(), ref)


def test_a_20_step_toy_run_lowers_the_loss_and_the_export_has_no_projector(tmp_path, capsys):
    from safetensors.torch import load_file

    from dcgen import load_model
    from dcgen.checkpoint import latest_checkpoint
    from dcgen.cli import main
    from test_train import TOY
    rd = tmp_path / "run"
    args = ["train", *TOY, "train.max_steps=20", "train.log_every=5", "train.ckpt_every=10", "train.log_with=none",
            "repa.weight=0.5", "repa.depth=1", "repa.encoder=random:16", "repa.projector_dim=32", f"run_dir={rd}"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    repa = [r["repa_loss"] for r in rows]
    assert len(repa) == 4 and repa[-1] < repa[0] - 0.1, repa
    assert "repa_loss" in (rd / "log.txt").read_text()
    ck = load_file(latest_checkpoint(rd) / "model.safetensors")
    assert any(k.startswith("repa_projector.") for k in ck)
    assert not any(k.startswith("repa_projector.") for k in load_file(rd / "export" / "model.safetensors"))
    model = load_model(rd / "export")
    assert not hasattr(model, "repa_projector")
    # a run-dir-only resume may not load a TorchScript encoder its config file names
    import yaml
    stored = yaml.safe_load((rd / "config.yaml").read_text())
    stored["repa"]["encoder"] = f"torchscript:{tmp_path / 'enc.pt'}"
    (rd / "config.yaml").write_text(yaml.safe_dump(stored))
    capsys.readouterr()
    assert main(["train", f"run_dir={rd}", "train.max_steps=22"]) == 2
    assert "refusing repa.encoder=torchscript:" in capsys.readouterr().err


def test_a_timm_encoder_from_a_local_safetensors_file(tmp_path):
    """timm:NAME@FILE builds timm's architecture and loads a local safetensors file (no download,
    no pickle); its class token is dropped and its patch tokens become the feature map."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    save_file(ref.state_dict(), tmp_path / "vit.safetensors")
    enc = load_encoder(f"timm:vit_tiny_patch16_224@{tmp_path / 'vit.safetensors'}", size=32)
    assert enc.width == 192 and enc.input_size == 32 and enc.prefix_tokens == 1
    assert all(not p.requires_grad for p in enc.owner.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    f = enc.features(x)
    with torch.no_grad():  # the same numbers as timm's own forward on the normalised images
        want = ref.forward_features(((x + 1) / 2 - 0.5) / 0.5)[:, 1:]
    assert f.shape == (2, 192, 2, 2) and torch.allclose(f.flatten(2).transpose(1, 2), want, atol=1e-5)
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(ValueError, match="existing .safetensors file"):
        load_encoder(f"timm:vit_tiny_patch16_224@{tmp_path / 'vit.pth'}", size=32)
    # an argument the architecture does not take (img_size on a CNN): a named config error
    with pytest.raises(ValueError, match="repa.encoder=timm:resnet18@.*TypeError"):
        load_encoder(f"timm:resnet18@{tmp_path / 'vit.safetensors'}", size=32)


def test_the_stand_in_encoder_is_fitted_on_the_task_and_loads_as_an_encoder(tmp_path):
    """fit_standin_encoder: a small CNN fitted to the task's own training images, saved as
    TorchScript; it reads the digits well above chance and loads through torchscript:PATH."""
    from dcgen.cli import compose
    from dcgen.repa import fit_standin_encoder
    from dcgen.trust import build
    task = build(compose("train", ["task=pixel"]).task, "task", "test", trusted=True)
    info = fit_standin_encoder(task, tmp_path / "standin.pt", steps=100, seed=0)
    assert info["train_accuracy"] > 0.25, info  # 10 classes: chance is 0.1 (600 steps: 0.95)
    enc = load_encoder(f"torchscript:{tmp_path / 'standin.pt'}")
    assert enc.width == 64 and enc.features(torch.zeros(2, 1, 32, 32)).shape == (2, 64, 8, 8)
    with pytest.raises(ValueError, match="class-conditional"):
        fit_standin_encoder(SimpleNamespace(num_classes=0), tmp_path / "x.pt")
