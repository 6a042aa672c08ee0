"""The N-D chunking core against its dense definitions (METHOD §3-§6)."""
import math

import pytest
import torch

from dcgen.chunking import ChunkIndex, ChunkLayer, DeChunkLayer, RoutingModule, ratio_loss, ste
from dcgen.chunking import grid as G
from dcgen.chunking.chunk import tail_drop_mask
from dcgen.chunking.router import CosineRouter, CausalCosineRouter, finish_probs
from dcgen.chunking.reference import dense_dechunk, dense_plug_back, random_mask

GRIDS = [(37,), (8, 11), (4, 6, 5), (32, 32)]
DENSITIES = [0.02, 0.1, 0.3, 0.6]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("density", DENSITIES)
def test_plug_back_equals_dense_oracle_exactly(grid, density):
    gen = torch.Generator().manual_seed(hash((grid, density)) % 2**31)
    mask = random_mask(3, grid, density, gen, force_corners=density > 0.05)
    got = G.nearest_kept_source(mask, grid)
    want = dense_plug_back(mask, grid)
    assert torch.equal(got, want)


def test_plug_back_ties_are_common_and_resolved_to_earliest():
    # two kept tokens equidistant from the middle: the earlier one must win
    grid = (1, 9)
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, [2, 6]] = True
    src = G.nearest_kept_source(mask, grid)
    assert src[0, 4].item() == 2
    # 2D: diagonal ties resolved in raster order, and the tie count is substantial
    gen = torch.Generator().manual_seed(0)
    grid = (16, 16)
    mask = random_mask(4, grid, 0.1, gen)
    u = G.coordinates(grid)
    ties = 0
    for b in range(4):
        kept = torch.nonzero(mask[b]).squeeze(1)
        d2 = ((u[:, None] - u[kept][None]) ** 2).sum(-1)
        ties += ((d2 == d2.min(1, keepdim=True).values).sum(1) > 1).sum().item()
    assert ties > 0.1 * 4 * 256
    assert torch.equal(G.nearest_kept_source(mask, grid), dense_plug_back(mask, grid))


@pytest.mark.parametrize("weights", [(1, 2, 2), (3, 1, 1)])
def test_plug_back_with_axis_weights(weights):
    gen = torch.Generator().manual_seed(1)
    grid = (4, 6, 5)
    mask = random_mask(2, grid, 0.15, gen)
    assert torch.equal(G.nearest_kept_source(mask, grid, weights), dense_plug_back(mask, grid, weights))


