"""Exported models: a directory holding `config.yaml` (the model's constructor arguments under
`model:` plus optional sampling/provenance nodes) and `model.safetensors` (its state dict).

Only safetensors and YAML are ever read here, so loading an export never runs foreign code.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
import yaml

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
# what an export directory may contain; anything else means the user pointed us at a directory
# holding other work, and replacing it would destroy that work
_EXPORT_FILES = {CONFIG_FILE, WEIGHTS_FILE}


# --------------------------------------------------------------------------------------------
# helpers shared with dcgen.compat.convert
# --------------------------------------------------------------------------------------------

def _listing(keys, limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}]"


def check_state_dict(expected: Mapping[str, torch.Size], got: Mapping[str, torch.Tensor],
                     where: str, label=None) -> None:
    """Raise a one-line ValueError naming `where` and every missing, unexpected or wrong-shaped
    key; `expected` maps names to shapes (from a real or meta-device model). `label(key)` may
    rewrite key names for the message (e.g. to add a converter's source name)."""
    label = label or (lambda k: k)
    missing = [label(k) for k in expected if k not in got]
    unexpected = [label(k) for k in got if k not in expected]
    wrong = [f"{label(k)} {tuple(got[k].shape)} != {tuple(expected[k])}" for k in expected
             if k in got and tuple(got[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes (file != model) {_listing(wrong)}")
    if problems:
        raise ValueError(f"{where}: state dict does not match the model: " + "; ".join(problems))


def plain(obj):
    """Turn tuples, torch.Size and numpy/torch scalars into YAML-safe Python values."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (str, bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # 0-d tensors, numpy scalars
        try:
            return plain(obj.item())
        except (ValueError, RuntimeError):
            pass
    return repr(obj)


def model_arch(model: nn.Module) -> str:
    from .models import ARCHS
    for name, cls in ARCHS.items():
        if type(model) is cls:
            return name
    raise ValueError(f"cannot export a {type(model).__name__}: not one of the dcgen archs "
                     f"({', '.join(ARCHS)})")


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP/FSDP wrappers keep the model in .module, torch.compile in ._orig_mod
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def export_model(model: nn.Module, out_dir, extra: dict | None = None) -> Path:
    """Write `out_dir/config.yaml` = {"model": {"arch": ..., **model.config}, **extra} and
    `out_dir/model.safetensors`. Atomic: both files are written into a temporary directory next
    to `out_dir`, which then replaces `out_dir` (an existing export is replaced)."""
    from safetensors.torch import save_file

    model = _unwrap(model)
    if not isinstance(getattr(model, "config", None), dict):
        raise ValueError(f"cannot export a {type(model).__name__}: it has no .config dict")
    extra = dict(extra or {})
    if "model" in extra:
        raise ValueError("export_model: `extra` must not contain a 'model' node (it is written "
                         "from model.config)")
    config = {"model": {"arch": model_arch(model), **plain(model.config)}, **plain(extra)}

    # safetensors refuses tensors that share memory; give each key its own contiguous CPU copy
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if ptr is not None and ptr in seen:
            v = v.clone()
        elif ptr is not None:
            seen.add(ptr)
        tensors[k] = v

    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"{out}: exists and is not a directory")
        other = sorted(p.name for p in out.iterdir() if p.name not in _EXPORT_FILES)
        if other:
            raise ValueError(f"{out}: refusing to replace a directory holding other files "
                             f"{_listing(other)}; choose an empty or new export directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    # a plain mkdir (not mkdtemp) so the export gets the user's umask, not 0700
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        with open(tmp / CONFIG_FILE, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False, default_flow_style=None)
        for name in _EXPORT_FILES:
            _fsync(tmp / name)
        if out.exists():
            # a directory cannot be os.replace'd onto a non-empty one: move the old aside first
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------

def resolve_export_dir(path) -> Path:
    """An export directory itself, a file inside one, or a run directory holding `export/`."""
    p = Path(path)
    if p.is_file() and p.name in _EXPORT_FILES:
        p = p.parent
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such export or run directory")
    if (p / WEIGHTS_FILE).is_file():
        return p
    if (p / "export").is_dir():  # a run directory (its own config.yaml is the run's, not the model's)
        return p / "export"
    if (p / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{p / WEIGHTS_FILE}: missing (an export needs {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE}; a run directory needs export/)")
    raise FileNotFoundError(f"{p}: not an export directory ({CONFIG_FILE} + {WEIGHTS_FILE}) "
                            "nor a run directory with export/")


def read_export_config(path) -> dict:
    """The parsed config.yaml of an export (or of a run directory's export/)."""
    d = resolve_export_dir(path)
    cfg_file = d / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: missing (an export needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        with open(cfg_file) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"{cfg_file}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file}: expected a mapping at the top level, got {type(cfg).__name__}")
    from .validate import check_targets
    check_targets(cfg, str(cfg_file))  # loading builds dcgen classes only, never foreign code
    return cfg


def load_model(path, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Build the model described by an export (or a run directory's export/) and load its
    weights strictly; returns it in eval mode on `device` (cast to `dtype` if given)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import build_model

    d = resolve_export_dir(path)
    cfg_file, w_file = d / CONFIG_FILE, d / WEIGHTS_FILE
    cfg = read_export_config(d)
    node = cfg.get("model")
    if not isinstance(node, dict):
        raise ValueError(f"{cfg_file}: no 'model' node (expected model: {{arch: dcdit|dit, ...}})")
    if "arch" not in node:
        raise ValueError(f"{cfg_file}: model node has no 'arch' (dcdit or dit)")
    try:
        model = build_model(**node)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: cannot build the model: {e}") from None
    try:
        state = load_file(str(w_file), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{w_file}: cannot read safetensors: {' '.join(str(e).split())}") from None
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state, str(w_file))
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(device=device, dtype=dtype)
    else:
        model.to(device)
    return model.eval()


__all__ = ["export_model", "load_model", "read_export_config", "resolve_export_dir",
           "check_state_dict"]
