"""Precision rules under bf16 autocast (docs/design.md, "Precision under autocast"; METHOD §2.9,
§2.11-2.12, §7.1, §11 Q3/Q4, D21), whole-bf16 models, and the cost-based attention choice."""
import pytest
import torch
import torch.nn.functional as F

from dcgen import export_model, load_model
from dcgen.chunking import grid as G
from dcgen.chunking.router import finish_probs
from dcgen.models import DCDiT, DiT
from dcgen.models import attention as A
from dcgen.chunking.reference import randomise_zero_inits

BF16 = torch.bfloat16
COMPAT = dict(block_adaln_init="xavier", residual_proj_init="xavier", residual_autocast=True,
              attn_qkv_bf16=True, tail_drop_protect_forced=False)


def randomise(model, seed=0):
    return randomise_zero_inits(model, seed).eval()


def tiny_dcdit(seed=0, grid=(16, 16), **kw):
    torch.manual_seed(seed)
    return randomise(DCDiT(input_size=grid, in_channels=4, num_classes=10, hidden_size=64, depth=2,
                           num_heads=4, encoder_dim=32, **kw), seed)


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    return randomise(DiT(input_size=(8, 8), in_channels=4, num_classes=10, hidden_size=64, depth=2,
                         num_heads=4, patch_size=2), seed)


def inputs(grid, B=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, *grid, generator=gen), torch.randint(0, 1000, (B,), generator=gen),
            torch.randint(0, 10, (B,), generator=gen))


def fix_routing(model, B, density=0.3, seed=0):
    """Replace the router's p by a fixed target (p + (target - p).detach(): the router still runs
    and gets gradients) whose values stay >= 0.005 from 0.5, so two forwards at different
    precisions keep the same tokens and compare arithmetic, not a routing flip."""
    grid = tuple(model.token_grid)
    L = G.numel(grid)
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(B, L, generator=gen) * 0.49 + 0.005  # (0.005, 0.495)
    target = target + 0.5 * (torch.rand(B, L, generator=gen) < density)
    return model.router.register_forward_hook(
        lambda m, a, out: finish_probs(out.boundary_prob + (target - out.boundary_prob).detach(), grid))


class Spy:
    """Forward hooks recording the dtypes and values that cross module boundaries."""

    def __init__(self, model, names):
        self.calls: dict[str, list] = {n: [] for n in names}
        self.handles = []
        for n in names:
            mod = model.get_submodule(n)
            self.handles.append(mod.register_forward_hook(
                lambda m, a, o, n=n: self.calls[n].append((a, o))))

    def remove(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------------------
# 1. the residual stream is fp32 under autocast, in DiT and DC-DiT alike
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_dcdit, tiny_dit])
def test_blocks_receive_and_return_an_fp32_stream_under_autocast(make):
    m = make()
    grid = tuple(m.config["input_size"])
    x, t, y = inputs(grid)
    names = [f"blocks.{i}" for i in range(len(m.blocks))]
    if isinstance(m, DCDiT):
        names += ["router", "dechunk", "backbone_norm"]
    spy = Spy(m, names)
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        out, aux = m(x, t, y)
    spy.remove()
    for i in range(len(m.blocks)):
        (args, o), = spy.calls[f"blocks.{i}"]
        assert args[0].dtype == torch.float32, f"block {i} input is {args[0].dtype}"
        assert o.dtype == torch.float32, f"block {i} output is {o.dtype}"
    if isinstance(m, DCDiT):
        (r_args, route), = spy.calls["router"]
        assert route.boundary_prob.dtype == route.selected_probs.dtype == torch.float32
        assert aux[0].boundary_prob.dtype == torch.float32
        (d_args, zt), = spy.calls["dechunk"]
        assert zt.dtype == torch.float32
        # router and de-chunk compute in fp32 with autocast off: outside autocast, on the same
        # inputs, they give the same bits
        with torch.no_grad():
            assert torch.equal(m.router(*r_args).boundary_prob, route.boundary_prob)
            assert torch.equal(m.dechunk(*d_args), zt)
        (_, zn), = spy.calls["backbone_norm"]
        assert zn.dtype == torch.float32
    # the branches did run in bf16: the output of the final Linear is in the autocast dtype
    assert out.dtype == BF16


# ------------------------------------------------------------------------------------------
# 2. a bf16-autocast forward matches the fp32 forward
# ------------------------------------------------------------------------------------------

