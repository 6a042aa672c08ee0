"""DiT and DC-DiT models. `build_model(arch, **kwargs)` builds one from a config dict."""
from __future__ import annotations

from .dcdit import DCDiT, StageAux
from .dit import DiT, SIZES

ARCHS = {"dcdit": DCDiT, "dit": DiT}


def preset(name: str) -> dict:
    """Keyword arguments of a named size: 'DC-DiT-S' ... 'DC-DiT-XL', 'DiT-S/2' ... 'DiT-XL/8'."""
    key = name.upper().replace("_", "-")
    if key.startswith("DC-DIT-"):
        size = key[len("DC-DIT-"):].split("-")[0]
        arch, patch = "dcdit", None
    elif key.startswith("DIT-"):
        size, _, patch = key[len("DIT-"):].partition("/")
        arch = "dit"
    else:
        raise ValueError(f"unknown preset '{name}' (e.g. DC-DiT-B, DiT-XL/2)")
    if size not in SIZES:
        raise ValueError(f"unknown model size '{size}' in '{name}' (valid: {', '.join(SIZES)})")
    D, depth, heads = SIZES[size]
    kw = dict(arch=arch, hidden_size=D, depth=depth, num_heads=heads)
    if arch == "dit":
        kw["patch_size"] = int(patch or 2)
    return kw


def build_model(arch: str = "dcdit", **kwargs):
    if arch not in ARCHS:
        raise ValueError(f"unknown model arch '{arch}' (valid: {', '.join(ARCHS)})")
    return ARCHS[arch](**kwargs)


__all__ = ["DCDiT", "DiT", "StageAux", "SIZES", "preset", "build_model"]
