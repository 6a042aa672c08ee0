#!/usr/bin/env python
"""How much the class label can tell a denoiser, per timestep, for a task's training set.

For the empirical training distribution (every training image equally likely) the posterior is
exact: p(i | x_t) is proportional to exp(-|x_t - sqrt(abar_t) x_i|^2 / (2 (1 - abar_t))). From it this
tool computes, on noised training images at each t:

- the Bayes accuracy of reading the class off x_t (how identifiable the class already is);
- the eps-prediction MSE of the optimal denoiser without and with the true label, so the share
  of the achievable eps loss that the label removes, per t and averaged over uniform t.

    python tools/label_information.py --out docs/results/label_information
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

import numpy as np
import torch


def label_information(x: torch.Tensor, y: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps,
                      num_queries: int = 400, seed: int = 0) -> dict:
    """Per timestep: bayes_acc, mse_uncond, mse_cond, under the empirical distribution of (x, y)."""
    x = x.float().flatten(1)
    y = y.long()
    nc = int(y.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    q = torch.randperm(x.shape[0], generator=gen)[:num_queries]
    x0, y0 = x[q], y[q]
    eps = torch.randn(x0.shape, generator=gen)
    onehot = torch.nn.functional.one_hot(y, nc).float()
    same = y[None, :] == y0[:, None]
    out = {}
    for t in timesteps:
        a = float(alphas_cumprod[t])
        s = (1 - a) ** 0.5
        xt = a ** 0.5 * x0 + s * eps
        logw = -torch.cdist(xt, a ** 0.5 * x) ** 2 / (2 * (1 - a))
        w = torch.softmax(logw, 1)
        acc = float(((w @ onehot).argmax(1) == y0).float().mean())
        wy = torch.softmax(logw.masked_fill(~same, float("-inf")), 1)
        e_un = float(((xt - a ** 0.5 * (w @ x)) / s - eps).pow(2).mean())
        e_y = float(((xt - a ** 0.5 * (wy @ x)) / s - eps).pow(2).mean())
        out[int(t)] = {"abar": a, "bayes_acc": acc, "mse_uncond": e_un, "mse_cond": e_y}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--task", nargs="*", default=[], help="task overrides, e.g. resolution=32")
    ap.add_argument("--schedule", default="linear")
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--every", type=int, default=25)
    args = ap.parse_args(argv)
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from dcgen.diffusion import GaussianDiffusion
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "task" / "pixel.yaml")
    cfg.seed = 0
    for kv in args.task:
        k, v = kv.split("=", 1)
        OmegaConf.update(cfg, k, OmegaConf.create({"v": v}).v if v else None)
    task = instantiate(cfg)
    ds = task.train_dataset()
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    x, y = torch.stack(xs), torch.as_tensor(ys)
    obj = GaussianDiffusion(num_timesteps=1000, beta_schedule=args.schedule)
    ts = list(range(0, 1000, args.every)) + [999]
    res = label_information(x, y, obj.alphas_cumprod, ts, args.queries)
    mu = float(np.mean([r["mse_uncond"] for r in res.values()]))
    mc = float(np.mean([r["mse_cond"] for r in res.values()]))
    summary = {"timesteps": res, "mean_mse_uncond": mu, "mean_mse_cond": mc,
               "label_gain_mean": mu - mc, "schedule": args.schedule, "num_images": len(ds)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "label_information.json").write_text(json.dumps(summary, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    t = sorted(res)
    ax[0].plot(t, [res[k]["bayes_acc"] for k in t], "o-", ms=3)
    ax[0].set(xlabel="timestep t", ylabel="Bayes accuracy of the class from x_t",
              title="how identifiable the class is in x_t")
    ax[1].plot(t, [res[k]["mse_uncond"] for k in t], label="optimal, no label")
    ax[1].plot(t, [res[k]["mse_cond"] for k in t], label="optimal, true label")
    ax[1].set(xlabel="timestep t", ylabel="eps MSE", title="what the label can remove from the loss")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(args.out / "label_information.png", dpi=110)
    print(json.dumps({k: v for k, v in summary.items() if k != "timesteps"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
