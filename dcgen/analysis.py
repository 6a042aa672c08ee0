"""Studies of trained models and data, as library functions (tools/ holds thin drivers of them):

- `boundary_maps`: for the same noise and labels at several tail-drop budgets, the decoded x_t and
  the router's boundary-probability map at evenly spaced sampling steps, kept fraction against t
  per budget and one plot comparing the budgets (the trend of [P2] Fig. 3).
- `label_information`: how much the class label can tell a denoiser, per timestep, for the exact
  posterior of a training set's empirical distribution.
- `routing_profile` / `stripes`: where a DC-DiT's router keeps tokens (background against detail,
  per token-grid row and column, and on a constant image) and the FID it reaches (docs/results.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .io import load_checkpoint_ema, load_run
from .run import Run


# ------------------------------------------------------------------------------------------------
# Boundary maps over timesteps and budgets
# ------------------------------------------------------------------------------------------------

def budget_plot(curves: dict, path: Path) -> Path:
    """Mean kept fraction against t, one line per budget (x axis noisy -> clean)."""
    from matplotlib.figure import Figure

    from .viz import save_figure
    fig = Figure(figsize=(5.0, 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for rho, (ts, kept) in sorted(curves.items()):
        ax.plot(ts, kept, marker="o", ms=2, lw=1.5, label=f"ρ = {rho:g}")
    ts_all = [t for ts, _ in curves.values() for t in ts]
    if ts_all and max(ts_all) > min(ts_all):
        ax.set_xlim(max(ts_all), min(ts_all))
    ax.set_ylim(0, 1)
    ax.set_xlabel("timestep t  (noisy → clean)")
    ax.set_ylabel("kept token fraction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def boundary_maps(run_dir, out, num_samples: int = 4, labels=None, tail_drops=(0.0,), steps: int = 250,
                  sampler: str = "ddpm", timesteps: int = 8, cfg_scale: float = 1.0, seed: int = 0,
                  device: str = "auto") -> dict:
    """Boundary maps of a DC-DiT run (or export) at each budget of `tail_drops` into `out`
    (rho<ρ>/ folders, kept_fraction_vs_t_budgets.png, summary.json); returns the summary."""
    from .sample import generate, pick_device, write_boundary_outputs
    device = pick_device(device)
    model, objective, task, ecfg = load_run(run_dir, device)
    if not model.drops_tokens:
        raise ValueError(f"{run_dir}: boundary maps need a DC-DiT, this is a {type(model).__name__}")
    cfg_channels = ecfg.get("sample", {}).get("cfg_channels", "all")
    out = Path(out)
    summary, curves = {"run_dir": str(run_dir), "budgets": {}}, {}
    for rho in tail_drops:
        res = generate(model, objective, task, num_samples=num_samples, steps=steps, sampler=sampler,
                       cfg_scale=cfg_scale, cfg_channels=cfg_channels, tail_drop=rho, labels=labels, seed=seed,
                       device=device, record=True, map_samples=num_samples, map_timesteps=timesteps)
        d = out / f"rho{rho:.2f}"
        files = write_boundary_outputs(res, task, d)
        kept = res["kept"].numpy().mean(0)
        curves[rho] = (res["ts"], kept.tolist())
        # five evenly spaced steps from noisy to clean, as [P2] Fig. 3 reports
        five = [round(i * (len(kept) - 1) / 4) for i in range(5)] if len(kept) >= 5 else list(range(len(kept)))
        summary["budgets"][f"{rho:g}"] = {
            "dir": str(d), "files": [str(f) for f in files],
            "kept_fraction_overall": float(kept.mean()),
            "kept_fraction_noisy_to_clean": [float(kept[i]) for i in five],
            "timesteps_noisy_to_clean": [res["ts"][i] for i in five]}
    budget_plot(curves, out / "kept_fraction_vs_t_budgets.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ------------------------------------------------------------------------------------------------
# Label information of a training set
# ------------------------------------------------------------------------------------------------

def label_information(x: torch.Tensor, y: torch.Tensor, alphas_cumprod, timesteps, num_queries: int = 400,
                      seed: int = 0) -> dict:
    """Per timestep, under the empirical distribution of (x, y) (every training item equally
    likely, so p(i | x_t) ∝ exp(-|x_t - sqrt(abar_t) x_i|^2 / (2 (1 - abar_t))) exactly):
    bayes_acc (reading the class off x_t), mse_uncond and mse_cond (the optimal ε-prediction
    MSE without and with the true label)."""
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


def label_information_report(task, out, schedule: str = "linear", queries: int = 400, every: int = 25) -> dict:
    """`label_information` over a task's whole training set at every `every`-th timestep: JSON and
    a plot in `out`; returns the summary."""
    from .diffusion import GaussianDiffusion
    ds = task.train_dataset()
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    x, y = torch.stack(xs), torch.as_tensor(ys)
    obj = GaussianDiffusion(num_timesteps=1000, beta_schedule=schedule)
    ts = list(range(0, 1000, every)) + [999]
    res = label_information(x, y, obj.alphas_cumprod, ts, queries)
    mu = float(np.mean([r["mse_uncond"] for r in res.values()]))
    mc = float(np.mean([r["mse_cond"] for r in res.values()]))
    summary = {"timesteps": res, "mean_mse_uncond": mu, "mean_mse_cond": mc,
               "label_gain_mean": mu - mc, "schedule": schedule, "num_images": len(ds)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "label_information.json").write_text(json.dumps(summary, indent=1))
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
    fig.savefig(out / "label_information.png", dpi=110)
    plt.close(fig)
    return summary


# ------------------------------------------------------------------------------------------------
# The clean-timestep stripes
# ------------------------------------------------------------------------------------------------

def load_ema(run_dir, step: int | None = None):
    """(model, objective, task) of a run, with the EMA weights of checkpoint `step` (None: the
    export's)."""
    model, objective, task, _ = load_run(run_dir, "cpu")
    if step is not None and not load_checkpoint_ema(model, run_dir, step):
        raise FileNotFoundError(f"{Run(run_dir).checkpoint_dir(step)}: no such checkpoint kept")
    return model.eval(), objective, task


def uniform_patches(x0: torch.Tensor, token_grid, tol: float = 1e-3) -> torch.Tensor:
    """(n, *token_grid) bool: True where the data under a token (its patch, all channels) is
    uniform, every value within `tol` of each other: background; False where it holds detail.
    The data grid must be a whole multiple of the token grid."""
    g = tuple(int(v) for v in token_grid)
    data = tuple(x0.shape[2:])
    if len(data) != len(g) or any(d % t for d, t in zip(data, g)):
        raise ValueError(f"data grid {data} is not a whole multiple of the token grid {g}")
    p = [d // t for d, t in zip(data, g)]
    n, c, k = x0.shape[0], x0.shape[1], len(g)
    x = x0.reshape(n, c, *[v for gp in zip(g, p) for v in gp])  # n, c, g0, p0, g1, p1, ...
    x = x.permute(0, *[2 + 2 * i for i in range(k)], 1, *[3 + 2 * i for i in range(k)]).reshape(n, *g, -1)
    return (x.amax(-1) - x.amin(-1)) <= tol


@torch.no_grad()
def routing_profile(model, objective, task, timesteps=(0, 50, 200), n: int = 256,
                    x0: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> dict:
    """The router's kept fraction on the first `n` training items noised at each t: overall, on
    tokens over uniform data (background) and over detail (uniform_patches of the clean item),
    per token-grid column and row, and for a constant (all-background) image. `x0`, `labels`:
    other clean items in model space (e.g. the model's own samples) instead of the training items."""
    if x0 is None:
        ds = task.train_dataset()
        items = [ds[i] for i in range(min(n, len(ds)))]
        x0 = torch.stack([x for x, _ in items]).float()
        y0 = torch.as_tensor([int(y) for _, y in items]).long()
    else:
        x0, y0 = x0.float(), torch.as_tensor(labels).long()
    n = x0.shape[0]
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
        background = uniform_patches(x0, g)
        out[int(t)] = {"kept": float(kept.mean()),
                       "background_share": float(background.float().mean()),
                       "background_kept": float(kept[background].mean()) if background.any() else None,
                       "detail_kept": float(kept[~background].mean()) if (~background).any() else None,
                       "column_kept": [round(float(v), 3) for v in kept.mean((0, 1))],
                       "row_kept": [round(float(v), 3) for v in kept.mean((0, 2))],
                       "constant_image_kept": float(kc.float().mean()),
                       "constant_image_mask": kc.int().tolist()}
    return out


def stripes(runs, out, step: int | None = None, num_samples: int = 200, sample_steps: int = 100,
            inception=None, seed: int = 0) -> dict:
    """For each run: the routing profile and the FID of `num_samples` samples against the
    training images (as `dcgen compare` scores them); stripes.json in `out`."""
    from .compare import reference_npz
    from .metrics import evaluate_images
    from .sample import generate
    from .viz import save_image_grid
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for run in map(Path, runs):
        model, objective, task = load_ema(run, step)
        name = run.parent.name if run.name == "run" else run.name
        ref = reference_npz(task, out, None)
        labels = [i % task.num_classes for i in range(num_samples)]
        res = generate(model, objective, task, num_samples=num_samples, steps=sample_steps, sampler="ddpm",
                       labels=labels, seed=seed, batch_size=100, record=False)
        images = task.decode(res["samples"])
        d = out / name
        d.mkdir(exist_ok=True)
        save_image_grid(images[:64], d / "samples.png")
        scores = evaluate_images(samples=images.repeat(1, 3, 1, 1), out_dir=d, reference=str(ref),
                                 metrics=["fid"], inception_weights=inception, npz=False,
                                 progress=False, cache_dir=out / "feature_cache")
        report[name] = {"run": str(run), "step": step, "conv_padding": getattr(model, "conv_padding", None),
                        "fid": scores.get("fid"), "num_samples": num_samples,
                        "routing": routing_profile(model, objective, task)}
        r0 = report[name]["routing"][0]
        print(f"{name}: padding {report[name]['conv_padding']}, FID {report[name]['fid']:.2f}, "
              f"t=0 kept {r0['kept']:.3f}, constant image kept {r0['constant_image_kept']:.3f}", flush=True)
    (out / "stripes.json").write_text(json.dumps(report, indent=1))
    return report
