"""torch.compile of the DiT blocks with bucketed packed lengths (dcgen.models.compile).

The training-loop tests compile with backend="aot_eager" (dynamo + AOTAutograd, eager kernels):
it exercises exactly the graph capture, the guards and the recompiles that inductor would see,
in seconds. Inductor itself takes ~50 s per graph on a 2-core CPU, so it runs in one
`slow` test on a single bucket; production (`compile_backbone` defaults) uses inductor."""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

from dcgen.models import DCDiT, DiT
from dcgen.models import attention as A
from dcgen.models.compile import bucket_length, bucket_sizes, compile_backbone
from dcgen.chunking.reference import randomise_zero_inits


def randomise(model, seed=0):
    return randomise_zero_inits(model, seed)


def tiny_dcdit(seed=0):
    torch.manual_seed(seed)
    return randomise(DCDiT(input_size=(8, 8), in_channels=3, num_classes=5, hidden_size=64, depth=2,
                           num_heads=4, encoder_dim=32, norm_groups=8), seed)


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    return randomise(DiT(input_size=(8, 8), in_channels=3, num_classes=5, hidden_size=64, depth=2,
                         num_heads=4, patch_size=2), seed)


@pytest.fixture
def one_thread():
    """Tracing runs thousands of tiny ops; with a second OpenMP thread on a shared 2-core machine
    each of them can wait for a descheduled thread (measured 4x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class CountingBackend:
    """aot_eager that counts the graphs dynamo hands it (one per compile or recompile)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def train(model, steps=20, B=4, seed=1):
    """A toy training loop: AdamW on an MSE of the output against random targets, random data,
    multi-budget tail dropping; the kept lengths change every step as the router moves."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    losses, totals = [], []
    model.train()
    for s in range(steps):
        x = torch.randn(B, 3, 8, 8, generator=gen)
        t = torch.randint(0, 1000, (B,), generator=gen)
        y = torch.randint(0, 5, (B,), generator=gen)
        target = torch.randn(B, 6, 8, 8, generator=gen)
        torch.manual_seed(1000 + s)  # label dropout draws
        out, aux = model(x, t, y, tail_drop=0.1 * (s % 4))
        loss = (out - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        totals.append(int(aux[0].kept_counts.sum()) if aux else 0)
    return losses, totals


def test_bucket_rule():
    assert [bucket_length(T, 4, 64) for T in (1, 64, 65, 80, 81, 128, 129, 160, 1000, 1024)] == \
        [64, 64, 80, 80, 96, 128, 160, 160, 1024, 1024]
    assert bucket_sizes(1, 300, 4, 64) == [64, 80, 96, 112, 128, 160, 192, 224, 256, 320]
    for k in (1, 2, 4, 8):
        for T in range(1, 3000, 7):
            b = bucket_length(T, k, 16)
            assert b >= T and (T <= 16 or (b - T) / b <= 1 / (k + 1))
            assert b in bucket_sizes(1, 3000, k, 16)
    with pytest.raises(ValueError, match="power of two"):
        compile_backbone(tiny_dit(), per_octave=3)


def test_compiled_training_matches_eager_with_bounded_recompiles(one_thread):
    torch._dynamo.reset()
    counters.clear()
    eager_losses, eager_T = train(tiny_dcdit())

    model = tiny_dcdit()
    backend = CountingBackend()
    assert compile_backbone(model, backend=backend, min_tokens=16) is model  # 4 per octave
    losses, totals = train(model)

    assert totals == eager_T  # the same routing, step by step
    assert len(set(totals)) >= 8, "the kept lengths should vary over the run"
    buckets = {bucket_length(T, 4, 16) for T in totals}
    # one graph per bucket (fullgraph=True: a graph break inside a block would be an error);
    # both blocks share it, and a bucket seen again recompiles nothing
    assert backend.graphs == len(buckets) <= len(bucket_sizes(min(totals), max(totals), 4, 16))
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == len(buckets)
    # Tolerance: aot_eager runs the same eager kernels as the uncompiled model; what differs is
    # the number of rows (the padding) in the pointwise layers' GEMMs, which may reorder the fp32
    # sums of the weight gradients (~1e-7 relative). AdamW's normalisation can turn such a
    # difference in a near-zero gradient into at most lr = 1e-3 per parameter per step, so over
    # 20 steps the loss may drift by ~1e-4 relative. Measured: bit-identical on this CPU.
    for a, b in zip(losses, eager_losses):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_padding_rows_take_no_part_in_attention():
    gen = torch.Generator().manual_seed(0)
    lengths = [7, 3, 5]
    pack = A.PackInfo.from_lengths(lengths)
    T, Tb = sum(lengths), 24
    q, k, v = (torch.randn(Tb, 2, 8, generator=gen, requires_grad=True) for _ in range(3))
    bpack = A.BucketedPack.from_pack(pack, Tb)
    out = A.bucketed_attention(q, k, v, bpack, "auto")
    ref = A.varlen_attention(q[:T], k[:T], v[:T], pack, "loop")
    assert torch.equal(out[:T], ref) and not out[T:].any()
    # garbage in the padding rows changes nothing, and they receive no gradient
    with torch.no_grad():
        q2, k2, v2 = (t.clone() for t in (q, k, v))
        for t in (q2, k2, v2):
            t[T:] = 1e4 * torch.randn(Tb - T, 2, 8, generator=gen)
    assert torch.equal(A.bucketed_attention(q2, k2, v2, bpack, "auto")[:T], ref)
    out.square().sum().backward()
    assert not q.grad[T:].any() and not k.grad[T:].any() and not v.grad[T:].any()
    gq, gk, gv = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for got, want in ((q.grad, gq), (k.grad, gk), (v.grad, gv)):
        assert (got[:T] - want[:T]).abs().max() <= 1e-6


def test_compiled_dit_and_copies(one_thread):
    torch._dynamo.reset()
    m = tiny_dit().eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 5])
    with torch.no_grad():
        ref, _ = m(x, t, y)
        keys = list(m.state_dict())
        compile_backbone(m, backend=CountingBackend())
        out, _ = m(x, t, y)
    assert torch.equal(out, ref)
    assert list(m.state_dict()) == keys  # no _orig_mod. prefixes: checkpoints are unchanged
    twin = copy.deepcopy(m)  # e.g. an EMA copy: it stays usable
    with torch.no_grad():
        assert torch.equal(twin(x, t, y)[0], ref)
    compile_backbone(m, enabled=False)
    assert m._backbone_compile is None


@pytest.mark.slow
def test_inductor_block_matches_eager(one_thread):
    """The production backend on one bucket: forward and gradients equal the eager model."""
    torch._dynamo.reset()
    m = tiny_dcdit(seed=2)
    x, t, y = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 5, (4,))
    torch.manual_seed(0)
    ref, _ = m(x, t, y)
    ref.square().mean().backward()
    want = [p.grad.clone() for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    compile_backbone(m)  # inductor
    torch.manual_seed(0)
    out, _ = m(x, t, y)
    out.square().mean().backward()
    # inductor fuses and reorders fp32 arithmetic: rounding-level differences only
    assert (out - ref).abs().max() <= 1e-5
    for p, g in zip(m.parameters(), want):
        assert (p.grad - g).abs().max() <= 1e-5 * max(1.0, g.abs().max().item())


@pytest.mark.gpu
def test_cuda_compiled_dcdit_bf16_step_matches_eager():
    """Inductor on CUDA under bf16 autocast; attention inside the op is the native varlen kernel
    where available, and its backward must not fall back to the `loop` recompute."""
    import warnings
    torch._dynamo.reset()
    m = tiny_dcdit(seed=3).cuda()
    x, t, y = (torch.randn(4, 3, 8, 8).cuda(), torch.randint(0, 1000, (4,)).cuda(),
               torch.randint(0, 5, (4,)).cuda())

    def run():
        torch.manual_seed(0)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, aux = m(x, t, y, tail_drop=0.2)
        out.float().square().mean().backward()
        grads = [p.grad.clone() for p in m.parameters()]
        m.zero_grad(set_to_none=True)
        return out.float(), grads

    ref, want = run()
    compile_backbone(m)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out, got = run()
    assert not [w for w in rec if "packed_attention" in str(w.message)]
    # bf16 kernels on other shapes/fusions: bf16-level differences (2^-8 relative)
    assert (out - ref).abs().max() <= 2e-2 * max(1.0, ref.abs().max().item())
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 5e-2 * max(1e-3, w.abs().max().item())


@pytest.mark.slow
def test_train_compile_true_toy_run(tmp_path, monkeypatch):
    """`train.compile=true` through the training loop (inductor, as in production): 20 steps on a
    toy grid whose kept lengths vary; recompiles bounded by the buckets the packed lengths can fall
    in, no graph break, and the loss of the uncompiled run. Tolerance 2e-3 relative on the logged
    loss: inductor fuses and reorders float ops (measured ~1e-6 here), and 20 steps of AdamW
    amplify such differences only mildly."""
    import re

    from dcgen.cli import compose
    from dcgen.train import train
    common = ["task=toy", "task.grid=[8,8]", "task.num_samples=64", "model=dcdit_debug", "model.depth=1",
              "train.global_batch_size=8", "train.sample_every=0", "train.log_every=20", "train.ckpt_every=0",
              "train.max_steps=20", "dc.ratio_group_size=4", "dc.multi_budget_start_step=2",
              "train.log_with=none", "train.num_threads=1"]

    def final_loss(rd):
        line = [ln for ln in (rd / "log.txt").read_text().splitlines() if ln.startswith("step 20/20")][0]
        return float(re.search(r"\| loss ([0-9.]+)", line).group(1))

    from dcgen.chunking.chunk import ChunkIndex
    lengths = set()
    orig = ChunkIndex.from_mask.__func__

    def record(cls, kept, grid):
        idx = orig(cls, kept, grid)
        lengths.add(idx.total)
        return idx
    monkeypatch.setattr(ChunkIndex, "from_mask", classmethod(record))
    threads = torch.get_num_threads()
    try:
        counters.clear()
        torch._dynamo.reset()
        train(compose("train", [*common, "train.compile=true", f"run_dir={tmp_path / 'c'}"]))
        seen = set(lengths)
        graphs = counters["stats"]["unique_graphs"]
        breaks = sum(counters["graph_break"].values())
        train(compose("train", [*common, f"run_dir={tmp_path / 'e'}"]))
    finally:
        torch.set_num_threads(threads)
    # 8 samples x 64 positions: the packed length lies in [2 * 8, 64 * 8]
    # the packed length varied from step to step, the compiled graphs did not follow it: at most
    # one per bucket of the documented rule (restated here: 64 below 64 tokens, then 4 per octave)
    def rule(T):
        if T <= 64:
            return 64
        step = (1 << (T - 1).bit_length()) // 8
        return -(-T // step) * step
    assert len(seen) > 1, seen
    assert 1 <= graphs <= len({rule(T) for T in seen}), (graphs, sorted(seen))
    assert breaks == 0
    a, b = final_loss(tmp_path / "c"), final_loss(tmp_path / "e")
    assert abs(a - b) <= 2e-3 * abs(b), (a, b)
