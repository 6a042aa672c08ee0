"""DC-DiT and DiT models: batch independence, attention backends, gradients, init, sizes."""
import pytest
import torch

from dcgen.chunking import grid as G
from dcgen.models import DCDiT, DiT, build, config_node, describe
from dcgen.models.attention import PackInfo, available_backends, varlen_attention
from dcgen.chunking.reference import randomise_zero_inits

RANK_GRIDS = [(24,), (8, 10), (4, 6, 5)]


def tiny_dcdit(grid, **kw):
    args = dict(input_size=grid, in_channels=3, num_classes=5, hidden_size=64, depth=2, num_heads=4,
                norm_groups=8)
    args.update(kw)
    return DCDiT(**args)


def inputs(grid, B=4, C=3, seed=0, classes=5):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, *grid, generator=gen), torch.randint(0, 1000, (B,), generator=gen),
            torch.randint(0, classes + 1, (B,), generator=gen))


@pytest.mark.parametrize("grid", RANK_GRIDS)
@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_batched_forward_equals_per_sample(grid, backend):
    torch.manual_seed(0)
    m = randomise_zero_inits(tiny_dcdit(grid, attn_backend=backend)).eval()
    x, t, y = inputs(grid)
    rho = torch.tensor([0.0, 0.3, 0.5, 0.1])
    out, aux = m(x, t, y, tail_drop=rho)
    counts = aux[0].kept_counts
    assert len(set(counts.tolist())) > 1, "lengths should differ so packing is exercised"
    for b in range(x.shape[0]):
        ob, auxb = m(x[b:b + 1], t[b:b + 1], y[b:b + 1], tail_drop=float(rho[b]))
        assert torch.equal(auxb[0].kept_mask, aux[0].kept_mask[b:b + 1])
        assert (ob - out[b:b + 1]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("grid", RANK_GRIDS)
def test_outputs_do_not_depend_on_sample_order(grid):
    torch.manual_seed(1)
    m = randomise_zero_inits(tiny_dcdit(grid)).eval()
    x, t, y = inputs(grid, seed=3)
    rho = torch.tensor([0.0, 0.2, 0.4, 0.6])
    out, aux = m(x, t, y, tail_drop=rho)
    perm = torch.tensor([3, 1, 0, 2])
    outp, auxp = m(x[perm], t[perm], y[perm], tail_drop=rho[perm])
    assert torch.equal(auxp[0].kept_mask, aux[0].kept_mask[perm])
    assert (outp - out[perm]).abs().max().item() <= 1e-5


def test_packed_sdpa_equals_dense_per_sample_reference():
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 3]
    pack = PackInfo.from_lengths(lengths)
    T, H, d = sum(lengths), 2, 8
    q, k, v = (torch.randn(T, H, d, generator=gen) for _ in range(3))
    for backend in available_backends("cpu"):
        out = varlen_attention(q, k, v, pack, backend)
        s = 0
        for M in lengths:
            qs, ks, vs = q[s:s + M], k[s:s + M], v[s:s + M]  # (M, H, d)
            att = torch.einsum("mhd,nhd->hmn", qs, ks) / d**0.5
            ref = torch.einsum("hmn,nhd->mhd", att.softmax(-1), vs)
            assert (out[s:s + M] - ref).abs().max() <= 1e-6, backend
            s += M


def test_padding_never_influences_attention():
    """Changing what would sit in the padded slots (other samples' content) changes nothing."""
    gen = torch.Generator().manual_seed(0)
    lengths = [2, 7]
    pack = PackInfo.from_lengths(lengths)
    q, k, v = (torch.randn(9, 2, 4, generator=gen) for _ in range(3))
    a = varlen_attention(q, k, v, pack, "sdpa")
    k2, v2 = k.clone(), v.clone()
    k2[2:], v2[2:] = 1e4, -1e4  # sample 1 changes; sample 0 must not see it
    b = varlen_attention(q, k2, v2, pack, "sdpa")
    assert torch.equal(a[:2], b[:2])


