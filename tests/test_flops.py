"""Analytic FLOP accounting (METHOD §7.2, §7.3) against published numbers and torch's counter."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dcgen.flops import (FlopMeter, attention_macs, dcdit_tflops_per_image, dit_gflops,
                         model_flops, per_sample_macs, step_macs)
from dcgen.models import DCDiT, DiT, build, config_node
from dcgen.chunking.reference import randomise_zero_inits

SCAFFOLD = ("embed", "encoder", "router", "decoder", "final")


def big_dit(size, patch, grid=(32, 32)):
    with torch.device("meta"):  # nothing allocated: only the shapes are read
        return build(config_node(f"dit_{size.lower()}_{patch}"), input_size=list(grid), in_channels=4,
                     num_classes=1000)


def big_dcdit(size, grid=(32, 32)):
    with torch.device("meta"):
        return build(config_node(f"dcdit_{size.lower()}"), input_size=list(grid), in_channels=4,
                     num_classes=1000)


# ------------------------------------------------------------------------------------------
# Published values
# ------------------------------------------------------------------------------------------

# [DiT] Table 4 "GFLOPs" = GMACs per forward at 256 px (METHOD §7.2)
@pytest.mark.parametrize("size,patch,want", [
    ("S", 2, 6.06), ("B", 2, 23.01), ("L", 2, 80.71), ("XL", 2, 118.64),
    ("S", 4, 1.41), ("B", 4, 5.56), ("L", 4, 19.70), ("XL", 4, 29.05)])
def test_dit_gmacs_match_the_dit_paper(size, patch, want):
    got = dit_gflops(big_dit(size, patch))
    assert got == pytest.approx(want, rel=0.01)


def test_dit_xl2_components_and_batch_scaling():
    m = big_dit("XL", 2)
    one = model_flops(m)
    assert one["total"] / 1e9 == pytest.approx(118.64, rel=1e-3)
    assert sum(v for k, v in one.items() if k != "total") == pytest.approx(one["total"])
    assert model_flops(m, batch=3)["total"] == pytest.approx(3 * one["total"])
    with pytest.raises(ValueError):
        model_flops(m, kept_counts=[256])


def test_dcdit_convention_helper():
    # METHOD §7.3 check: 2 x 118.0 G x 250 = 59.00 TFLOPs; CFG doubles it
    assert dcdit_tflops_per_image([118.0e9] * 250) == pytest.approx(59.00)
    assert dcdit_tflops_per_image([118.0e9] * 250, cfg_branches=2) == pytest.approx(118.00)


# METHOD §7.3 reference values are FLOPs (= 2 MACs) per image per forward, in [R]'s convention:
# residual_proj NOT counted (Q7; counting it adds 2 L D^2 = 1.21 G for B at 256 px) and the
# de-chunk at its dense-equivalent cost. The scaffold is embed + encoder + router + decoder + final.
@pytest.mark.parametrize("size,grid,want", [
    ("S", (32, 32), 2.95), ("B", (32, 32), 11.80), ("L", (32, 32), 20.97), ("XL", (32, 32), 26.53),
    ("B", (64, 64), 47.18), ("XL", (64, 64), 106.11)])
def test_dcdit_scaffold_flops(size, grid, want):
    f = model_flops(big_dcdit(size, grid), kept_counts=[1], count_residual_proj=False)
    assert 2 * sum(f[k] for k in SCAFFOLD) / 1e9 == pytest.approx(want, rel=0.005)
    assert f["residual_proj"] == 0


@pytest.mark.parametrize("M,want", [(190, 45.6), (442, 94.6), (1024, 226.6)])
def test_dcdit_b_flops_against_kept_count(M, want):
    m = big_dcdit("B")
    f = model_flops(m, kept_counts=[M], count_residual_proj=False, dechunk="reference")
    assert 2 * f["total"] / 1e9 == pytest.approx(want, rel=0.005)
    # dcgen's default also counts residual_proj: + L D^2 MACs = 1.21 G FLOPs
    g = model_flops(m, kept_counts=[M])
    assert 2 * (g["total"] - f["total"]) / 1e9 == pytest.approx(2 * 1024 * 768**2 / 1e9)


def test_attention_term_is_methods_formula():
    # H sum_b M_b^2 (4 d_h + 3) FLOPs per layer, over packed lengths
    M = torch.tensor([3, 190, 442])
    got = 2 * attention_macs(M, 12, 64).sum()
    assert got.item() == 12 * (M.double() ** 2).sum().item() * (4 * 64 + 3)


def test_batch_sums_samples_and_executed_dechunk_is_m_independent():
    m = big_dcdit("B")
    a = model_flops(m, kept_counts=[190, 442])
    b = model_flops(m, kept_counts=190)
    c = model_flops(m, kept_counts=442)
    for k in a:
        assert a[k] == pytest.approx(b[k] + c[k])
    e1 = model_flops(m, kept_counts=[190], dechunk="executed")["dechunk"]
    e2 = model_flops(m, kept_counts=[1024], dechunk="executed")["dechunk"]
    assert e1 == e2 == 1024 * 769 * (32 + 32)  # two (32 x 32) Toeplitz matmuls over (L, D + 1)
    with pytest.raises(ValueError):
        model_flops(m, kept_counts=[1025])
    with pytest.raises(ValueError):
        model_flops(m, kept_counts=[1], dechunk="dense")


def test_flops_fall_monotonically_with_kept_tokens():
    m = big_dcdit("XL")
    for dechunk in ("reference", "executed"):
        totals = [model_flops(m, kept_counts=[M], dechunk=dechunk)["total"]
                  for M in range(1024, 0, -37)]
        assert all(a > b for a, b in zip(totals, totals[1:]))


# ------------------------------------------------------------------------------------------
# Agreement with torch's FlopCounterMode on real forwards
# ------------------------------------------------------------------------------------------

def tiny_dcdit(grid, **kw):
    args = dict(input_size=grid, in_channels=4, num_classes=10, hidden_size=64, depth=2,
                num_heads=4, norm_groups=8, attn_backend="loop")
    args.update(kw)
    return DCDiT(**args)


def randomise(model, seed=0):
    return randomise_zero_inits(model, seed).eval()


def inputs(grid, B, C=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, *grid, generator=gen), torch.randint(0, 1000, (B,), generator=gen),
            torch.randint(0, 10, (B,), generator=gen))


SDPA_OPS = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}


def _counts(fn):
    with FlopCounterMode(display=False) as fc:
        result = fn()
    return result, dict(fc.get_flop_counts().get("Global", {}))


def torch_counts_sdpa() -> bool:
    """Probe (not a version check): does this torch's FlopCounterMode credit SDPA on the CPU
    with FLOPs? torch 2.14 registers no formula for `_scaled_dot_product_flash_attention_for_cpu`
    and silently counts 0."""
    q = torch.randn(1, 1, 4, 8)
    _, counts = _counts(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    return sum(counts.values()) > 0


def explicit_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """Attention written as two plain matmuls (what the counter credits as bmm), for an
    attention count that does not depend on torch registering a formula for the fused op."""
    assert dropout_p == 0.0 and not is_causal and not kw
    s = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return torch.softmax(s, dim=-1) @ v


def counted_flops(fn, monkeypatch, explicit=explicit_sdpa):
    """(result, matmul FLOPs outside attention, attention FLOPs) of fn under FlopCounterMode.

    The attention count comes from an independent route: fn is run a second time with SDPA
    replaced by `explicit_sdpa`, and the attention FLOPs are what that run counts beyond the
    first. Where this torch credits the fused SDPA op itself (probed), that count must agree."""
    result, counts = _counts(fn)
    names = {str(op).split(".")[-1] for op in counts}
    assert names <= {"mm", "addmm", "bmm", "convolution"} | SDPA_OPS, names
    mat = sum(v for op, v in counts.items() if str(op).split(".")[-1] not in SDPA_OPS)
    fused = sum(v for op, v in counts.items() if str(op).split(".")[-1] in SDPA_OPS)
    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, "scaled_dot_product_attention", explicit)
        _, counts_explicit = _counts(fn)
    attn = sum(counts_explicit.values()) - mat
    # never a silent zero: the model ran attention, so the independent count must see it
    assert attn > 0, "attention ran but no attention FLOPs were counted"
    if torch_counts_sdpa():
        assert fused == attn, (fused, attn)
    else:
        assert fused == 0
    return result, mat, attn


def test_attention_count_is_never_a_silent_zero(monkeypatch):
    """The cross-check's own guard: with SDPA counted neither by torch nor by the explicit
    route (both patched to a no-FLOP stand-in), counted_flops must refuse, not report 0."""
    def uncounted(q, k, v, **kw):
        return v.clone()
    m = DiT(input_size=(8, 8), in_channels=4, num_classes=10, hidden_size=64, depth=1,
            num_heads=4, patch_size=2).eval()
    x, t, y = inputs((8, 8), B=1)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", uncounted)
    with torch.no_grad(), pytest.raises(AssertionError, match="no attention FLOPs"):
        counted_flops(lambda: m(x, t, y), monkeypatch, explicit=uncounted)


@pytest.mark.parametrize("grid,kw", [
    ((8, 8), {}),
    ((24,), {}),
    ((24,), {"router": "cosine_causal"}),  # its Linears see L - 1 neighbour pairs
    ((8, 8), {"mask_center": True, "dechunk_sigma": 2.0}),
    ((3, 4, 5), {}),
    ((3, 4, 5), {"conv_kernel": "factorised"}),
    ((8, 8), {"router": "cosine"}),
    ((12, 8), {"patch_size": 2, "router": "cosine"}),  # input size; token grid (6, 4)
])
def test_dcdit_matches_torch_flop_counter(grid, kw, monkeypatch):
    torch.manual_seed(0)
    m = randomise(tiny_dcdit(grid, **kw))
    x, t, y = inputs(grid, B=3)
    rho = torch.tensor([0.0, 0.3, 0.6])
    with torch.no_grad():
        (_, aux), mat, attn = counted_flops(lambda: m(x, t, y, tail_drop=rho), monkeypatch)
    counts = aux[0].kept_counts
    L = math.prod(m.token_grid)
    assert 1 <= counts.min() and counts.max() < L  # routing is non-trivial
    f = model_flops(m, kept_counts=counts, dechunk="executed", count_residual_proj=True)
    blk = m.blocks[0].attn
    d_h = blk.qkv.in_features // blk.num_heads
    attn_mm = len(m.blocks) * attention_macs(counts, blk.num_heads, d_h, softmax=False).sum().item()
    attn_all = len(m.blocks) * attention_macs(counts, blk.num_heads, d_h).sum().item()
    # every Linear, conv and the de-chunk's Toeplitz matmuls: exact agreement
    assert mat == 2 * (f["total"] - attn_all)
    # the loop backend runs one attention per sample: two matmuls over M_b^2 scores each
    assert attn == 2 * attn_mm


def test_dit_matches_torch_flop_counter(monkeypatch):
    torch.manual_seed(0)
    m = DiT(input_size=(8, 8), in_channels=4, num_classes=10, hidden_size=64, depth=2,
            num_heads=4, patch_size=2).eval()
    x, t, y = inputs((8, 8), B=2)
    with torch.no_grad():
        _, mat, attn = counted_flops(lambda: m(x, t, y), monkeypatch)
    f = model_flops(m, batch=2)
    L = 16
    attn_all = 2 * attention_macs(torch.tensor([L, L]), 4, 16).sum().item()
    assert mat == 2 * (f["total"] - attn_all)
    assert attn == 2 * 2 * attention_macs(torch.tensor([L, L]), 4, 16, softmax=False).sum().item()


# ------------------------------------------------------------------------------------------
# Measuring along a trajectory
# ------------------------------------------------------------------------------------------

def test_step_macs_and_meter_fold_cfg_branches():
    torch.manual_seed(0)
    m = randomise(tiny_dcdit((8, 8)))
    x, t, y = inputs((8, 8), B=2)
    meter = FlopMeter(m)
    with torch.no_grad():
        out, aux = m(x, t, y)  # step 0: plain forward
        meter(0, 999, x, out, aux)
        # step 1: a Lite-CFG-style doubled batch, conditional rows at rho 0, unconditional at 0.9
        out, aux = m(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]),
                     tail_drop=torch.tensor([0.0, 0.0, 0.9, 0.9]))
        meter(1, 998, x, out, aux)
    rows = step_macs(m, aux)  # (4,): one cost per row of the doubled batch
    assert torch.equal(rows, per_sample_macs(m, aux[0].kept_counts)["total"])
    assert torch.equal(meter.per_step[1], rows[:2] + rows[2:])  # folded onto the 2 images
    assert meter.per_step.shape == (2, 2)
    assert meter.tflops_per_image() == pytest.approx(
        2 * meter.macs_per_image().mean().item() / 1e12)


def test_tail_dropping_lowers_measured_step_cost():
    torch.manual_seed(0)
    m = randomise(tiny_dcdit((8, 8)))
    x, t, y = inputs((8, 8), B=3)
    prev = None
    with torch.no_grad():
        for rho in (0.0, 0.2, 0.4, 0.6, 0.8):
            _, aux = m(x, t, y, tail_drop=rho)
            cur = step_macs(m, aux)
            if prev is not None:
                assert bool((cur <= prev).all()) and bool((cur < prev).any())
            prev = cur


def test_dit_meter_needs_branch_count_under_cfg():
    with torch.device("meta"):
        m = DiT(input_size=(8, 8), in_channels=4, num_classes=10, hidden_size=64, depth=2,
                num_heads=4, patch_size=2)
    x = torch.zeros(3, 4, 8, 8)
    meter = FlopMeter(m, branches=2)
    meter(0, 0, x, None, [])
    assert torch.allclose(meter.macs_per_image(),
                          torch.full((3,), 2 * model_flops(m)["total"], dtype=torch.float64))
