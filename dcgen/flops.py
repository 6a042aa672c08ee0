"""Analytic forward cost of DiT and DC-DiT from the module shapes and the kept-token counts
(METHOD §7.2, §7.3, Q7).

Everything here is counted in **MACs** (multiply-accumulates). A FLOP is 2 MACs, as in [R]'s
counter, so the two reporting conventions are

  DiT     GMACs per image per forward ("GFLOPs" of the DiT paper)       -> `dit_gflops`
  DC-DiT  TFLOPs/img = sum over sampling steps of 2 * MACs, x2 for CFG  -> `dcdit_tflops_per_image`

Counted: every Linear (in * out per row; the bias add is ignored, as torch's counter does for
addmm), every convolution (out_elems * in/groups * prod(kernel)), every matmul, and the attention
kernel. METHOD counts attention as H * sum_b M_b^2 * (4 d_h + 3) FLOPs per layer: the two matmuls
QK^T and AV (2 * 2 d_h FLOPs per score) plus 3 FLOPs per score for the softmax. We keep that
exactly and halve it, i.e. H * M^2 * (2 d_h + 1.5) "MACs", so that 2 * MACs reproduces METHOD's
FLOPs to the last digit (the 1.5 is a FLOP-derived half-MAC, hence float results).
Not counted: norms, activations, the rest of the softmax, gathers/scatters, the argmin of the
plug-back, the position-embedding add, the STE merge, embedding-table lookups.

Per-sample rules (a DC-DiT forward on sample b with M_b kept tokens of L grid positions):
  embed          patch-embed conv over L outputs; t-MLP once per sample; label lookup free
  encoder        conv blocks over L positions; their cond projections once per sample
  router         its convs / Linears over L positions
  residual_proj  L * D^2; [R]'s counter omits it (Q7) -> count_residual_proj=False
  backbone       qkv, proj, MLP over M_b tokens, adaLN Linear once per sample, attention M_b^2
  dechunk        "reference": the dense-equivalent 2 * M_b^2 * D FLOPs = M_b^2 * D MACs ([R]);
                 "executed": what dcgen runs, one (g_a x g_a) Toeplitz matmul per axis with
                 g_a > 1 on the (L, D + 1) canvas (grid.separable_gaussian): L (D + 1) g_a MACs
  decoder        as the encoder
  final          final adaLN once per sample, its Linear over L positions

METHOD's reference values (scaffold B 11.80 G; M = 190 -> 45.6 G, ...) are FLOPs in the
count_residual_proj=False, dechunk="reference" convention; `tests/test_flops.py` pins them.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from .chunking.router import CausalCosineRouter
from .models.dcdit import DCDiT, StageAux
from .models.dit import DiT

DECHUNK_CONVENTIONS = ("reference", "executed")
DCDIT_COMPONENTS = ("embed", "encoder", "router", "residual_proj", "backbone", "dechunk",
                    "decoder", "final")
DIT_COMPONENTS = ("embed", "backbone", "final")


# --------------------------------------------------------------------------------------------
# Per-module counts read from shapes (so kernel tuples, factorised convs and router variants
# are covered without formulas of their own)
# --------------------------------------------------------------------------------------------

def linear_macs(module: nn.Module) -> int:
    """MACs per input row of every nn.Linear in `module` (in * out each)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def conv_macs(module: nn.Module) -> int:
    """MACs per output position of every convolution in `module` (out * in/groups * prod(k))."""
    total = 0
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            total += m.out_channels * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    return total


def attention_macs(lengths: torch.Tensor, num_heads: int, head_dim: int,
                   softmax: bool = True) -> torch.Tensor:
    """Per-sample attention-kernel MACs of one layer over packed lengths M_b (never padded).

    METHOD §7.3: H M^2 (4 d_h + 3) FLOPs; halved to MACs. softmax=False leaves the two matmuls
    only (2 H M^2 d_h), which is what torch's FlopCounterMode credits the SDPA op with."""
    M = torch.as_tensor(lengths, dtype=torch.float64)
    per_score = 2.0 * head_dim + (1.5 if softmax else 0.0)
    return num_heads * M * M * per_score


def _as_counts(kept_counts, batch: int | None, L: int) -> torch.Tensor:
    """kept_counts (None, int, sequence or tensor) -> (B,) float64 on the CPU."""
    if kept_counts is None:  # no routing information: the upper bound, every position kept
        return torch.full((batch or 1,), float(L), dtype=torch.float64)
    M = torch.as_tensor(kept_counts).detach().to("cpu", torch.float64).reshape(-1)
    if M.numel() == 1 and batch is not None:
        M = M.expand(batch)
    elif batch is not None and M.numel() != batch:
        raise ValueError(f"kept_counts has {M.numel()} entries but batch={batch}")
    if M.numel() == 0:
        raise ValueError("kept_counts is empty")
    if bool((M < 0).any()) or bool((M > L).any()):
        raise ValueError(f"kept counts must lie in [0, L={L}], got min {M.min().item():g}, "
                         f"max {M.max().item():g}")
    return M