@pytest.mark.parametrize("grid", RANK_GRIDS)
def test_every_parameter_gets_a_gradient(grid):
    torch.manual_seed(0)
    m = randomise_zero_inits(tiny_dcdit(grid)).train()
    x, t, y = inputs(grid)
    out, aux = m(x, t, y)
    # only the diffusion output: the router must get gradient through the STE and smoothing alone
    (out**2).mean().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert missing == [], missing


def test_router_gradient_flows_through_ste_and_smoothing_separately(monkeypatch):
    """p reaches the loss through two paths (METHOD §2.12, §5.1): the STE merge and the de-chunk
    weights/blend. Cut one at a time; the router must still get a gradient through the other."""
    import dcgen.models.dcdit as dcdit_mod
    from dcgen.chunking.chunk import DeChunkLayer
    grid = (8, 10)
    torch.manual_seed(0)
    m = randomise_zero_inits(tiny_dcdit(grid)).eval()
    x, t, y = inputs(grid)
    w = m.router.residual_scorer[0].weight

    def router_grad():
        out, _ = m(x, t, y)
        g = torch.autograd.grad((out**2).mean(), w, allow_unused=True)[0]
        return 0.0 if g is None else g.abs().max().item()

    assert router_grad() > 0
    with monkeypatch.context() as mp:  # STE path cut
        mp.setattr(dcdit_mod, "ste", lambda k: torch.ones_like(k).detach())
        assert router_grad() > 0
    with monkeypatch.context() as mp:  # smoothing path cut
        orig = DeChunkLayer.forward
        mp.setattr(DeChunkLayer, "forward", lambda self, z, idx, p: orig(self, z, idx, p.detach()))
        assert router_grad() > 0
        mp.setattr(dcdit_mod, "ste", lambda k: torch.ones_like(k).detach())
        assert router_grad() == 0  # both cut: no other path exists


def test_fresh_models_output_exactly_zero():
    grid = (8, 10)
    x, t, y = inputs(grid)
    out, aux = tiny_dcdit(grid).eval()(x, t, y)
    assert torch.count_nonzero(out) == 0 and out.shape == (4, 6, 8, 10)
    d = DiT(input_size=grid, in_channels=3, num_classes=5, hidden_size=64, depth=2, num_heads=4,
            patch_size=2).eval()
    out, aux = d(x, t, y)
    assert torch.count_nonzero(out) == 0 and out.shape == (4, 6, 8, 10) and aux == []


def test_init_kept_fraction_is_small():
    """Bias -1.1 gives p ~ 0.25: at init only the corners and a few more tokens are kept."""
    torch.manual_seed(0)
    m = DCDiT(input_size=(32, 32), in_channels=4, num_classes=10, hidden_size=128, depth=1,
              num_heads=4).eval()
    x, t, y = inputs((32, 32), C=4, classes=10)
    _, aux = m(x, t, y)
    p = aux[0].boundary_prob
    assert 0.15 < p.mean().item() < 0.35
    assert aux[0].kept_counts.float().mean() < 0.1 * 1024


@pytest.mark.parametrize("grid,patch", [((16,), 4), ((8, 12), 2), ((4, 8, 8), (1, 2, 2))])
def test_patch_sizes_and_unpatchify(grid, patch):
    torch.manual_seed(0)
    for mode in ("overlap", "dit"):
        m = randomise_zero_inits(tiny_dcdit(grid, patch_size=patch, patch_mode=mode)).eval()
        x, t, y = inputs(grid)
        out, aux = m(x, t, y)
        assert out.shape == (4, 6, *grid)
        assert aux[0].boundary_prob.shape[1] == G.numel(m.token_grid)


def test_unpatchify_layout_matches_dit_order():
    from dcgen.models.layers import unpatchify
    B, g, P, C = 1, (2, 3), (2, 2), 3
    tokens = torch.arange(B * 6 * 4 * C, dtype=torch.float32).view(B, 6, 4 * C)
    img = unpatchify(tokens, g, P, C)
    # DiT: token (h, w) holds (p, q, c) with c fastest; pixel (h*P+p, w*P+q), channel c
    for h in range(2):
        for w in range(3):
            for p in range(2):
                for q in range(2):
                    for c in range(C):
                        assert img[0, c, h * 2 + p, w * 2 + q] == tokens[0, h * 3 + w, (p * 2 + q) * C + c]


