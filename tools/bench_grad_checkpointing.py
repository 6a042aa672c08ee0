"""Peak host memory of one training step with and without activation checkpointing
(`train.grad_checkpointing`), each in a fresh subprocess on the CPU (peak RSS growth over one
forward and backward: activations plus the gradients, whose size is known and subtracted), reported
as a ratio in one run. A
DC-DiT's untrained router is set to keep a realistic fraction of the tokens (`--kept`).

    python tools/bench_grad_checkpointing.py --model dcdit_b --grid 64 --batch 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from dcgen.models import build, config_node
from dcgen.diffusion import GaussianDiffusion
model_name, grid, batch, ckpt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
torch.manual_seed(0)
node = config_node(model_name)
model = build(node, input_size=[grid, grid], in_channels=4, num_classes=1000)
model.set_grad_checkpointing(ckpt).train()
obj = GaussianDiffusion()
g = torch.Generator().manual_seed(0)
x = torch.randn(batch, 4, grid, grid, generator=g)
y = torch.randint(0, 1000, (batch,), generator=g)
t = torch.randint(0, 1000, (batch,), generator=g)
noise = torch.randn(x.shape, generator=g)
kept_target = float(sys.argv[5])
if hasattr(model, "router") and kept_target > 0:
    # an untrained router keeps a few tokens: shift its logit so ~kept_target of them pass
    conv = model.router.residual_scorer[-1]
    logits = []
    h = conv.register_forward_hook(lambda m, a, o: logits.append((o - m.bias.view(1, -1, *[1] * (o.dim() - 2))).flatten()))
    with torch.no_grad():
        model(x, t, y)
    h.remove()
    with torch.no_grad():
        conv.bias.fill_(-float(torch.quantile(logits[0].float(), 1 - kept_target)))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
terms, aux = obj.training_losses(model, x, y, t=t, noise=noise)
terms["loss"].mean().backward()
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kept = float(aux[0].kept_counts.float().mean()) if aux else float(model.token_grid[0] * model.token_grid[1])
grad_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps({"step_growth_mb": (peak - before) / 1024, "grad_mb": grad_mb,
                  "activation_mb": (peak - before) / 1024 - grad_mb, "peak_mb": peak / 1024, "seconds": dt,
                  "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "tokens_kept": kept}))
"""


def measure(model: str, grid: int, batch: int, ckpt: bool, threads: int, kept: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    p = subprocess.run([sys.executable, "-c", CHILD, model, str(grid), str(batch), "1" if ckpt else "0",
                        str(kept)],
                       capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode != 0:
        raise SystemExit(f"bench_grad_checkpointing: child failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dcdit_b", help="a configs/model name")
    ap.add_argument("--grid", type=int, default=64, help="latent grid side (64: ImageNet 512 in SD-VAE latents)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kept", type=float, default=0.25,
                    help="DC-DiT: the fraction of tokens the router is set to keep (trained: ~1/N)")
    args = ap.parse_args(argv)
    plain = measure(args.model, args.grid, args.batch, False, args.threads, args.kept)
    ckpt = measure(args.model, args.grid, args.batch, True, args.threads, args.kept)
    out = {"model": args.model, "grid": args.grid, "batch": args.batch, "plain": plain, "checkpointed": ckpt,
           "memory_ratio": ckpt["step_growth_mb"] / plain["step_growth_mb"],
           "activation_ratio": ckpt["activation_mb"] / plain["activation_mb"],
           "time_ratio": ckpt["seconds"] / plain["seconds"]}
    print(f"{args.model} at {args.grid}x{args.grid}, batch {args.batch} ({plain['params_m']:.0f}M parameters, "
          f"~{plain['tokens_kept']:.0f} tokens kept): forward+backward memory growth "
          f"{plain['step_growth_mb']:.0f} MB -> {ckpt['step_growth_mb']:.0f} MB with checkpointing "
          f"(x{out['memory_ratio']:.2f}); activations (growth less {plain['grad_mb']:.0f} MB of gradients) "
          f"{plain['activation_mb']:.0f} MB -> {ckpt['activation_mb']:.0f} MB (x{out['activation_ratio']:.2f}); "
          f"step time x{out['time_ratio']:.2f}")
    return out


if __name__ == "__main__":
    main()