def _block_dims(block) -> tuple[int, int, int]:
    """(per-token Linear MACs, per-sample adaLN MACs, heads) of one DiT block."""
    return (linear_macs(block.attn) + linear_macs(block.mlp),
            linear_macs(block.adaLN_modulation), block.attn.num_heads)


def _backbone(blocks, M: torch.Tensor, attn_softmax: bool) -> torch.Tensor:
    out = torch.zeros_like(M)
    for blk in blocks:
        per_token, per_sample, H = _block_dims(blk)
        d_h = blk.attn.qkv.in_features // H
        out += per_token * M + per_sample + attention_macs(M, H, d_h, attn_softmax)
    return out


# --------------------------------------------------------------------------------------------
# Per-sample component costs
# --------------------------------------------------------------------------------------------

def _dcdit_components(model: DCDiT, M: torch.Tensor, count_residual_proj: bool, dechunk: str,
                      attn_softmax: bool) -> dict[str, torch.Tensor]:
    if dechunk not in DECHUNK_CONVENTIONS:
        raise ValueError(f"dechunk must be one of {DECHUNK_CONVENTIONS}, got {dechunk!r}")
    grid = tuple(model.token_grid)
    L = math.prod(grid)
    D = model.backbone_norm.weight.numel()
    one = torch.ones_like(M)

    embed = L * conv_macs(model.x_embedder) + linear_macs(model.t_embedder)
    # conv blocks run over the grid; their only Linears are the per-sample cond projections
    encoder = L * conv_macs(model.encoder) + linear_macs(model.encoder)
    decoder = L * conv_macs(model.decoder) + linear_macs(model.decoder)
    # routers score every position (the causal cosine rule compares L - 1 neighbour pairs)
    router_rows = L - 1 if isinstance(model.router, CausalCosineRouter) else L
    router = L * conv_macs(model.router) + router_rows * linear_macs(model.router)
    residual = L * linear_macs(model.residual_proj) if count_residual_proj else 0
    if dechunk == "reference":
        dech = M * M * D
    else:  # one banded matmul per axis on the (D + 1)-wide canvas [p h | p]
        dech = one * (L * (D + 1) * sum(g for g in grid if g > 1))
    final = L * linear_macs(model.final_layer.linear) + linear_macs(model.final_layer.adaLN_modulation)
    return {"embed": embed * one, "encoder": encoder * one, "router": router * one,
            "residual_proj": residual * one, "backbone": _backbone(model.blocks, M, attn_softmax),
            "dechunk": dech, "decoder": decoder * one, "final": final * one}


def _dit_components(model: DiT, batch: int, attn_softmax: bool) -> dict[str, torch.Tensor]:
    L = math.prod(model.token_grid)
    M = torch.full((batch,), float(L), dtype=torch.float64)
    one = torch.ones_like(M)
    embed = L * conv_macs(model.x_embedder) + linear_macs(model.t_embedder)
    final = L * linear_macs(model.final_layer.linear) + linear_macs(model.final_layer.adaLN_modulation)
    return {"embed": embed * one, "backbone": _backbone(model.blocks, M, attn_softmax),
            "final": final * one}


def per_sample_macs(model, kept_counts=None, batch: int | None = None,
                    count_residual_proj: bool = True, dechunk: str = "reference",
                    attn_softmax: bool = True) -> dict[str, torch.Tensor]:
    """Like `model_flops` but every entry is a (B,) float64 tensor, one MAC count per sample."""
    if isinstance(model, DCDiT):
        M = _as_counts(kept_counts, batch, math.prod(model.token_grid))
        comp = _dcdit_components(model, M, count_residual_proj, dechunk, attn_softmax)
    elif isinstance(model, DiT):
        if kept_counts is not None:
            raise ValueError("a DiT keeps every token; pass batch= instead of kept_counts")
        comp = _dit_components(model, batch or 1, attn_softmax)
    else:
        raise ValueError(f"model_flops needs a DCDiT or DiT, got {type(model).__name__}")
    comp["total"] = sum(comp.values())
    return comp


