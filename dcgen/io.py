"""Exported models in the Hugging Face layout: a directory holding `config.json` (the model's
description node: `_target_` plus every constructor argument), `model.safetensors` (its state
dict) and, for dcgen's own use, `dcgen.json` (the task and objective to sample with, the step,
sampling defaults). `dcgen.load_model` takes such a directory, a run directory (its `export/`),
an export of the older layout (`config.yaml` with `model: {arch: ...}`), or a Hub id.

Only safetensors, JSON and YAML are ever read here, and only dcgen classes are built, so loading
an export never runs foreign code.
"""
from __future__ import annotations

import json
import re
import os  # noqa: F401  (tests/test_untrusted.py uses dcgen.io.os.makedirs as a hostile target that resolves)
import shutil
import uuid
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from .files import commit_dir
from .run import LEGACY_EXPORT_CONFIG, Run

CONFIG_FILE = "config.json"  # the model description (Hugging Face layout)
WEIGHTS_FILE = "model.safetensors"
EXTRA_FILE = "dcgen.json"  # task, objective, step, sample defaults
PIPELINE_INDEX = "model_index.json"  # a DCDiTPipeline.save_pretrained folder ...
PIPELINE_TRANSFORMER = "transformer"  # ... keeps the model as an export in this subfolder
LEGACY_CONFIG_FILE = LEGACY_EXPORT_CONFIG  # exports written before 2026-11-30
# what an export directory may contain; anything else means the user pointed us at a directory
# holding other work, and replacing it would destroy that work
_EXPORT_FILES = {CONFIG_FILE, WEIGHTS_FILE, EXTRA_FILE, LEGACY_CONFIG_FILE, "README.md"}


# --------------------------------------------------------------------------------------------
# helpers shared with dcgen.compat.convert
# --------------------------------------------------------------------------------------------

