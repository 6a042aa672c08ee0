"""Attention over packed variable-length sequences (METHOD §2.8, DESIGN §5).

Shape legend: T packed tokens (sum of M_b), T_b a bucketed T (compiled blocks), H heads, d head
dim, B samples, M = max M_b.
Every backend restricts attention to each sample's own segment; no padding or filler token is
ever a query, key or value whose result is used. All backends agree with a per-sample reference.

Backends:
  sdpa      pad to (B, H, M, d) with a key-padding mask, torch SDPA, discard padded query rows.
            With equal lengths the packed tensor already is the (B, M) layout: one unmasked call.
  loop      SDPA per segment, each sequence on its own (host lengths: no device sync).
  xformers  xformers BlockDiagonalMask + memory_efficient_attention (CUDA).
  native    torch.nn.attention.varlen.varlen_attn (flash kernel; CUDA, fp16/bf16).
  auto      chosen by cost, per call (`choose_backend`):
              1. CUDA: native when q is fp16/bf16, else xformers when installed (no padding);
              2. equal lengths: sdpa, which then is one unpadded, unmasked batched call;
              3. padded sdpa only when its padding waste, 1 - sum_b M_b^2 / (B M^2) (the share of
                 the B M^2 scores that belong to padding), is at most PAD_WASTE_MAX[device];
              4. otherwise loop: every sequence pays only its own M_b^2.
            CPU: a masked SDPA costs 1.2-2.6x the per-sample calls even at 2-6 % waste (measured,
            1 thread, torch 2.14: the mask forces a slower kernel), so padding never pays there
            (threshold 0). CUDA: a masked call is one launch against B, so a small waste is
            worth it (threshold 0.1).

Compiled blocks (`dcgen.models.compile`) see a `BucketedPack` instead of a `PackInfo`: the
packed rows are padded to a bucketed length and attention runs through the opaque custom op
`dcgen::packed_attention`, which reads the host lengths from a CPU tensor (no recompile per
length, no graph break, no device sync), applies the same backend choice on the real rows and
returns zeros for the padding rows. Its backward recomputes the attention (one extra attention
forward per block in the backward pass of a compiled step).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..chunking.chunk import PackInfo  # noqa: F401  (the packed-sequence description, shared)

BACKENDS = ("auto", "sdpa", "loop", "xformers", "native")
# largest padding waste at which `auto` still takes the padded sdpa path (see the docstring)
PAD_WASTE_MAX = {"cpu": 0.0, "cuda": 0.1}


@dataclass
class BucketedPack:
    """A packed batch padded to T_b >= T rows for compiled blocks. Tensors only: a compiled block
    guards on their shapes, never on the lengths. Rows T..T_b-1 are padding: they belong to no
    sample (batch_idx 0 only so the adaLN gather has a valid row), take no part in attention
    (their attention output is 0) and are dropped after the backbone."""

    cu_seqlens: torch.Tensor  # (B + 1,) int32, on the device
    batch_idx: torch.Tensor  # (T_b,) int64
    slot_idx: torch.Tensor  # (T_b,) int64
    lengths_cpu: torch.Tensor  # (B,) int64 on the CPU: the host lengths, read without a sync

    @classmethod
    def from_pack(cls, pack: PackInfo, padded: int) -> "BucketedPack":
        T = sum(pack.kept_counts_host)
        extra = padded - T
        if extra < 0:
            raise ValueError(f"bucketed length {padded} < packed length {T}")
        zeros = pack.batch_idx.new_zeros(extra)
        return cls(cu_seqlens=pack.cu_seqlens, batch_idx=torch.cat([pack.batch_idx, zeros]),
                   slot_idx=torch.cat([pack.slot_idx, zeros]),
                   lengths_cpu=torch.tensor(pack.kept_counts_host, dtype=torch.int64))


@functools.lru_cache(maxsize=None)
def _has_xformers() -> bool:
    try:
        import xformers.ops  # noqa: F401
        return True
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def _has_native_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        return True
    except Exception:
        return False


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device` (for tests and benchmarks)."""
    dev = torch.device(device)
    out = ["sdpa", "loop"]
    if dev.type == "cuda":
        if _has_xformers():
            out.append("xformers")
        if _has_native_varlen():
            out.append("native")
    return out


def choose_backend(q: torch.Tensor, pack: PackInfo | None = None) -> str:
    """What `auto` runs for these q and lengths (the rule is in the module docstring)."""
    if q.device.type == "cuda":
        if _has_native_varlen() and q.dtype in (torch.float16, torch.bfloat16):
            return "native"
        if _has_xformers():
            return "xformers"
    if pack is None or pack.uniform:
        return "sdpa"
    limit = PAD_WASTE_MAX.get(q.device.type, 0.0)
    return "sdpa" if pack.pad_waste <= limit else "loop"


