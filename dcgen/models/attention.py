"""Attention over packed variable-length sequences (METHOD §2.8, DESIGN §5).

Shape legend: T packed tokens (sum of M_b), H heads, d head dim, B samples, M = max M_b.
Every backend restricts attention to each sample's own segment; no padding or filler token is
ever a query, key or value whose result is used. All backends agree with a per-sample reference.

Backends:
  sdpa      pad to (B, H, M, d) with a key-padding mask, torch SDPA, discard padded query rows.
            Runs everywhere (the CPU default).
  loop      SDPA per segment (slow reference; needs the lengths on the host).
  xformers  xformers BlockDiagonalMask + memory_efficient_attention (CUDA).
  native    torch.nn.attention.varlen.varlen_attn (flash kernel; CUDA, fp16/bf16).
  auto      native on CUDA with a half dtype when available, else xformers on CUDA, else sdpa.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "loop", "xformers", "native")


@dataclass
class PackInfo:
    """What attention needs to know about the packed sequence; built once per forward."""

    cu_seqlens: torch.Tensor  # (B + 1,) int32
    max_seqlen: int
    lengths_host: list[int]
    batch_idx: torch.Tensor  # (T,) sample of each token
    slot_idx: torch.Tensor  # (T,) position of each token inside its sample

    @property
    def batch_size(self) -> int:
        return len(self.lengths_host)

    @functools.cached_property
    def padded_rows(self) -> torch.Tensor:
        """(T,) row of each packed token in the (B * M) padded layout."""
        return self.batch_idx * self.max_seqlen + self.slot_idx

    @functools.cached_property
    def key_padding(self) -> torch.Tensor:
        """(B, 1, 1, M) True where a key is a real token."""
        lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        ar = torch.arange(self.max_seqlen, device=lengths.device)
        return (ar[None, :] < lengths[:, None])[:, None, None, :]

    @functools.cached_property
    def xformers_bias(self):
        """Built once per forward and shared by every block."""
        import xformers.ops as xops
        return xops.fmha.attn_bias.BlockDiagonalMask.from_seqlens(self.lengths_host)

    @property
    def uniform(self) -> bool:
        """All samples have the same length: packed == padded, no mask needed."""
        return min(self.lengths_host) == self.max_seqlen

    @classmethod
    def from_chunk_index(cls, idx) -> "PackInfo":
        return cls(cu_seqlens=idx.cu_seqlens, max_seqlen=idx.max_seqlen,
                   lengths_host=idx.lengths_host, batch_idx=idx.batch_idx, slot_idx=idx.slot_idx)

    @classmethod
    def from_lengths(cls, lengths: list[int], device=None) -> "PackInfo":
        lengths_t = torch.tensor(lengths, device=device, dtype=torch.int64)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lengths_t, 0)
        batch_idx = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths_t)
        slot_idx = torch.arange(int(cu[-1]), device=device) - cu[:-1].long()[batch_idx]
        return cls(cu_seqlens=cu, max_seqlen=max(lengths), lengths_host=list(lengths),
                   batch_idx=batch_idx, slot_idx=slot_idx)


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


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}' (valid: {', '.join(BACKENDS)})")
    if backend != "auto":
        if backend in ("xformers", "native") and q.device.type != "cuda":
            raise ValueError(f"attention backend '{backend}' needs CUDA; use 'sdpa' on {q.device.type}")
        if backend == "xformers" and not _has_xformers():
            raise ValueError("attention backend 'xformers' requested but xformers is not installed "
                             "(pip install dcgen[xformers])")
        return backend
    if q.device.type == "cuda":
        if _has_native_varlen() and q.dtype in (torch.float16, torch.bfloat16):
            return "native"
        if _has_xformers():
            return "xformers"
    return "sdpa"


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: PackInfo,
                     backend: str = "auto") -> torch.Tensor:
    """Non-causal attention of packed (T, H, d) q, k, v within each sample's segment -> (T, H, d)."""
    T, H, d = q.shape
    backend = resolve_backend(backend, q)
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
        for M in pack.lengths_host:  # host lengths: no device sync per block
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
