"""De-chunk cost on a large grid: separable smoothing + exact separable plug-back (what dcgen
runs) against the memory the dense O(M^2) / O(L M) formulas would need.

    python tools/bench_dechunk.py --grid 16 64 64 --dim 192 --batch 2 --density 0.25

Peak memory is measured as the process's peak RSS growth around the call (CPU) or
torch.cuda.max_memory_allocated (CUDA); run it in a fresh process for a clean number.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=int, nargs="+", default=[16, 64, 64])
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--density", type=float, default=0.25, help="kept fraction")
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--backward", action="store_true", help="also time a backward pass")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from dcgen.chunking import ChunkIndex, DeChunkLayer
    from dcgen.chunking import grid as G

    dev = torch.device(args.device)
    grid = tuple(args.grid)
    L, B, D = G.numel(grid), args.batch, args.dim
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(B, L, generator=gen) < args.density
    mask[:, [0, L - 1]] = True
    mask = mask.to(dev)
    idx = ChunkIndex.from_mask(mask, grid)
    M = max(idx.kept_counts_host)
    z = torch.randn(idx.total, D, device=dev, requires_grad=args.backward)
    p = torch.rand(B, L, device=dev, requires_grad=args.backward)
    layer = DeChunkLayer(sigma=args.sigma)

    base = rss_peak_bytes() if dev.type == "cpu" else 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_cuda = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    out = layer(z, idx, p)
    if args.backward:
        out.square().mean().backward()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    peak = (rss_peak_bytes() - base) if dev.type == "cpu" else torch.cuda.max_memory_allocated(dev) - base_cuda

    # what the dense formulas of METHOD §5.1 / [R] would allocate (fp32)
    dense_weights = B * M * M * 4  # (B, M, M) smoothing weights
    dense_plug = 3 * B * L * M * 4  # three (B, L, M) temporaries in [R]'s argmin
    result = {
        "grid": list(grid), "L": L, "batch": B, "dim": D, "kept_per_sample_max": M,
        "kept_total": idx.total, "sigma": args.sigma, "device": str(dev), "backward": args.backward,
        "seconds": round(seconds, 3), "peak_memory_MiB": round(peak / 2**20, 1),
        "output_MiB": round(out.numel() * 4 / 2**20, 1),
        "dense_estimate_MiB": {"smoothing_BMM": round(dense_weights / 2**20, 1),
                               "plug_back_3xBLM": round(dense_plug / 2**20, 1)},
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