def model_flops(model, kept_counts=None, batch: int | None = None,
                count_residual_proj: bool = True, dechunk: str = "reference",
                attn_softmax: bool = True) -> dict[str, float]:
    """Forward MACs per component, summed over the given samples (see the module docstring).

    model        a DCDiT or DiT (dimensions are read from its modules; meta tensors are fine)
    kept_counts  DC-DiT only: M_b per sample (int, sequence or (B,) tensor); None = all L kept
    batch        number of samples when kept_counts is None or a scalar (default 1)
    count_residual_proj  False reproduces [R]'s counter (Q7); DiT ignores it
    dechunk      "reference" (dense-equivalent M^2 D, [R]) or "executed" (separable banded cost)
    attn_softmax count the softmax's 3 FLOPs per score (METHOD); False leaves matmuls only
    Returns {component: MACs, ..., "total": MACs} as floats.
    """
    comp = per_sample_macs(model, kept_counts, batch, count_residual_proj, dechunk, attn_softmax)
    return {k: float(v.sum()) for k, v in comp.items()}


# --------------------------------------------------------------------------------------------
# The two reporting conventions
# --------------------------------------------------------------------------------------------

def dit_gflops(model, kept_counts=None, batch: int | None = None, **kw) -> float:
    """MACs per image per forward, in G (the DiT paper's "GFLOPs"), averaged over the samples."""
    comp = per_sample_macs(model, kept_counts, batch, **kw)
    return float(comp["total"].mean()) / 1e9


def dcdit_tflops_per_image(step_macs_per_image: Sequence[float], cfg_branches: int = 1) -> float:
    """[P2] App. A.2: sum over sampling steps of 2 * MACs, in T; x cfg_branches (2 for ordinary
    CFG, whose branches cost the same). For Lite-CFG pass per-step sums of both branches' costs
    at their own rho with cfg_branches=1."""
    return 2.0 * cfg_branches * float(sum(float(m) for m in step_macs_per_image)) / 1e12


# --------------------------------------------------------------------------------------------
# Measuring along a sampling trajectory
# --------------------------------------------------------------------------------------------

def step_macs(model, aux=None, batch: int | None = None, count_residual_proj: bool = True,
              dechunk: str = "reference", attn_softmax: bool = True) -> torch.Tensor:
    """(B,) float64 MACs of each row of one forward, from the forward's aux.

    DC-DiT: aux is the returned list of StageAux (one stage) or a StageAux; rows are aux's rows
    (2B under CFG: conditional then unconditional). DiT: aux is [] and `batch` gives the rows."""
    if isinstance(model, DCDiT):
        stages = [aux] if isinstance(aux, StageAux) else list(aux or [])
        if len(stages) != 1:
            raise ValueError(f"a DC-DiT forward has one chunking stage, got {len(stages)} aux entries")
        counts = stages[0].kept_counts
        return per_sample_macs(model, counts, None, count_residual_proj, dechunk, attn_softmax)["total"]
    return per_sample_macs(model, None, batch, count_residual_proj, dechunk, attn_softmax)["total"]


class FlopMeter:
    """Sampler callback `callback(i, t, x_t, out, aux)` that records per-image MACs of every step.

    Rows of a guided forward (aux covers k * B rows for B images) are folded onto their image,
    so ordinary CFG counts both branches and Lite-CFG each branch at its own rho, as §7.3 asks.
    A DiT returns no aux: pass `branches=2` when it runs under CFG.
    """

    def __init__(self, model, branches: int | None = None, count_residual_proj: bool = True,
                 dechunk: str = "reference", attn_softmax: bool = True):
        self.model = getattr(model, "model", model)  # unwrap a GuidedModel
        self.branches = branches
        self.kw = dict(count_residual_proj=count_residual_proj, dechunk=dechunk,
                       attn_softmax=attn_softmax)
        self.steps: list[torch.Tensor] = []  # one (B,) tensor per model call

    def __call__(self, i, t, x_t, out, aux):
        B = x_t.shape[0]
        if isinstance(self.model, DCDiT):
            rows = step_macs(self.model, aux, **self.kw)
        else:
            rows = step_macs(self.model, None, B * (self.branches or 1), **self.kw)
        if rows.numel() % B:
            raise ValueError(f"forward has {rows.numel()} rows for {B} images")
        if self.branches is not None and rows.numel() != B * self.branches:
            raise ValueError(f"expected {self.branches} branches, the forward ran "
                             f"{rows.numel() // B}")
        self.steps.append(rows.view(-1, B).sum(0))

    def reset(self):
        self.steps.clear()

    @property
    def per_step(self) -> torch.Tensor:
        """(K, B) MACs per step and image."""
        return torch.stack(self.steps) if self.steps else torch.zeros(0, 0, dtype=torch.float64)

    def macs_per_image(self) -> torch.Tensor:
        """(B,) MACs of the whole trajectory per image."""
        return self.per_step.sum(0)

    def tflops_per_image(self) -> float:
        """The DC-DiT convention averaged over images (branches already folded in)."""
        per_image = self.macs_per_image()
        return float(per_image.mean()) * 2.0 / 1e12 if per_image.numel() else 0.0