def resolve_backend(backend: str, q: torch.Tensor, pack: PackInfo | None = None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}' (valid: {', '.join(BACKENDS)})")
    if backend != "auto":
        if backend in ("xformers", "native") and q.device.type != "cuda":
            raise ValueError(f"attention backend '{backend}' needs CUDA; use 'sdpa' on {q.device.type}")
        if backend == "xformers" and not _has_xformers():
            raise ValueError("attention backend 'xformers' requested but xformers is not installed "
                             "(pip install dcgen[xformers])")
        return backend
    return choose_backend(q, pack)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: PackInfo,
                     backend: str = "auto") -> torch.Tensor:
    """Non-causal attention of packed (T, H, d) q, k, v within each sample's segment -> (T, H, d)."""
    T, H, d = q.shape
    backend = resolve_backend(backend, q, pack)
    if backend == "native":
        from torch.nn.attention.varlen import varlen_attn
        M = pack.max_seqlen
        return varlen_attn(q, k, v, pack.cu_seqlens, pack.cu_seqlens, M, M)
    if backend == "xformers":
        import xformers.ops as xops
        out = xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=pack.xformers_bias)
        return out[0]
    if backend == "loop":
        outs = []
        s = 0
        for M in pack.kept_counts_host:  # host lengths: no device sync per block
            qs, ks, vs = (t[s:s + M].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, M_b, d)
            outs.append(F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1))
            s += M
        return torch.cat(outs, 0)
    # sdpa: scatter into a zero-padded (B, M) layout; padded keys are masked out, padded query
    # rows are computed (they see only real keys) and then dropped
    B, M = pack.batch_size, pack.max_seqlen
    if pack.uniform:  # e.g. batch 1: the packed tensor already is the (B, M) layout
        def view(t):
            return t.view(B, M, H, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(view(q), view(k), view(v))
        return out.transpose(1, 2).reshape(T, H, d)
    rows = pack.padded_rows

    def pad(t):
        return t.new_zeros(B * M, H, d).index_copy(0, rows, t).view(B, M, H, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=pack.key_padding)
    return out.transpose(1, 2).reshape(B * M, H, d)[rows]


# --------------------------------------------------------------------------------------------
# The opaque op compiled blocks call (see the module docstring)
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    import warnings
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _real_rows(cu_seqlens, batch_idx, slot_idx, lengths_cpu) -> tuple[int, PackInfo]:
    lengths = lengths_cpu.tolist()  # a CPU tensor: no device sync
    T = sum(lengths)
    pack = PackInfo(cu_seqlens=cu_seqlens, max_seqlen=max(lengths) if lengths else 0,
                    kept_counts_host=lengths, batch_idx=batch_idx[:T], slot_idx=slot_idx[:T])
    return T, pack


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


@torch.library.custom_op("dcgen::packed_attention", mutates_args=())
def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     batch_idx: torch.Tensor, slot_idx: torch.Tensor, lengths_cpu: torch.Tensor,
                     backend: str) -> torch.Tensor:
    """varlen_attention on the first T = sum(lengths) of T_b rows; rows T.. get 0."""
    T, pack = _real_rows(cu_seqlens, batch_idx, slot_idx, lengths_cpu)
    out = varlen_attention(q[:T], k[:T], v[:T], pack, backend)
    return _pad_rows(out, q.shape[0]).contiguous()


@packed_attention.register_fake
def _(q, k, v, cu_seqlens, batch_idx, slot_idx, lengths_cpu, backend):
    return torch.empty_like(q)


@torch.library.custom_op("dcgen::packed_attention_backward", mutates_args=())
def packed_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              cu_seqlens: torch.Tensor, batch_idx: torch.Tensor, slot_idx: torch.Tensor,
                              lengths_cpu: torch.Tensor, backend: str
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `packed_attention` by recomputing it (padding rows get 0)."""
    T, pack = _real_rows(cu_seqlens, batch_idx, slot_idx, lengths_cpu)
    try:
        _, vjp = torch.func.vjp(lambda a, b, c: varlen_attention(a, b, c, pack, backend), q[:T], k[:T], v[:T])
    except (RuntimeError, NotImplementedError) as e:  # a kernel without torch.func support
        _warn_once(f"dcgen::packed_attention backward: backend {backend!r} cannot be differentiated "
                   f"with torch.func ({type(e).__name__}: {e}); recomputing with 'loop'")
        _, vjp = torch.func.vjp(lambda a, b, c: varlen_attention(a, b, c, pack, "loop"), q[:T], k[:T], v[:T])
    dq, dk, dv = vjp(grad[:T].contiguous())
    return tuple(_pad_rows(g, q.shape[0]).contiguous() for g in (dq, dk, dv))


@packed_attention_backward.register_fake
def _(grad, q, k, v, cu_seqlens, batch_idx, slot_idx, lengths_cpu, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _packed_attention_setup(ctx, inputs, output):
    q, k, v, cu, bi, si, lengths, backend = inputs
    ctx.save_for_backward(q, k, v, cu, bi, si, lengths)
    ctx.backend = backend


def _packed_attention_grad(ctx, grad):
    q, k, v, cu, bi, si, lengths = ctx.saved_tensors
    dq, dk, dv = packed_attention_backward(grad, q, k, v, cu, bi, si, lengths, ctx.backend)
    return dq, dk, dv, None, None, None, None, None


packed_attention.register_autograd(_packed_attention_grad, setup_context=_packed_attention_setup)


def bucketed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: BucketedPack,
                       backend: str = "auto") -> torch.Tensor:
    """Attention of (T_b, H, d) q, k, v in a compiled block: the real rows as varlen_attention,
    zeros for the padding rows."""
    return packed_attention(q, k, v, pack.cu_seqlens, pack.batch_idx, pack.slot_idx,
                            pack.lengths_cpu, backend)
