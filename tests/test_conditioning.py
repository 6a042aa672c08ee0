"""Class conditioning reaches the output: a guard against a label that silently does nothing
(issue: the digits models ignored their labels, docs/results.md "Class conditioning")."""
import pytest
import torch
from safetensors.torch import load_file

from dcgen.checkpoint import latest_checkpoint
from dcgen.sample import load_run
from test_train import run_cli

TINY = ["task=pixel", "task.resolution=16", "train.global_batch_size=16", "train.max_steps=8",
        "train.ckpt_every=4", "train.ckpt_keep=2", "train.sample_every=0", "train.log_every=4",
        "train.log_with=none", "dc.ratio_group_size=4", "train.num_threads=1"]  # the default lr and label init


def label_effect(model, objective, task, t=500, n=32):
    """||eps(x_t, y) - eps(x_t, y')|| / ||eps(x_t, y)|| on training digits, y' another class."""
    ds = task.train_dataset()
    x0 = torch.stack([ds[i][0] for i in range(n)]).float()
    y0 = torch.stack([torch.as_tensor(ds[i][1]) for i in range(n)]).long()
    gen = torch.Generator().manual_seed(0)
    a = float(objective.alphas_cumprod[t])
    xt = a ** 0.5 * x0 + (1 - a) ** 0.5 * torch.randn(x0.shape, generator=gen)
    tt = torch.full((n,), t, dtype=torch.long)
    with torch.no_grad():
        out_y = model(xt, tt, y0)[0][:, :x0.shape[1]]
        out_other = model(xt, tt, (y0 + 1) % task.num_classes)[0][:, :x0.shape[1]]
    return float((out_y - out_other).norm() / out_y.norm())


@pytest.mark.parametrize("model", ["dcdit_debug", "dit_debug"])
def test_label_changes_the_output_after_a_few_steps(tmp_path, model):
    run = tmp_path / "run"
    run_cli(["train", f"model={model}", *TINY, f"run_dir={run}"])
    m, objective, task, _ = load_run(run, "cpu")
    ck = latest_checkpoint(run)
    m.load_state_dict(load_file(ck / "model.safetensors"))  # the trained weights, not the EMA
    m.eval()
    effect = label_effect(m, objective, task)
    print(model, "label effect", effect)
    # DiT's N(0, 0.02) label init measured 0.003 here for dit_debug (the label ignored); N(0, 1): 0.16
    assert effect > 0.05, effect
    # the real classes' codes are trained (a run that only ever sees the null label would leave
    # them where they started): rows 0..9 move between the step-4 and step-8 checkpoints
    first = load_file(sorted(run.glob("checkpoints/step_*"))[0] / "model.safetensors")
    key = "y_embedder.embedding_table.weight"
    moved = (load_file(ck / "model.safetensors")[key] - first[key])[:10].norm(dim=1)
    assert (moved > 0).all(), moved


@pytest.mark.parametrize("groups", [16, 4])
def test_one_channel_per_groupnorm_group_erases_the_conv_blocks_conditioning_and_is_warned(groups, caplog):
    """A conv block adds t and y per channel before a GroupNorm: with one channel per group the norm
    subtracts that constant again, and the encoder's output no longer depends on t or y."""
    from dcgen.models import DCDiT
    torch.manual_seed(0)
    with caplog.at_level("WARNING", logger="dcgen.models"):
        m = DCDiT(input_size=(16, 16), in_channels=1, num_classes=10, hidden_size=64, depth=1, num_heads=2,
                  patch_size=2, norm_groups=groups).eval()  # conv width 64 / 4 = 16
    assert ("one channel per GroupNorm group" in caplog.text) == (groups == 16)
    h = m.x_embedder(torch.randn(2, 1, 16, 16))
    with torch.no_grad():
        e1 = m.encoder(h, m.conditioning(torch.tensor([10, 10]), torch.tensor([1, 1])), m.token_grid)
        e2 = m.encoder(h, m.conditioning(torch.tensor([900, 900]), torch.tensor([7, 7])), m.token_grid)
    assert torch.allclose(e1, e2, atol=1e-5) == (groups == 16)
