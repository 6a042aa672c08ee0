"""dcgen.analysis pieces that the results rest on: which tokens lie over background, and the
router's kept fraction split between background and detail."""
import pytest
import torch

from dcgen.analysis import routing_profile, uniform_patches


def test_uniform_patches_by_hand():
    x = torch.full((2, 2, 4, 6), -1.0)  # 2 items, 2 channels, 4x6 data -> 2x3 tokens of 2x2
    x[0, 0, 1, 3] = 1.0  # item 0: ink under token (0, 1) (rows 0-1, columns 2-3)
    x[1, 1, 3, 5] = -0.9  # item 1: a change in the second channel only, under token (1, 2)
    x[1, :, 0:2, 0:2] = 0.5  # item 1: token (0, 0) constant at another value: still uniform
    bg = uniform_patches(x, (2, 3))
    want = torch.ones(2, 2, 3, dtype=torch.bool)
    want[0, 0, 1] = False
    want[1, 1, 2] = False
    assert torch.equal(bg, want)
    assert uniform_patches(x, (2, 3), tol=0.2)[1, 1, 2]  # 0.1 of change is within a 0.2 tolerance
    vol = torch.zeros(1, 1, 2, 4, 4)
    vol[0, 0, 1, 3, 0] = 1.0
    bg3 = uniform_patches(vol, (1, 2, 2))  # 3D: patches of 2x2x2
    assert bg3.shape == (1, 1, 2, 2) and (~bg3).nonzero().tolist() == [[0, 0, 1, 0]]
    with pytest.raises(ValueError, match="whole multiple"):
        uniform_patches(x, (3, 3))


def test_routing_profile_splits_the_kept_fraction_between_background_and_detail():
    from hydra.utils import instantiate

    from dcgen.config import compose
    from dcgen.train import build_model
    cfg = compose("train", ["experiment=glyphs_dcdit", "model.hidden_size=64", "model.depth=1",
                            "model.num_heads=2", "task.resolution=16", "model.norm_groups=4"])
    # (4 groups: with one channel per GroupNorm group the encoder's additive conditioning is
    # normalised away, and the router could not see the label)
    task = instantiate(cfg.task, _convert_="all")
    objective = instantiate(cfg.objective, _convert_="all")
    torch.manual_seed(0)
    model = build_model(cfg, task).eval()
    with torch.no_grad():
        model.router.residual_scorer[-1].bias.fill_(0.0)  # untrained, it keeps almost nothing: let it choose
    prof = routing_profile(model, objective, task, timesteps=(0, 500), n=16)
    for t, p in prof.items():
        assert 0 < p["background_share"] < 1, t  # glyphs: letters on a uniform ground
        split = p["background_share"] * p["background_kept"] + (1 - p["background_share"]) * p["detail_kept"]
        assert split == pytest.approx(p["kept"], abs=1e-6), t
    # other items (the model's own samples): routed as given, with their labels; the training items
    # passed by hand give the default's profile; constant images are all background
    ds = task.train_dataset()
    x0 = torch.stack([ds[i][0] for i in range(16)])
    y0 = torch.as_tensor([int(ds[i][1]) for i in range(16)])
    assert routing_profile(model, objective, task, timesteps=(0, 500), x0=x0, labels=y0) == prof
    const = routing_profile(model, objective, task, timesteps=(0,), x0=torch.full((3, *x0.shape[1:]), -1.0),
                            labels=y0[:3])[0]
    assert const["background_share"] == 1 and const["detail_kept"] is None
    other = routing_profile(model, objective, task, timesteps=(0,), x0=x0.flip(-1), labels=y0)[0]
    assert other["kept"] != prof[0]["kept"]
