"""Helpers both objectives use: per-sample means, the model call, the sampling progress bar."""
from __future__ import annotations

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dimension: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def call_model(model, x, t, y, model_kwargs=None):
    """`model(x, t, y, **model_kwargs)`, checked to return (out, aux). Training passes its budget
    as `model_kwargs={"tail_drop": ρ}`; samplers pass none: the model they run is wrapped with
    its budgets (`guidance.conditional_net` / `guided_model`), the one route of tail_drop while
    sampling."""
    res = model(x, t, y, **(model_kwargs or {}))
    if not (isinstance(res, tuple) and len(res) == 2):
        raise ValueError("model must return a pair (out, aux)")
    return res


def progress_bar(it, enabled: bool, total: int | None = None):
    """`it` wrapped in a tqdm bar when `enabled`."""
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, total=total)


class StepRecorder:
    """The one recording of a sampling run's model calls (`callback(i, t, x_t, out, aux)` of every
    sampler: dcgen's and the diffusers pipeline's). Per call, for the first `rows` samples of the
    batch (the conditional half under CFG): the timestep, the kept fraction and mean boundary
    probability of the first chunking stage, the MACs `flop_fn(kept_counts)` of every row when
    given (`flop_fn(kept_counts, rows=B)`; `backbone=False` at a call whose backbone a step `cache`
    reused), whether it was reused, and for the first `map_rows` samples the boundary-probability map and x_t at the calls
    in `map_calls` (None: every call). A model that keeps every token records kept = mean p = 1."""

    def __init__(self, rows: int, map_rows: int = 0, map_calls=None, flop_fn=None, then=None, cache=None):
        self.rows, self.map_rows, self.map_calls, self.flop_fn, self.then = rows, map_rows, map_calls, flop_fn, then
        self.cache = cache  # a StepCache: a call that reused the backbone costs no backbone MACs
        self.reused: list[bool] = []
        self.ts: list[float] = []
        self.kept: list[torch.Tensor] = []
        self.mean_p: list[torch.Tensor] = []
        self.flops: list = []
        self.maps: dict[int, tuple] = {}

    def __call__(self, i, t, x_t, out, aux):
        B = self.rows
        self.ts.append(float(t if not torch.is_tensor(t) else t.flatten()[0]))
        reused = bool(self.cache is not None and self.cache.last_reused)
        self.reused.append(reused)
        if aux:
            s = aux[0]
            L = s.boundary_prob.shape[1]
            self.kept.append((s.kept_counts[:B].double() / L).cpu())
            self.mean_p.append(s.boundary_prob[:B].float().mean(1).cpu())
            if self.flop_fn is not None:
                # every branch's rows; a call whose backbone was reused pays for no backbone
                self.flops.append(self.flop_fn(s.kept_counts, rows=B, backbone=False) if reused else
                                  self.flop_fn(s.kept_counts, rows=B))
            if self.map_rows and (self.map_calls is None or i in self.map_calls):
                self.maps[i] = (s.boundary_prob[:self.map_rows].float().cpu(),
                                x_t[:self.map_rows].float().cpu(), self.ts[-1])
        else:
            self.kept.append(torch.ones(B, dtype=torch.float64))
            self.mean_p.append(torch.ones(B))
        if self.then is not None:
            self.then(i, t, x_t, out, aux)

    def kept_matrix(self) -> torch.Tensor:
        """(rows, calls) kept fractions."""
        return torch.stack(self.kept, 1) if self.kept else torch.zeros(self.rows, 0, dtype=torch.float64)

    def mean_p_matrix(self) -> torch.Tensor:
        return torch.stack(self.mean_p, 1) if self.mean_p else torch.zeros(self.rows, 0)

    def flops_matrix(self) -> torch.Tensor | None:
        """(rows, calls, ...) of `flop_fn`'s rows, or None without flop_fn."""
        if not self.flops:
            return None
        return torch.stack([torch.as_tensor(f, dtype=torch.float64) for f in self.flops], 1)
