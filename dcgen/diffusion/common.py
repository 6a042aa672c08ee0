"""Helpers both objectives use: per-sample means, the model call, the sampling progress bar."""
from __future__ import annotations

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dimension: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def call_model(model, x, t, y, tail_drop=None, model_kwargs=None):
    """Call `model(x, t, y, tail_drop=...)`; tail_drop is only passed when given.

    Leaving it out lets a wrapper (e.g. `guided_model`) apply its own per-branch budgets.
    """
    kw = dict(model_kwargs or {})
    if tail_drop is not None:
        kw["tail_drop"] = tail_drop
    res = model(x, t, y, **kw)
    if not (isinstance(res, tuple) and len(res) == 2):
        raise ValueError("model must return a pair (out, aux)")
    return res


def progress_bar(it, enabled: bool, total: int | None = None):
    """`it` wrapped in a tqdm bar when `enabled`."""
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, total=total)
