"""DiT baselines for a DC-DiT, built by a declared rule (the comparisons of docs/results.md).

A DC-DiT with patch p on a data grid has L token-grid positions and, at compression N
(`dc.target_n`), runs its backbone on about M = L / N kept tokens. Its DiT baseline is a DiT of the
same family (same width, depth and heads unless the rule changes them) whose patch gives exactly
M tokens (p * N^(1/n) per axis on an n-axis grid), and then:

  token    that DiT as it is: the same backbone sequence length, no encoder/router/decoder;
  params   depth, else width, changed until its parameter count is within `tol` (5 %) of the
           DC-DiT's;
  flops    depth, else width, changed until its forward GMACs per sample (batch 1, the DiT
           paper's "GFLOPs") is within `tol` of the DC-DiT's forward at M kept tokens: the mean
           training cost per sample when the router keeps 1/N (the ratio loss's target; with
           multi-budget training the DC-DiT spends less, which the compare table measures).

Depth is searched first (1 .. 4x), keeping the width; width second (multiples of 2 x heads),
keeping the depth. The closest candidate wins; none within `tol` is an error that names the
best one. The result is a list of Hydra overrides onto the DC-DiT experiment, so the baseline
trains with the DC-DiT's data, objective, optimiser and seeds.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf

RULES = ("token", "params", "flops")
TOLERANCE = 0.05
DIT_TARGET = "dcgen.models.DiT"


@dataclass
class Baseline:
    """A DiT baseline of a DC-DiT by one rule, with the measured sizes of both."""
    rule: str
    overrides: list[str]
    dit: dict                       # the DiT's description node
    params: int                     # the DiT's parameter count
    gflops: float                   # the DiT's forward GMACs per sample
    reference_params: int           # the DC-DiT's
    reference_gflops: float         # the DC-DiT's forward GMACs per sample at M = L / N kept tokens
    kept_tokens: int                # M
    notes: list[str] = field(default_factory=list)

    @property
    def params_error(self) -> float:
        return self.params / self.reference_params - 1

    @property
    def gflops_error(self) -> float:
        return self.gflops / self.reference_gflops - 1


def shapes_only(node: dict, task):
    """The model `node` describes on `task`'s shape, on the meta device."""
    from .models import build
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return build(dict(node), input_size=list(task.grid), in_channels=task.channels,
                     num_classes=task.num_classes)


def kept_tokens(model, target_n: float) -> int:
    """M = L / N rounded: the backbone length of a DC-DiT keeping 1/N of its token grid."""
    return max(1, round(math.prod(model.token_grid) / float(target_n)))


def measure(node: dict, task, kept: int | None = None, target_n: float | None = None) -> tuple[int, float]:
    """(parameters, forward GMACs per sample) of the model `node` describes, on `task`'s grid.
    A DC-DiT is counted at `kept` backbone tokens, or L / `target_n`; a DiT at all of its own."""
    from .flops import dit_gflops
    model = shapes_only(node, task)
    if model.drops_tokens and kept is None:
        kept = kept_tokens(model, target_n)
    kept_tokens_ = kept
    params = sum(p.numel() for p in model.parameters())
    gflops = dit_gflops(model, kept_counts=kept_tokens_) if model.drops_tokens else dit_gflops(model, batch=1)
    return params, gflops


def token_matched_patch(patch: tuple[int, ...], grid: tuple[int, ...], n: float) -> list[int]:
    """The DiT patch per axis that leaves L / N tokens: p * N^(1/axes), which must be an integer
    dividing the data grid."""
    f = float(n) ** (1 / len(grid))
    if abs(f - round(f)) > 1e-6:
        raise ValueError(f"token matching: N = {n:g} on a {len(grid)}-axis grid needs an integer "
                         f"patch factor N^(1/{len(grid)}) = {f:.4g}")
    out = [int(p * round(f)) for p in patch]
    for g, p in zip(grid, out):
        if g % p:
            raise ValueError(f"token matching: DiT patch {out} does not divide the grid {list(grid)}")
    return out


