"""Per-step cost of the training randomness (timesteps, noise, label dropout) on one process, as
the number of processes grows: the old whole-global-batch draw (every rank drew all G rows, then
sliced its own) against dcgen.train.step_randomness (each rank draws only its G/W rows, each row
from its own (seed, position) generator). Ratios are against the old draw at W = 1, in one run.

    python tools/bench_step_noise.py [--batch 256] [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

import torch

from dcgen.diffusion import GaussianDiffusion
from dcgen.train import step_randomness

SHAPES = {"ImageNet 256 (4x32x32)": (4, 32, 32), "ImageNet 512 (4x64x64)": (4, 64, 64),
          "video 16x(4x32x32)": (4, 16, 32, 32)}


def whole_batch(seed: int, step: int, G: int, shape, objective, p_drop: float):
    """The draw before issue 19: all G rows from one generator per step (the baseline)."""
    g = torch.Generator().manual_seed(seed * 7_919 + step * 104_729 + 17)
    t = objective.draw_timesteps(G, g)
    noise = torch.randn(G, *shape, generator=g)
    drop = torch.rand(G, generator=g) < p_drop
    return t, noise, drop


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256, help="global batch G")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worlds", default="1,2,4,8,16,32,64")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    obj, G = GaussianDiffusion(), args.batch
    worlds = [int(w) for w in args.worlds.split(",")]
    print(f"global batch {G}, one thread; ms per step on one process (ratio to the old draw at W=1)\n")
    print("| data | W | old: whole batch | new: own rows |")
    print("|---|---|---|---|")
    rows = []
    for name, shape in SHAPES.items():
        base = best_ms(lambda: whole_batch(0, 7, G, shape, obj, 0.1), args.repeats)
        for W in worlds:
            local = range(7 * G, 7 * G + G // W)  # rank 0's rows of step 7
            new = best_ms(lambda: step_randomness(0, local, shape, obj, 0.1), args.repeats)
            rows.append({"data": name, "world": W, "old_ms": base, "new_ms": new})
            print(f"| {name} | {W} | {base:.2f} (1.00) | {new:.2f} ({new / base:.2f}) |")
    return rows


if __name__ == "__main__":
    main()