def test_bf16_autocast_forward_matches_fp32():
    m = tiny_dcdit(seed=0)
    x, t, y = inputs((16, 16))
    with torch.no_grad():
        o32, a32 = m(x, t, y)
        with torch.autocast("cpu", dtype=BF16):
            o16, a16 = m(x, t, y)
    p32, p16 = a32[0].boundary_prob, a16[0].boundary_prob
    # p is computed in fp32 from the encoder output E, which autocast rounds to bf16 (unit
    # roundoff 2^-9 ~ 2e-3 per op, a few convs deep): |dp| measured <= 2e-3 on this fixture
    assert (p16 - p32).abs().max() < 4e-3
    # a token can only flip when its p moved across 0.5; farther than 1e-3 from it nothing flips
    far = (p32 - 0.5).abs() > 1e-3
    assert torch.equal(a16[0].boundary_mask[far], a32[0].boundary_mask[far])
    assert torch.equal(a16[0].kept_mask[far], a32[0].kept_mask[far])

    # outputs, with the routing held fixed (a flipped token legitimately changes its neighbourhood)
    h = fix_routing(m, B=4)
    with torch.no_grad():
        o32, a32 = m(x, t, y)
        with torch.autocast("cpu", dtype=BF16):
            o16, a16 = m(x, t, y)
    h.remove()
    assert torch.equal(a16[0].kept_mask, a32[0].kept_mask)
    assert len(set(a32[0].kept_counts.tolist())) > 1  # unequal lengths: packing is exercised
    # Tolerance: bf16 keeps 8 mantissa bits, ~4e-3 relative per rounded op. About 15 roundings lie
    # in sequence between input and output (patch embed, 4 encoder convs, 2 x (qkv, attention,
    # proj, fc1, fc2), 4 decoder convs, final Linear); as independent errors they add up to
    # ~sqrt(15) x 4e-3 ~ 1.5e-2 relative; measured 9e-3 (max and RMS, relative to the output's
    # max and RMS). A wrong cast or a dropped term exceeds 2-3e-2 by far.
    d = o16.float() - o32
    assert d.abs().max() <= 3e-2 * o32.abs().max()
    assert d.pow(2).mean().sqrt() <= 2e-2 * o32.pow(2).mean().sqrt()


# ------------------------------------------------------------------------------------------
# 3. compat=reference: [R]'s own precision (Q3 merge promoted to fp32, Q4 q/k/v in bf16)
# ------------------------------------------------------------------------------------------