def test_bf16_autocast_keeps_router_and_dechunk_fp32():
    torch.manual_seed(0)
    grid = (8, 10)
    # DiT's label init: the tolerance below was set for conditioning of that size (with N(0, 1)
    # codes and randomised adaLN weights the bf16 modulation error is ~3x larger)
    m = randomise_zero_inits(tiny_dcdit(grid, class_embed_std=0.02)).eval()
    x, t, y = inputs(grid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, aux = m(x, t, y)
    assert aux[0].boundary_prob.dtype == torch.float32
    ref, aux32 = m(x, t, y)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3


def test_compat_flags_change_init_and_attention_dtype():
    torch.manual_seed(0)
    m = tiny_dcdit((8, 10), block_adaln_init="xavier", residual_proj_init="xavier")
    assert m.blocks[0].adaLN_modulation[1].weight.abs().max() > 0
    assert m.residual_proj.weight.abs().max() > 0 and m.residual_proj.bias.abs().max() == 0
    assert m.final_layer.linear.weight.abs().max() == 0  # still zeroed in [R]
    with pytest.raises(ValueError):
        tiny_dcdit((8, 10), block_adaln_init="ones")
    m2 = randomise_zero_inits(tiny_dcdit((8, 10), attn_qkv_bf16=True)).eval()
    m3 = randomise_zero_inits(tiny_dcdit((8, 10))).eval()
    m3.load_state_dict(m2.state_dict())
    x, t, y = inputs((8, 10))
    a, b = m2(x, t, y)[0], m3(x, t, y)[0]
    assert 0 < (a - b).abs().max() < 0.05 * b.abs().max()  # bf16 rounding, nothing more


def test_unconditional_model_has_no_label_table():
    m = tiny_dcdit((8, 10), num_classes=0)
    assert m.y_embedder is None
    x, t, _ = inputs((8, 10))
    out, _ = m(x, t, None)
    assert out.shape == (4, 6, 8, 10)


def test_dit_rejects_tail_drop():
    d = DiT(input_size=(8, 8), in_channels=3, num_classes=5, hidden_size=64, depth=1, num_heads=4)
    x, t, y = inputs((8, 8))
    with pytest.raises(ValueError, match="tail_drop"):
        d(x, t, y, tail_drop=0.5)


def count(m, trainable_only=True):
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)


# METHOD §7.2: trainable parameters (the paper's counts add the L*D sin-cos table)
DCDIT_COUNTS = {"S": 34.37e6, "B": 136.34e6, "L": 468.56e6, "XL": 688.41e6}
DCDIT_COUNTS_PE = {"S": 34.76e6, "B": 137.13e6, "L": 469.61e6, "XL": 689.59e6}


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def test_dcdit_parameter_counts(size):
    with torch.device("meta"):  # the paper sizes live in configs/model/dcdit_<size>.yaml
        m = build(config_node(f"dcdit_{size.lower()}"), input_size=[32, 32], in_channels=4, num_classes=1000)
    n = count(m)
    assert abs(n - DCDIT_COUNTS[size]) < 0.006e6
    assert abs(n + 1024 * m.config["hidden_size"] - DCDIT_COUNTS_PE[size]) < 0.006e6
    assert "pos_embed" not in m.state_dict()


def test_dcdit_b_breakdown():
    with torch.device("meta"):
        m = DCDiT(input_size=(32, 32), in_channels=4, num_classes=1000)
    parts = {"x_embedder": 0.007, "t_embedder": 0.788, "y_embedder": 0.769, "encoder": 2.770,
             "decoder": 2.769, "router": 0.812, "residual_proj": 0.591, "final_layer": 0.297}
    for name, want in parts.items():
        assert abs(count(getattr(m, name)) / 1e6 - want) < 0.0015, name
    backbone = count(m.blocks) + count(m.backbone_norm)
    assert abs(backbone / 1e6 - 127.541) < 0.0015


