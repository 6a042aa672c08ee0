"""Peak memory and time of one DC-DiT forward on a large grid (no grad, batch 1 by default).

    python tools/measure_forward.py --grid 16 32 32 --channels 4 --patch 1         # video latents
    python tools/measure_forward.py --grid 64 64 64 --channels 1 --patch 4         # 64^3 voxels

An untrained router keeps ~2 tokens, so the router's decision is replaced by a fixed random mask
of density --kept (default 1/4, N = 4) while the router itself still runs. Peak memory is the
process's peak RSS growth on CPU, or torch.cuda.max_memory_allocated on CUDA.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=int, nargs="+", required=True)
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--patch", type=int, default=1)
    ap.add_argument("--size", default="S", help="S, B, L or XL")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--kept", type=float, default=0.25)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from dcgen.chunking import router as R
    from dcgen.models import build, config_node
    dev = torch.device(args.device)
    torch.manual_seed(0)
    node = {**config_node(f"dcdit_{args.size.lower()}"), "patch_size": args.patch}
    model = build(node, input_size=list(args.grid), in_channels=args.channels, num_classes=0).to(dev).eval()
    grid = model.token_grid

    gen = torch.Generator().manual_seed(1)
    orig = R.finish_probs

    def forced_density(p, g):  # keep a random `kept` fraction; corners forced as usual
        keep = (torch.rand(p.shape, generator=gen) < args.kept).to(p.device)
        return orig(torch.where(keep, 0.75, 0.25).to(p), g)

    R.finish_probs = forced_density
    x = torch.randn(args.batch, args.channels, *args.grid, device=dev)
    t = torch.randint(0, 1000, (args.batch,), device=dev)
    params = sum(p.numel() for p in model.parameters()) * 4
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        out, aux = model(x, t, None)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    seconds = time.perf_counter() - t0
    L = aux[0].boundary_prob.shape[1]
    D = model.config["hidden_size"]
    res = {"model": f"DC-DiT-{args.size}", "input": [args.channels, *args.grid], "patch": args.patch,
           "token_grid": list(grid), "L": L, "kept_mean": float(aux[0].kept_counts.float().mean()),
           "batch": args.batch, "seconds": round(seconds, 2), "peak_MiB": round(peak / 2**20, 1),
           "B_L_D_fp32_MiB": round(args.batch * L * D * 4 / 2**20, 1),
           "weights_MiB": round(params / 2**20, 1), "threads": torch.get_num_threads(),
           "device": str(dev)}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
