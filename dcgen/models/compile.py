"""torch.compile of the DiT blocks for training (`train.compile=true`), with bucketed packed lengths.

A DC-DiT's backbone sees T = sum_b M_b packed tokens, and T changes every step as the router
learns and as multi-budget training drops tails. Compiled with static shapes, every new T would
be a new graph. `compile_backbone` therefore pads the packed rows to a bucketed length T_b before
the blocks and drops the padding after them, so a run compiles at most one graph per bucket:

    bucket_length(T) = min_tokens                        if T <= min_tokens
                     = the next multiple of hi/(2 k)     otherwise, hi = the power of two >= T

with k = `per_octave` (a power of two): k sizes per octave (hi/2, hi], e.g. for k = 4 and
min_tokens = 64: 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, ... At most 1/(k+1) of the
padded rows are padding (20 % at k = 4, ~10 % on average). `bucket_sizes(lo, hi)` lists them.

What a compiled block sees: x (T_b, D), c (B, D) and a `BucketedPack` of tensors (cu_seqlens,
batch_idx, slot_idx and the host lengths as a CPU tensor); no Python integer that varies, so the
only guards that can fail are T_b, B, grad mode and the autocast state. Every block shares the
one compiled graph (blocks are passed in as an argument; their parameters are graph inputs).
Attention runs through the opaque custom op `dcgen::packed_attention` (dcgen.models.attention):
the real rows get exactly the eager varlen attention (same backend choice), the padding rows take
no part in it (output 0) and are never queries, keys or values of a real row. Padding rows pass
through the pointwise layers (their values are dropped after the last block and get no
gradient), so bucketing does not change the results beyond the rounding of kernels run on other
shapes. The graph has no break (fullgraph=True makes one an error).

Costs: the op's backward recomputes the attention forward (one extra attention forward per block
in the backward pass), and up to 1/(k+1) extra pointwise work from the padding rows.

A plain DiT has fixed shapes: its blocks are compiled the same way, without bucketing.

Use (the training loop): after building the model and its EMA copy, before
`accelerator.prepare`:

    from dcgen.models.compile import compile_backbone
    if cfg.train.compile:
        compile_backbone(model)

The model keeps its state dict, config and export format; only `run_blocks` changes path.
`compile_backbone(model, enabled=False)` switches back to the eager blocks.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .attention import BucketedPack, PackInfo


def bucket_length(T: int, per_octave: int = 4, min_tokens: int = 64) -> int:
    """The bucketed packed length for T tokens (see the module docstring)."""
    if T <= min_tokens:
        return min_tokens
    hi = 1 << (T - 1).bit_length()  # the smallest power of two >= T
    step = max(1, hi // (2 * per_octave))
    return -(-T // step) * step


def bucket_sizes(lo: int, hi: int, per_octave: int = 4, min_tokens: int = 64) -> list[int]:
    """Every bucket a packed length in [lo, hi] can fall in (an upper bound on the compiles)."""
    out, T = [], max(1, lo)
    while T <= hi:
        b = bucket_length(T, per_octave, min_tokens)
        out.append(b)
        T = b + 1
    return out


def _block_call(blk: nn.Module, x: torch.Tensor, c: torch.Tensor, pack):
    return blk(x, c, pack)


@functools.lru_cache(maxsize=None)
def _compiled_block_call(backend: str, mode: str | None, options: tuple | None, dynamic: bool):
    opts = dict(options) if options else None
    return torch.compile(_block_call, backend=backend, mode=mode, options=opts, fullgraph=True,
                         dynamic=dynamic)


@dataclass
class BackboneCompile:
    """How the blocks of one model are compiled; stored on the model (plain values only, so the
    model still deep-copies and pickles)."""

    per_octave: int = 4
    min_tokens: int = 64
    backend: str = "inductor"
    mode: str | None = None
    options: dict = field(default_factory=dict)
    dynamic: bool = False
    enabled: bool = True

    def active(self) -> bool:
        return self.enabled

    def bucket(self, T: int) -> int:
        return bucket_length(T, self.per_octave, self.min_tokens)

    def compiled(self):
        opts = tuple(sorted(self.options.items())) if self.options else None
        return _compiled_block_call(self.backend, self.mode, opts, self.dynamic)

    def run(self, blocks, h: torch.Tensor, c: torch.Tensor, pack: PackInfo | None) -> torch.Tensor:
        fn = self.compiled()
        if pack is None:  # dense DiT tokens (B, L, D): fixed shapes, nothing to bucket
            for blk in blocks:
                h = fn(blk, h, c, None)
            return h
        T = h.shape[0]
        Tb = self.bucket(T)
        bpack = BucketedPack.from_pack(pack, Tb)
        hb = torch.cat([h, h.new_zeros(Tb - T, *h.shape[1:])]) if Tb > T else h  # (T_b, D)
        for blk in blocks:
            hb = fn(blk, hb, c, bpack)
        return hb[:T]  # the padding rows are dropped: no output, no gradient


def compile_backbone(model: nn.Module, *, per_octave: int = 4, min_tokens: int = 64,
                     backend: str = "inductor", mode: str | None = None, options: dict | None = None,
                     dynamic: bool = False, enabled: bool = True,
                     max_buckets: int | None = None) -> nn.Module:
    """Compile the DiT blocks of a DiT or DC-DiT (in place) with torch.compile; returns `model`.

    per_octave, min_tokens: the bucket rule (module docstring); per_octave a power of two.
    backend, mode, options, dynamic: passed to torch.compile (fullgraph=True always). The
      production path is the default inductor backend; "aot_eager" compiles in seconds (tests).
    max_buckets: raise dynamo's recompile limit to at least this many graphs (default: every
      bucket between 1 and the model's full grid at batch 256), since past the limit dynamo
      silently falls back to eager.
    enabled=False: back to the eager blocks.
    Wrapped models (DDP, Accelerate) are unwrapped. Call it after creating the EMA copy (the
    EMA model should stay eager: it only samples).
    """
    from . import unwrap
    raw = unwrap(model)
    if not hasattr(raw, "blocks") or not hasattr(raw, "run_blocks"):
        raise ValueError(f"compile_backbone: {type(raw).__name__} has no DiT blocks to compile")
    if per_octave < 1 or per_octave & (per_octave - 1):
        raise ValueError(f"compile_backbone: per_octave must be a power of two, got {per_octave}")
    if min_tokens < 1:
        raise ValueError(f"compile_backbone: min_tokens must be positive, got {min_tokens}")
    if not enabled:
        raw._backbone_compile = None
        return model
    spec = BackboneCompile(per_octave=per_octave, min_tokens=min_tokens, backend=backend, mode=mode,
                           options=dict(options or {}), dynamic=dynamic)
    if max_buckets is None:
        L = int(raw.pos_embed.shape[-2]) if raw.pos_embed.dim() >= 2 else 1
        max_buckets = len(bucket_sizes(1, 256 * L, per_octave, min_tokens))
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < max_buckets + 8:
        setattr(cfg, name, max_buckets + 8)  # + grad-mode / autocast / batch-size variants
    if hasattr(cfg, "accumulated_recompile_limit") and cfg.accumulated_recompile_limit < 4 * max_buckets:
        cfg.accumulated_recompile_limit = 4 * max_buckets
    raw._backbone_compile = spec
    return model


__all__ = ["compile_backbone", "bucket_length", "bucket_sizes", "BackboneCompile"]