# [DiT] Table 4 / README: S 33M, B 130M, L 458M, XL 675M (XL/2: 675.1M incl. the frozen pos_embed)
@pytest.mark.parametrize("size,want", [("S", 33), ("B", 130), ("L", 458), ("XL", 675)])
def test_dit_parameter_counts(size, want):
    with torch.device("meta"):
        m = build(config_node(f"dit_{size.lower()}_2"), input_size=[32, 32], in_channels=4, num_classes=1000)
    n = count(m) + 256 * m.config["hidden_size"]
    assert abs(n / 1e6 - want) < 0.6  # the paper rounds inconsistently (S 32.96M, B 130.51M)
    if size == "XL":
        assert n == 675_129_632  # the count the DiT release prints for DiT-XL/2


# ------------------------------------------------------------------------------------------
# CUDA-only checks (skipped on CPU): varlen kernels against the portable SDPA path, bf16 steps
# ------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_varlen_backends_match_sdpa(dtype):
    gen = torch.Generator().manual_seed(0)
    lengths = [37, 1, 250, 64]
    pack = PackInfo.from_lengths(lengths, device="cuda")
    q, k, v = (torch.randn(sum(lengths), 4, 64, generator=gen).to("cuda", dtype) for _ in range(3))
    ref = varlen_attention(q.float(), k.float(), v.float(), pack, "sdpa")
    backends = [b for b in available_backends("cuda") if b in ("xformers", "native")]
    assert backends, "no CUDA varlen backend available"
    for b in backends:
        out = varlen_attention(q, k, v, pack, b)
        assert (out.float() - ref).abs().max() < 2e-2, b


@pytest.mark.gpu
def test_cuda_bf16_training_step_and_batch_independence():
    torch.manual_seed(0)
    grid = (16, 16)
    m = randomise_zero_inits(tiny_dcdit(grid)).cuda()
    x, t, y = (a.cuda() for a in inputs(grid))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, aux = m(x, t, y, tail_drop=0.2)
        loss = out.float().square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    opt.step()
    m.eval()
    # Batch independence is a masking property: check it in fp32 with TF32 off, where a leak
    # of 1e-4 stands out (the effect a missing mask had on CPU was 3e-3). bf16 would hide it:
    # one bf16 ulp of an O(1) output is 4e-3.
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for backend in [b for b in available_backends("cuda") if b != "native"]:  # native: half only
            for blk in m.blocks:
                blk.attn.backend = backend
            with torch.no_grad():
                out, _ = m(x, t, y)
                one, _ = m(x[:1], t[:1], y[:1])
            assert (out[:1] - one).abs().max() < 1e-5, backend
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    if "native" in available_backends("cuda"):
        # the flash kernel runs per segment: batched and single rows differ only by the bf16
        # rounding of the Linears around it, well under one ulp on average
        for blk in m.blocks:
            blk.attn.backend = "native"
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out, _ = m(x, t, y)
            one, _ = m(x[:1], t[:1], y[:1])
        assert (out[:1].float() - one.float()).abs().mean() < 1e-3


def test_uniform_lengths_fast_path_equals_loop():
    gen = torch.Generator().manual_seed(2)
    pack = PackInfo.from_lengths([6, 6, 6])
    assert pack.uniform
    q, k, v = (torch.randn(18, 2, 8, generator=gen) for _ in range(3))
    assert torch.allclose(varlen_attention(q, k, v, pack, "sdpa"), varlen_attention(q, k, v, pack, "loop"),
                          atol=1e-6)