def listing(keys, limit: int = 8) -> str:
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
    def shape(v):  # a tensor, or a shape (a safetensors header)
        return tuple(getattr(v, "shape", v))

    wrong = [f"{label(k)} {shape(got[k])} != {tuple(expected[k])}" for k in expected
             if k in got and shape(got[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {listing(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes (file != model) {listing(wrong)}")
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


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------

def export_model(model: nn.Module, out_dir, extra: dict | None = None) -> Path:
    """Write `out_dir/config.json` (dcgen.models.describe(model)), `out_dir/model.safetensors`
    and, with `extra` (task, objective, step, sample, ...), `out_dir/dcgen.json`. Atomic: the
    files are written into a temporary directory next to `out_dir`, which then replaces it."""
    from safetensors.torch import save_file

    from .models import describe, unwrap
    model = unwrap(model)
    extra = dict(extra or {})
    if "model" in extra:
        raise ValueError("export_model: `extra` must not contain a 'model' node (config.json is "
                         "written from the model itself)")
    config = plain(describe(model))

    # safetensors refuses tensors that share memory; give each key its own contiguous CPU copy
    tensors, seen = {}, set()
    from .repa import strip_projector  # REPA's projector trains beside the model, it is not exported
    for k, v in strip_projector(model.state_dict()).items():
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
                             f"{listing(other)}; choose an empty or new export directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    # a plain mkdir (not mkdtemp) so the export gets the user's umask, not 0700
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if extra:
            (tmp / EXTRA_FILE).write_text(json.dumps(plain(extra), indent=2) + "\n")
        commit_dir(tmp, out)  # fsync every file, then one rename (an old export moved aside first)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_export(p: Path) -> bool:
    return (p / WEIGHTS_FILE).is_file() and ((p / CONFIG_FILE).is_file() or (p / LEGACY_CONFIG_FILE).is_file())


def resolve_export_dir(path) -> Path:
    """An export directory itself, a file inside one, a run directory holding `export/`, a
    `DCDiTPipeline.save_pretrained` folder (its `transformer/`), or a
    Hub id `owner/name` (downloaded into the Hugging Face cache: config.json, model.safetensors,
    dcgen.json)."""
    from .trust import check_files
    p = Path(path).expanduser()
    if p.is_file() and p.name in _EXPORT_FILES:
        p = p.parent
    if p.is_dir():
        # no links or special files in a directory from elsewhere; a Hugging Face cache snapshot
        # (<repo>/snapshots/<rev>/) links its files to <repo>/blobs/, which is fine
        snapshot = p.parent.name == "snapshots" and (p.parents[1] / "blobs").is_dir()
        check_files(p, links_within=p.parents[1] if snapshot else None)
        if _is_export(p):
            return p
        if (p / PIPELINE_INDEX).is_file() and _is_export(p / PIPELINE_TRANSFORMER):  # a pipeline folder
            return p / PIPELINE_TRANSFORMER
        run_export = Run(p).export_dir
        if run_export.is_dir() and _is_export(run_export):  # a run directory
            return run_export
        if (p / CONFIG_FILE).is_file() or (p / LEGACY_CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{p / WEIGHTS_FILE}: missing (an export needs {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE}; a run directory needs export/)")
        raise FileNotFoundError(f"{p}: not an export directory ({CONFIG_FILE} + {WEIGHTS_FILE}) "
                                "nor a run directory with export/")
    if not p.exists() and HUB_ID.match(str(path)):
        from huggingface_hub import snapshot_download
        try:
            local = snapshot_download(str(path), allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, EXTRA_FILE])
        except Exception as e:  # offline, unknown repo, no access: one line
            raise FileNotFoundError(f"{path}: no such local directory, and the Hub download failed: "
                                    f"{' '.join(str(e).split())[:300]}") from None
        return resolve_export_dir(local)
    raise FileNotFoundError(f"{p}: no such export or run directory")


def read_config_file(file: Path, kind: str):
    """An export's config file, read as untrusted data (dcgen.trust): a regular file of bounded
    size, JSON or YAML without anchors, errors in one line."""
    from .trust import parse_yaml, read_text
    text = read_text(file, "config file")
    if kind == "json":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"{file}: not valid JSON: {' '.join(str(e).split())[:200]}") from None
    else:
        data = parse_yaml(text, str(file))
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def read_export_config(path) -> dict:
    """{"model": description node, "task": ..., "objective": ..., "step": ..., "sample": ...} of
    an export (either layout; an old `arch:` model node is translated). The files are untrusted
    (dcgen.trust): plain data only, and every node that names a class names one of dcgen's
    exact tables; anything else is a one-line ConfigError (a ValueError) naming the file."""
    from .models import from_legacy
    from .trust import check_node
    d = resolve_export_dir(path)
    if (d / CONFIG_FILE).is_file():
        where = d / CONFIG_FILE
        model = read_config_file(where, "json")
        if "arch" in model and "_target_" not in model:
            model = from_legacy(model)
        cfg = {"model": check_node(model, "model", str(where), path="config")}
        if (d / EXTRA_FILE).is_file():
            extra = read_config_file(d / EXTRA_FILE, "json")
            cfg.update(_check_extra(extra, str(d / EXTRA_FILE)))
    else:  # the layout before 2026-11-30: one config.yaml with a model: {arch: ...} node
        where = d / LEGACY_CONFIG_FILE
        cfg = read_config_file(where, "yaml")
        model = cfg.get("model")
        if isinstance(model, dict) and "arch" in model and "_target_" not in model:
            model = from_legacy(model)
        if not isinstance(model, dict) or "_target_" not in model:
            raise ValueError(f"{where}: no model description (expected _target_: dcgen.models.DCDiT "
                             "or dcgen.models.DiT)")
        cfg = {"model": check_node(model, "model", str(where)),
               **_check_extra({k: v for k, v in cfg.items() if k != "model"}, str(where))}
    return cfg


def _check_extra(extra: dict, where: str) -> dict:
    """The task/objective/step/sample part of an export, each node checked against its table."""
    from .trust import check_node, check_plain
    from .validate import ConfigError
    out = {}
    for key, value in extra.items():
        if key == "model":
            continue  # config.json is the model's description
        if key in ("task", "objective"):
            if value is None and key == "objective":
                continue
            out[key] = check_node(value, key, where)
        elif key == "sample":
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{where}: refusing sample={value!r}: expected a mapping")
            check_plain(value, where, key, allow=frozenset())
            out[key] = value
        elif key == "step":
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ConfigError(f"{where}: refusing step={value!r}: expected an integer >= 0")
            out[key] = value
        else:
            check_plain({key: value}, where, "")
            out[key] = value
    return out


def load_model(path, device="cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Build the model described by an export, a run directory's export/ or a Hub id, and load
    its weights strictly; returns it in eval mode on `device` (cast to `dtype` if given)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from .models import build

    d = resolve_export_dir(path)
    cfg = read_export_config(d)
    cfg_file = d / (CONFIG_FILE if (d / CONFIG_FILE).is_file() else LEGACY_CONFIG_FILE)
    w_file = d / WEIGHTS_FILE
    # the description is checked against the weights' header on the meta device first: a crafted
    # config.json (hidden_size=10**7) is refused without allocating anything
    try:
        with torch.device("meta"):
            shell = build(cfg["model"])
    except (TypeError, ValueError, RuntimeError, ArithmeticError, IndexError, RecursionError) as e:
        # values a file chose (a zero divisor, an overflow): one line, never a traceback
        raise ValueError(f"{cfg_file}: cannot build the model: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}") from None
    expected = {k: v.shape for k, v in shell.state_dict().items()}
    del shell
    try:
        with safe_open(str(w_file), framework="pt", device="cpu") as f:
            header = {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{w_file}: cannot read safetensors: {' '.join(str(e).split())}") from None
    check_state_dict(expected, header, str(w_file))
    try:
        model = build(cfg["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: cannot build the model: {e}") from None
    try:
        state = load_file(str(w_file), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{w_file}: cannot read safetensors: {' '.join(str(e).split())}") from None
    check_state_dict(expected, state, str(w_file))
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model.to(device=device, dtype=dtype)
    else:
        model.to(device)
    return model.eval()


def load_run(run_dir, device) -> tuple:
    """(model with the export's EMA weights, objective, task, export config) of a run dir or an
    export: what `dcgen sample`, `dcgen evaluate` and `dcgen compare` load."""
    from .trust import build
    d = resolve_export_dir(run_dir)  # the run dir's (or export's) files are checked once, here
    ecfg = read_export_config(d)  # checked before anything is built
    where = str(d / EXTRA_FILE)
    if "task" not in ecfg:
        raise ValueError(f"{run_dir}: the export has no task config; sample it from Python with "
                         "dcgen.sample.generate(model, objective, task)")
    task = build(ecfg["task"], "task", where)
    objective = build(ecfg.get("objective") or {"_target_": "dcgen.diffusion.GaussianDiffusion"},
                      "objective", where)
    model = load_model(d, device=device)
    return model, objective, task, ecfg


def load_checkpoint_ema(model: nn.Module, run_dir, step: int) -> bool:
    """Load the EMA weights of the run's kept step-`step` checkpoint into `model` (a REPA run's
    projector left out); False when that checkpoint is not kept."""
    from safetensors.torch import load_file
    from .repa import strip_projector  # a REPA run's checkpoint also holds the projector
    f = Run(run_dir).checkpoint_dir(step) / "ema.safetensors"
    if not f.is_file():
        return False
    model.load_state_dict(strip_projector(load_file(f)))
    return True


def push_to_hub(export_dir, repo_id: str, private: bool = False, token=None) -> str:
    """Upload an export directory (config.json, model.safetensors, dcgen.json) to the Hub."""
    from huggingface_hub import HfApi
    d = resolve_export_dir(export_dir)
    if not (d / CONFIG_FILE).is_file():
        raise ValueError(f"{d}: an old-layout export; re-export it with `dcgen export` first")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(d),
                             allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, EXTRA_FILE, "README.md"],
                             commit_message="dcgen export")
    return str(getattr(info, "commit_url", repo_id))


def export_command(cfg) -> Path:
    """`dcgen export run_dir=... out_dir=... [push_to_hub=owner/name private=false]`."""
    src = resolve_export_dir(cfg.run_dir)
    model = load_model(src)
    extra = {k: v for k, v in read_export_config(src).items() if k != "model"}
    out = export_model(model, cfg.out_dir, extra)
    print(out)
    if cfg.get("push_to_hub"):
        print(push_to_hub(out, cfg.push_to_hub, private=bool(cfg.get("private", False))))
    return out


__all__ = ["export_model", "export_command", "load_model", "read_export_config", "resolve_export_dir",
           "check_state_dict", "push_to_hub"]