def _dechunk_case(grid, density, sigma, seed, B=2, D=8, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(B, grid, density, gen)
    idx = ChunkIndex.from_mask(mask, grid)
    z = torch.randn(idx.total, D, generator=gen, requires_grad=requires_grad)
    p = torch.rand(B, G.numel(grid), generator=gen)
    p = torch.where(mask, 0.5 + 0.5 * p, 0.5 * p)  # consistent with the mask
    p.requires_grad_(requires_grad)
    return mask, idx, z, p


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("density", DENSITIES)
def test_smoothing_equals_dense_formula(grid, density):
    sigma = G.per_axis(1.0, len(grid), "s") if grid != (32, 32) else (2.0, 2.0)
    mask, idx, z, p = _dechunk_case(grid, density, sigma, seed=7)
    got = DeChunkLayer(sigma=sigma)(z, idx, p)
    want = dense_dechunk(z, mask, p, grid, sigma)
    assert (got.double() - want).abs().max().item() <= 1e-6


def test_smoothing_per_axis_sigma():
    grid = (4, 6, 5)
    sigma = (0.7, 1.5, 2.0)
    mask, idx, z, p = _dechunk_case(grid, 0.2, sigma, seed=3)
    got = DeChunkLayer(sigma=sigma)(z, idx, p)
    assert (got.double() - dense_dechunk(z, mask, p, grid, sigma)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("grid", [(37,), (8, 11), (4, 6, 5)])
def test_dechunk_gradients_match_dense(grid):
    mask, idx, z, p = _dechunk_case(grid, 0.3, 1.0, seed=11, requires_grad=True)
    g_out = torch.randn(2, G.numel(grid), 8, generator=torch.Generator().manual_seed(5))
    (DeChunkLayer(1.0)(z, idx, p) * g_out).sum().backward()
    gz, gp = z.grad.clone(), p.grad.clone()
    z2 = z.detach().double().requires_grad_()
    p2 = p.detach().double().requires_grad_()
    (dense_dechunk(z2, mask, p2, grid, 1.0) * g_out.double()).sum().backward()
    for a, b in ((gz, z2.grad), (gp, p2.grad)):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max().clamp_min(1e-12)


def test_separable_gaussian_never_builds_pairwise_tensors():
    """The de-chunk allocates O(B L D): check peak allocation on a grid where (B, M, M) would be huge."""
    grid = (16, 32, 32)
    mask, idx, z, p = _dechunk_case(grid, 0.25, 1.0, seed=0, B=1, D=16)
    M = idx.total
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        DeChunkLayer(1.0)(z, idx, p)
    biggest = max(e.cpu_memory_usage for e in prof.key_averages())
    assert biggest < 4 * M * M  # a single (M, M) fp32 tensor would be 4 M^2 bytes (~16.8 GB here)


# ------------------------------------------------------------------------------------------
# Router, chunk layer and tail dropping, for every rank
# ------------------------------------------------------------------------------------------

RANK_GRIDS = [(37,), (8, 11), (4, 6, 5)]


def _route(grid, B=4, D=32, seed=0, bias=0.0):
    torch.manual_seed(seed)
    r = RoutingModule(D, len(grid), router_dim=16, bias_init=bias)
    e = torch.randn(B, G.numel(grid), D)
    return r, e, r(e, grid)


@pytest.mark.parametrize("grid", RANK_GRIDS)
def test_router_forces_corners_and_thresholds_strictly(grid):
    r, e, out = _route(grid)
    L = G.numel(grid)
    assert out.boundary_prob.dtype == torch.float32
    assert torch.all(out.boundary_prob[:, 0] == 1) and torch.all(out.boundary_prob[:, L - 1] == 1)
    assert torch.equal(out.boundary_mask, out.boundary_prob > 0.5)
    kappa = torch.where(out.boundary_mask, out.boundary_prob, 1 - out.boundary_prob)
    assert torch.equal(out.selected_probs, kappa)
    # exactly 0.5 is not a boundary
    fp = finish_probs(torch.full((1, L), 0.5), grid)
    assert fp.boundary_mask.sum() == len(G.corner_indices(grid))


def test_router_init_bias_and_no_gradient_to_forced_logits():
    grid = (8, 11)
    r, e, _ = _route(grid, bias=-1.1)
    assert r.residual_scorer[3].bias.item() == pytest.approx(-1.1)
    e.requires_grad_(True)
    out = r(e, grid)
    p = out.boundary_prob
    g = torch.zeros_like(p)
    g[:, 0] = 1.0
    g[:, -1] = 1.0
    (p * g).sum().backward()
    assert e.grad.abs().max() == 0  # only forced entries carried gradient, and they carry none


def test_router_runs_in_fp32_under_autocast():
    grid = (8, 11)
    r, e, _ = _route(grid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(e.bfloat16(), grid)
    assert out.boundary_prob.dtype == torch.float32


@pytest.mark.parametrize("cls,grid", [(CosineRouter, (8, 11)), (CosineRouter, (4, 6, 5)),
                                      (CausalCosineRouter, (37,))])
def test_cosine_routers(cls, grid):
    torch.manual_seed(0)
    r = cls(16, len(grid))
    e = torch.randn(2, G.numel(grid), 16)
    out = r(e, grid)
    assert out.boundary_prob.min() >= 0 and out.boundary_prob.max() <= 1
    assert torch.all(out.boundary_prob[:, 0] == 1)
    # identical tokens everywhere -> cosine 1 -> p = 0 except the forced corners
    same = r(torch.ones(1, G.numel(grid), 16), grid)
    assert same.boundary_mask.sum() == len(G.corner_indices(grid))


@pytest.mark.parametrize("grid", RANK_GRIDS)
def test_kept_counts_and_forced_tokens(grid):
    r, e, route = _route(grid, bias=0.0)
    z, idx = ChunkLayer()(e, route, grid)
    assert torch.equal(idx.kept_counts, (route.boundary_prob > 0.5).sum(1))
    assert idx.kept_mask[:, 0].all() and idx.kept_mask[:, -1].all()
    # packed order: sample by sample, raster order inside a sample
    for b in range(e.shape[0]):
        s, t = idx.cu_seqlens[b].item(), idx.cu_seqlens[b + 1].item()
        pos = idx.pos_idx[s:t]
        assert torch.all(pos[1:] > pos[:-1])
        assert torch.equal(z[s:t], e[b, pos])


@pytest.mark.parametrize("grid", RANK_GRIDS)
@pytest.mark.parametrize("rho", [0.1, 0.3, 0.6, 0.9, "per-sample"])
def test_tail_drop_removes_floor_rho_n_lowest(grid, rho):
    r, e, route = _route(grid, bias=0.0, B=4)
    p, nat = route.boundary_prob, route.boundary_mask
    B, L = p.shape
    rhos = torch.tensor([0.0, 0.25, 0.5, 0.75]) if rho == "per-sample" else torch.full((B,), rho)
    kept = tail_drop_mask(p, nat, rhos if rho == "per-sample" else rho, grid)
    corners = list(G.corner_indices(grid))
    for b in range(B):
        n = int(nat[b].sum())
        n_forced = len(corners)
        n_drop = min(math.floor(float(torch.tensor(rhos[b].item(), dtype=torch.float32) * n)), n - n_forced)
        assert int(kept[b].sum()) == n - n_drop
        assert kept[b, corners].all()
        assert not (kept[b] & ~nat[b]).any()
        dropped = nat[b] & ~kept[b]
        if dropped.any():
            # every dropped token has p <= every kept non-forced token
            kept_nf = kept[b].clone()
            kept_nf[corners] = False
            if kept_nf.any():
                assert p[b, dropped].max() <= p[b, kept_nf].min()


def test_tail_drop_ties_keep_the_earlier_token():
    grid = (1, 10)
    p = torch.tensor([[1.0, 0.9, 0.7, 0.7, 0.7, 0.8, 0.7, 0.2, 0.1, 1.0]])
    kept = tail_drop_mask(p, p > 0.5, 0.5, grid)  # 8 boundaries -> drop 4
    # non-forced ranking: 0.9(1), 0.8(5), 0.7(2), 0.7(3), 0.7(4), 0.7(6) -> keep top 2
    assert kept[0].nonzero().squeeze(1).tolist() == [0, 1, 5, 9]
    kept = tail_drop_mask(p, p > 0.5, 0.3, grid)  # drop 2: the two LATEST 0.7s go
    assert kept[0].nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 5, 9]


def test_tail_drop_extreme_rho_protects_forced_unless_compat():
    grid = (1, 4)
    p = torch.tensor([[1.0, 0.9, 0.8, 1.0]])
    kept = tail_drop_mask(p, p > 0.5, 0.99, grid)
    assert kept[0].tolist() == [True, False, False, True]
    # [R] (Q6): forced tokens compete at p = 1; 3 of 4 dropped -> only the earliest p=1 survives
    kept = tail_drop_mask(p, p > 0.5, 0.99, grid, protect_forced=False)
    assert kept[0].tolist() == [True, False, False, False]


@pytest.mark.parametrize("grid", RANK_GRIDS)
def test_chunk_dechunk_independent_of_sample_order(grid):
    r, e, route = _route(grid, bias=0.0, B=4)
    rhos = torch.tensor([0.0, 0.2, 0.5, 0.7])
    chunk, dechunk = ChunkLayer(), DeChunkLayer(1.0)
    z, idx = chunk(e, route, grid, rhos)
    out = dechunk(z * 2, idx, route.boundary_prob)
    perm = torch.tensor([2, 0, 3, 1])
    route_p = finish_probs(route.boundary_prob[perm], grid)
    zp, idxp = chunk(e[perm], route_p, grid, rhos[perm])
    outp = dechunk(zp * 2, idxp, route_p.boundary_prob)
    assert torch.equal(idxp.kept_mask, idx.kept_mask[perm])
    assert torch.allclose(outp, out[perm], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------
# Ratio loss and STE
# ------------------------------------------------------------------------------------------

def test_ratio_loss_formula_and_minimum():
    N = 4.0
    p = torch.full((16, 100), 0.25, requires_grad=True)
    mask = torch.zeros(16, 100, dtype=torch.bool)
    mask[:, :25] = True
    loss = ratio_loss(p, mask, N)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)  # minimum at F = G = 1/N
    loss.backward()
    # dL/dG = N/(N-1) (N F - 1) = 0 at F = 1/N
    assert p.grad.abs().max().item() < 1e-9
    # too many kept -> gradient pushes p down
    p2 = torch.full((16, 100), 0.6, requires_grad=True)
    ratio_loss(p2, p2 > 0.5, N).backward()
    dG = N / (N - 1) * (N * 1.0 - 1)  # F = 1: every token kept
    assert torch.allclose(p2.grad, torch.full_like(p2, dG / (16 * 100)), rtol=1e-5)


def test_ratio_loss_groups_and_partial_group():
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(20, 30, generator=gen)
    m = p > 0.6

    def term(pg, mg, N=4.0):
        F_, G_ = mg.float().mean(), pg.mean()
        return N / (N - 1) * ((N - 1) * F_ * G_ + (1 - F_) * (1 - G_))

    want = (term(p[:16], m[:16]) * 16 + term(p[16:], m[16:]) * 4) / 20
    assert ratio_loss(p, m).item() == pytest.approx(want.item(), rel=1e-6)
    want32 = (term(p[:16], m[:16]) + term(p[4:], m[4:])) / 2  # divisible case: plain mean
    p32, m32 = torch.cat([p[:16], p[4:]]), torch.cat([m[:16], m[4:]])
    assert ratio_loss(p32, m32).item() == pytest.approx(want32.item(), rel=1e-6)


def test_ste_forward_exactly_one_backward_identity():
    k = torch.tensor([0.3, 0.7, 0.9999, 1e-4], requires_grad=True)
    y = ste(k)
    assert torch.equal(y, torch.ones(4))
    (y * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert torch.equal(k.grad, torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_sincos_2d_matches_mae_layout_bit_for_bit():
    import numpy as np

    def mae_1d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    D, gh, gw = 64, 5, 7
    gy, gx = np.meshgrid(np.arange(gh, dtype=np.float64), np.arange(gw, dtype=np.float64), indexing="ij")
    want = np.concatenate([mae_1d(D // 2, gx), mae_1d(D // 2, gy)], axis=1).astype(np.float32)
    got = G.sincos_pos_embed((gh, gw), D).numpy()
    assert np.array_equal(got, want)


def test_sincos_nd_widths():
    pe = G.sincos_pos_embed((3, 4, 5), 1024)
    assert pe.shape == (60, 1024)
    # blocks (W 340, H 340, T 344): W block depends only on the last coordinate
    coords = G.coordinates((3, 4, 5))
    w_block = pe[:, :340]
    same_w = coords[:, 2] == 2
    assert torch.allclose(w_block[same_w], w_block[same_w][0].expand_as(w_block[same_w]))
    t_block = pe[:, 680:]
    assert t_block.shape[1] == 344
    with pytest.raises(ValueError):
        G.sincos_pos_embed((4, 4), 63)


def test_dechunk_without_smoothing_plugs_back_raw_outputs():
    grid = (8, 11)
    mask, idx, z, p = _dechunk_case(grid, 0.2, 1.0, seed=4)
    out = DeChunkLayer(smoothing=False)(z, idx, p)
    src = dense_plug_back(mask, grid)
    for b in range(2):
        kept = torch.nonzero(mask[b]).squeeze(1).tolist()
        s = idx.cu_seqlens[b].item()
        for l in range(G.numel(grid)):
            assert torch.equal(out[b, l], z[s + kept.index(src[b, l].item())])