def dit_node(dc_node: dict, patch: list[int]) -> dict:
    """The DiT description sharing every key of the DC-DiT's node that DiT takes."""
    from .models import DiT
    accepted = set(inspect.signature(DiT.__init__).parameters) - {"self"}
    node = {k: v for k, v in dc_node.items() if k in accepted and k != "patch_size"}
    return {"_target_": DIT_TARGET, **node, "patch_size": patch if len(set(patch)) > 1 else patch[0]}


def _search(node: dict, task, target: float, which: int, tol: float) -> tuple[dict, list[str]]:
    """Depth first, then width: the candidate whose measure `which` (0 params, 1 GMACs) is
    closest to `target`."""
    from .models import DiT
    sig = inspect.signature(DiT.__init__).parameters
    depth = int(node.get("depth", sig["depth"].default))
    width = int(node.get("hidden_size", sig["hidden_size"].default))
    heads = int(node.get("num_heads", sig["num_heads"].default))

    seen: dict = {}

    def err(n):  # each candidate is built (on the meta device) once
        key = (n.get("depth"), n.get("hidden_size"))
        if key not in seen:
            seen[key] = abs(measure(n, task)[which] / target - 1)
        return seen[key]

    best = min(({**node, "depth": d} for d in range(1, 4 * depth + 1)), key=err)
    notes = [f"depth {best['depth']}"]
    if err(best) > tol:
        step = 2 * heads
        widths = range(step, 4 * width + 1, step)
        best_w = min(({**node, "hidden_size": w} for w in widths), key=err)
        if err(best_w) < err(best):
            best, notes = best_w, [f"width {best_w['hidden_size']}"]
    if err(best) > tol:
        raise ValueError(f"no DiT within {tol:.0%} of {target:.4g} by depth or width "
                         f"(closest: {notes[0]}, off by {err(best):.1%})")
    return best, notes


def baseline(cfg: DictConfig, rule: str, task=None, tol: float = TOLERANCE) -> Baseline:
    """The DiT baseline of the DC-DiT that the composed train config `cfg` trains, by `rule`."""
    from .models import DCDiT
    if rule not in RULES:
        raise ValueError(f"matching rule must be one of {list(RULES)}, got {rule!r}")
    if task is None:
        from .trust import build as build_node
        task = build_node(cfg.task, "task", "matching", trusted=True)
    dc_node = OmegaConf.to_container(cfg.model, resolve=True)
    dc = shapes_only(dc_node, task)
    if not isinstance(dc, DCDiT):
        raise ValueError(f"matching: {dc_node.get('_target_')} is not a DC-DiT; baselines are built "
                         "for models that drop tokens")
    N = float(cfg.dc.target_n)
    M = kept_tokens(dc, N)
    ref_params, ref_gflops = measure(dc_node, task, M)
    node = dit_node(dc_node, token_matched_patch(dc.patch, tuple(task.grid), N))
    notes = [f"patch {node['patch_size']}: {M} tokens"]
    if rule != "token":
        node, how = _search(node, task, ref_params if rule == "params" else ref_gflops,
                            0 if rule == "params" else 1, tol)
        notes += how
    params, gflops = measure(node, task)
    removed = [k for k in dc_node if k not in node]
    overrides = [f"~model.{k}" for k in removed if k != "_target_"]
    overrides += [f"model._target_={DIT_TARGET}"]
    overrides += [f"model.{k}={_hydra(v)}" for k, v in node.items() if k != "_target_"]
    return Baseline(rule, overrides, node, params, gflops, ref_params, ref_gflops, M, notes)


def _hydra(v) -> str:
    """A value as a Hydra override writes it."""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_hydra(x) for x in v) + "]"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


__all__ = ["Baseline", "RULES", "TOLERANCE", "baseline", "dit_node", "kept_tokens", "measure", "shapes_only",
           "token_matched_patch"]