def test_compat_follows_the_reference_precision(monkeypatch):
    m = tiny_dcdit(seed=1, **COMPAT)
    x, t, y = inputs((16, 16), seed=1)
    qkv_dtypes = []
    real = A.varlen_attention

    def spy_attention(q, k, v, pack, backend="auto"):
        qkv_dtypes.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, pack, backend)

    monkeypatch.setattr("dcgen.models.dit.varlen_attention", spy_attention)
    spy = Spy(m, ["dechunk", "residual_proj", "router"])
    pre = []
    hd = m.decoder.register_forward_pre_hook(lambda mod, a: pre.append(a[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        m(x, t, y)
    hd.remove()
    spy.remove()
    (_, zt), = spy.calls["dechunk"]
    (_, res), = spy.calls["residual_proj"]
    (_, route), = spy.calls["router"]
    assert zt.dtype == torch.float32
    assert res.dtype == BF16  # Q3: residual_proj under autocast
    # [R]: residual_func(h.to(residual.dtype), residual, p) = h * ste(p) + residual, ste(p) being
    # fp32 ones like the fp32 p: the product and the sum are promoted to fp32
    ones = torch.ones_like(route.selected_probs)[..., None]
    assert ones.dtype == torch.float32
    want = zt.to(res.dtype) * ones + res
    assert want.dtype == torch.float32
    (merged,) = pre
    assert merged.dtype == torch.float32
    assert torch.equal(merged, want)
    # ... which is not what a merge computed in bf16 gives
    assert not torch.equal(merged, (zt.to(BF16) * ones.to(BF16) + res).float())
    assert qkv_dtypes and all(d == (BF16,) * 3 for d in qkv_dtypes)  # Q4 under autocast

    # Q4 also in an fp32 run: q/k/v cast to bf16 before the kernel, output cast back
    qkv_dtypes.clear()
    spy = Spy(m, ["blocks.0.attn", "residual_proj"])
    with torch.no_grad():
        m(x, t, y)
    spy.remove()
    assert qkv_dtypes and all(d == (BF16,) * 3 for d in qkv_dtypes)
    (_, attn_out), = spy.calls["blocks.0.attn"]
    (_, res32), = spy.calls["residual_proj"]
    assert attn_out.dtype == res32.dtype == torch.float32


def test_default_residual_projection_is_fp32_under_autocast():
    m = tiny_dcdit(seed=2)
    x, t, y = inputs((16, 16), seed=2)
    spy = Spy(m, ["residual_proj", "dechunk"])
    pre = []
    hd = m.decoder.register_forward_pre_hook(lambda mod, a: pre.append(a[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        _, aux = m(x, t, y)
    hd.remove()
    spy.remove()
    (args, res), = spy.calls["residual_proj"]
    (_, zt), = spy.calls["dechunk"]
    assert args[0].dtype == res.dtype == torch.float32
    assert torch.equal(res, F.linear(args[0], m.residual_proj.weight, m.residual_proj.bias))
    assert torch.equal(pre[0], zt * 1.0 + res)  # Z~ STE(kappa) + R in fp32 (STE forward is 1)


# ------------------------------------------------------------------------------------------
# 4. dcgen.load_model(path, dtype=torch.bfloat16)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [tiny_dcdit, tiny_dit])
def test_load_model_in_bf16_runs_like_fp32_under_autocast(make, tmp_path):
    m = make(seed=3)
    grid = tuple(m.config["input_size"])
    x, t, y = inputs(grid, seed=3)
    out_dir = export_model(m, tmp_path / "exp")
    mb = load_model(out_dir, dtype=BF16)
    assert all(p.dtype == BF16 for p in mb.parameters())
    hooks = [fix_routing(mod, B=4) for mod in (m, mb) if isinstance(mod, DCDiT)]
    names = [f"blocks.{i}" for i in range(len(mb.blocks))]
    spy = Spy(mb, names)
    with torch.no_grad():
        out, aux = mb(x, t, y)
        with torch.autocast("cpu", dtype=BF16):
            ref, _ = m(x, t, y)
    spy.remove()
    for h in hooks:
        h.remove()
    # a bf16-weight model computes as the fp32 model under bf16 autocast: fp32 stream and islands
    assert all(args[0].dtype == o.dtype == torch.float32 for n in names for args, o in spy.calls[n])
    if aux:
        assert aux[0].boundary_prob.dtype == torch.float32
    assert out.dtype == BF16 and torch.isfinite(out).all()
    # the only extra error is the weights' own rounding to bf16 (~4e-3 relative each)
    d = out.float() - ref.float()
    assert d.abs().max() <= 3e-2 * ref.float().abs().max()


# ------------------------------------------------------------------------------------------
# 5. the attention path `auto` takes on the CPU
# ------------------------------------------------------------------------------------------

def sdpa_calls(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((tuple(q.shape), attn_mask is not None))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy)
    return calls


def per_sample_reference(q, k, v, lengths):
    out, s = [], 0
    for M in lengths:  # plain softmax attention, one sequence at a time, in float64
        qs, ks, vs = (t[s:s + M].double().transpose(0, 1) for t in (q, k, v))  # (H, M, d)
        w = torch.softmax(qs @ ks.transpose(1, 2) / qs.shape[-1] ** 0.5, dim=-1)
        out.append((w @ vs).transpose(0, 1))
        s += M
    return torch.cat(out).float()


def test_auto_attention_on_cpu_never_pads_unequal_lengths(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    lengths = [37, 12, 36, 50]
    pack = A.PackInfo.from_lengths(lengths)
    q, k, v = (torch.randn(sum(lengths), 4, 16, generator=gen) for _ in range(3))
    assert A.resolve_backend("auto", q, pack) == "loop"
    calls = sdpa_calls(monkeypatch)
    out = A.varlen_attention(q, k, v, pack, "auto")
    assert [c[0] for c in calls] == [(1, 4, M, 16) for M in lengths]  # one call per sequence
    assert not any(masked for _, masked in calls)
    assert (out - per_sample_reference(q, k, v, lengths)).abs().max() <= 1e-5
    # nearly equal lengths (2 % padding waste) still cost more padded than per sample on a CPU
    assert A.resolve_backend("auto", q, A.PackInfo.from_lengths([50, 49])) == "loop"


def test_auto_attention_on_cpu_equal_lengths_is_one_unpadded_call(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    lengths = [24, 24, 24]
    pack = A.PackInfo.from_lengths(lengths)
    q, k, v = (torch.randn(sum(lengths), 4, 16, generator=gen) for _ in range(3))
    assert A.resolve_backend("auto", q, pack) == "sdpa"
    calls = sdpa_calls(monkeypatch)
    out = A.varlen_attention(q, k, v, pack, "auto")
    assert calls == [((3, 4, 24, 16), False)]  # one batched call, no padding, no mask
    assert (out - per_sample_reference(q, k, v, lengths)).abs().max() <= 1e-5


def test_dcdit_forward_with_auto_attention_uses_the_per_sample_path(monkeypatch):
    m = tiny_dcdit(seed=4, grid=(8, 8))
    x, t, y = inputs((8, 8), seed=4)
    h = fix_routing(m, B=4)
    calls = sdpa_calls(monkeypatch)
    with torch.no_grad():
        out, aux = m(x, t, y)
    lengths = aux[0].kept_counts.tolist()
    assert len(set(lengths)) > 1
    assert len(calls) == len(m.blocks) * len(lengths) and not any(masked for _, masked in calls)
    for blk in m.blocks:
        blk.attn.backend = "loop"
    with torch.no_grad():
        ref, _ = m(x, t, y)
    h.remove()
    assert torch.equal(out, ref)


@pytest.mark.gpu
def test_cuda_autocast_keeps_the_stream_fp32():
    m = tiny_dcdit().cuda()
    x, t, y = (a.cuda() for a in inputs((16, 16)))
    names = [f"blocks.{i}" for i in range(len(m.blocks))] + ["dechunk"]
    spy = Spy(m, names)
    with torch.no_grad(), torch.autocast("cuda", dtype=BF16):
        out, aux = m(x, t, y)
    spy.remove()
    assert all(a[0].dtype == o.dtype == torch.float32 for n in names for a, o in spy.calls[n])
    assert aux[0].boundary_prob.dtype == torch.float32 and out.dtype == BF16