# ------------------------------------------------------------------------------------------
# Properties that a plausible-looking mistake would break (each checked against its mutation)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", RANK_GRIDS)
def test_backbone_input_is_encoder_tokens_plus_pos_embed_at_grid_coordinates(grid):
    """The first block sees, per sample in raster order, E at the kept positions plus the sin-cos
    table at those positions' ORIGINAL grid coordinates (not at their packed slot)."""
    torch.manual_seed(0)
    m = randomise_zero_inits(tiny_dcdit(grid), router_bias=2.0).eval()  # p well above 0.5 often
    x, t, y = inputs(grid, B=3)
    seen = {}
    h1 = m.encoder.register_forward_hook(lambda mod, a, out: seen.__setitem__("e", out))
    h2 = m.blocks[0].register_forward_pre_hook(lambda mod, a: seen.__setitem__("z", a[0]))
    with torch.no_grad():
        _, aux = m(x, t, y, tail_drop=torch.tensor([0.0, 0.3, 0.5]))
    h1.remove(), h2.remove()
    kept = aux[0].kept_mask  # (B, L)
    pe = G.sincos_pos_embed(m.token_grid, m.pos_embed.shape[-1])  # independent of the model's buffer
    want = []
    for b in range(kept.shape[0]):
        pos = kept[b].nonzero().flatten()  # raster order
        assert len(pos) > 2  # more than the forced corners: slots and coordinates differ
        want.append(seen["e"][b, pos].float() + pe[pos])
    assert torch.allclose(seen["z"], torch.cat(want), atol=1e-6)


@pytest.mark.parametrize("backend", available_backends("cpu") + ["auto"])
def test_each_sample_attends_only_to_itself(backend):
    """Per-sample reference for every sample, and sample i's output is bit-identical when any
    other sample's q/k/v change (a padded layout filled with a neighbour's tokens, or a missing
    key mask, fails one of the two)."""
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 9, 3, 9]
    pack = PackInfo.from_lengths(lengths)
    T, H, d = sum(lengths), 2, 8
    q, k, v = (torch.randn(T, H, d, generator=gen) for _ in range(3))
    out = varlen_attention(q, k, v, pack, backend)
    starts = [0, 5, 14, 17]
    for b, (s, M) in enumerate(zip(starts, lengths)):
        ref = torch.softmax(torch.einsum("mhd,nhd->hmn", q[s:s + M], k[s:s + M]) / d**0.5, -1)
        ref = torch.einsum("hmn,nhd->mhd", ref, v[s:s + M])
        assert (out[s:s + M] - ref).abs().max() <= 1e-6, (backend, b)
        others = torch.ones(T, 1, 1)
        others[s:s + M] = 0
        q2, k2, v2 = (a + 3.0 * others * torch.randn(T, H, d, generator=gen) for a in (q, k, v))
        out2 = varlen_attention(q2, k2, v2, pack, backend)
        assert torch.equal(out2[s:s + M], out[s:s + M]), (backend, b)


@pytest.mark.parametrize("grid", RANK_GRIDS)
def test_conv_padding_decides_whether_a_flat_input_routes_flat(grid):
    """A constant input carries no position: with replicate/reflect padding every full-resolution
    conv keeps it constant, so the router's probabilities are one value on every token it is
    free to choose; zero padding makes the border tokens differ (the position leak that draws
    the clean-timestep stripes, docs/results.md)."""
    x = torch.full((2, 3, *grid), -1.0)
    t, y = torch.tensor([0, 500]), torch.tensor([1, 2])
    spread = {}
    for mode in ("zeros", "replicate", "reflect"):
        torch.manual_seed(0)
        m = randomise_zero_inits(tiny_dcdit(grid, conv_padding=mode)).eval()
        with torch.no_grad():
            _, aux = m(x, t, y)
        p = aux[0].boundary_prob
        free = p < 1  # the forced boundaries (first/last token) are exactly 1
        spread[mode] = max(float(p[b][free[b]].max() - p[b][free[b]].min()) for b in range(2))
    assert spread["replicate"] < 1e-5 and spread["reflect"] < 1e-5, spread
    assert spread["zeros"] > 1e-3, spread


def test_conv_padding_is_checked_and_described():
    with pytest.raises(ValueError, match="conv_padding"):
        tiny_dcdit((8, 8), conv_padding="circularish")
    m = tiny_dcdit((8, 8), conv_padding="reflect")
    assert m.config["conv_padding"] == "reflect"
    assert build(describe(m)).conv_padding == "reflect"
