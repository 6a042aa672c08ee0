"""Building objects from configs: exact tables for what a file names, Hydra for what the user typed.

Trust comes from where a config came from, never from what it says:

* **Trusted**: the user's own command line and the config folders they add with
  `hydra.searchpath=[file://...]`. Those nodes may name any class (the user's own task, say);
  Hydra builds them.
* **Untrusted**: everything read from a file dcgen did not write in this process: a run
  directory's `config.yaml`, an export's `config.json` / `dcgen.json`, a Hub snapshot, the node
  handed to the diffusers pipeline. Such a node is built only when its `_target_` is a key of the
  exact table of its kind below (dcgen's own classes, and the optimizers dcgen supports). The
  dotted path in the file is a *key*: nothing is imported by following it. Interpolations
  (`${...}`, which would run resolvers), Hydra's special keys (`_args_`, `_recursive_`,
  `_convert_`, a nested `_target_`), strings where a node is expected and any value that is not
  plain data (numbers, strings, booleans, null, lists, mappings) are refused before anything is
  built, with one line naming the file and the key.

Models have their own exact table in `dcgen.models.build` (DCDiT, DiT).
"""
from __future__ import annotations

import functools
import importlib
import re
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from .validate import ConfigError

# accepted `_target_` -> (module, attribute): both the config spelling and the module path
TASKS = {
    "dcgen.tasks.toy.task.ToyTask": ("dcgen.tasks.toy.task", "ToyTask"),
    "dcgen.tasks.toy.ToyTask": ("dcgen.tasks.toy.task", "ToyTask"),
    "dcgen.tasks.pixel.task.PixelTask": ("dcgen.tasks.pixel.task", "PixelTask"),
    "dcgen.tasks.pixel.PixelTask": ("dcgen.tasks.pixel.task", "PixelTask"),
    "dcgen.tasks.imagenet_latent.ImageNetLatentTask": ("dcgen.tasks.imagenet_latent.task", "ImageNetLatentTask"),
    "dcgen.tasks.imagenet_latent.task.ImageNetLatentTask": ("dcgen.tasks.imagenet_latent.task",
                                                            "ImageNetLatentTask"),
    "dcgen.tasks.video.task.VideoTask": ("dcgen.tasks.video.task", "VideoTask"),
    "dcgen.tasks.video.VideoTask": ("dcgen.tasks.video.task", "VideoTask"),
    "dcgen.tasks.voxel.task.VoxelTask": ("dcgen.tasks.voxel.task", "VoxelTask"),
    "dcgen.tasks.voxel.VoxelTask": ("dcgen.tasks.voxel.task", "VoxelTask"),
}
OBJECTIVES = {
    "dcgen.diffusion.GaussianDiffusion": ("dcgen.diffusion.gaussian", "GaussianDiffusion"),
    "dcgen.diffusion.gaussian.GaussianDiffusion": ("dcgen.diffusion.gaussian", "GaussianDiffusion"),
    "dcgen.diffusion.FlowMatching": ("dcgen.diffusion.flow", "FlowMatching"),
    "dcgen.diffusion.flow.FlowMatching": ("dcgen.diffusion.flow", "FlowMatching"),
}
OPTIMIZERS = {
    "torch.optim.AdamW": ("torch.optim", "AdamW"),
    "torch.optim.Adam": ("torch.optim", "Adam"),
    "torch.optim.SGD": ("torch.optim", "SGD"),
}
MODELS = {
    "dcgen.models.DCDiT": ("dcgen.models.dcdit", "DCDiT"),
    "dcgen.models.DiT": ("dcgen.models.dit", "DiT"),
}
TABLES = {"task": TASKS, "objective": OBJECTIVES, "optim": OPTIMIZERS, "model": MODELS}

# Hydra's instantiate keys; a file may carry `_target_` at the top of a node (a table key) and,
# for the optimizer, `_partial_: true` (the optimizer is built once the parameters exist)
_SPECIAL = re.compile(r"^_[A-Za-z]+_$")
_INTERPOLATION = "${"


def _plain(node):
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=False)  # no resolver runs here
    return node


def check_plain(value: Any, where: str, path: str, allow: frozenset = frozenset()) -> None:
    """Refuse anything but plain data below `path`: interpolations, Hydra's special keys (except
    `allow`, at this level only) and objects that are not numbers, strings, booleans, null,
    lists or string-keyed mappings."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if not isinstance(k, str):
                raise ConfigError(f"{where}: refusing {sub}: keys must be strings")
            if _INTERPOLATION in k:
                raise ConfigError(f"{where}: refusing {sub}: interpolations are not read from files")
            if _SPECIAL.match(k) and k not in allow:
                raise ConfigError(f"{where}: refusing {sub}={_short(v)}: a file may name a class only "
                                  "as the _target_ of a task, model, objective or optim node")
            check_plain(v, where, sub)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, where, f"{path}[{i}]")
    elif isinstance(value, str):
        if _INTERPOLATION in value:
            raise ConfigError(f"{where}: refusing {path}={_short(value)}: interpolations and resolvers "
                              "are not read from files")
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise ConfigError(f"{where}: refusing {path}: a {type(value).__name__} is not plain data")


def _short(v, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n - 3] + "..."


def check_node(node, kind: str, where: str, path: str | None = None) -> dict:
    """The plain dict of an untrusted `kind` node (task, model, objective, optim), refused unless
    it is a mapping of plain data whose `_target_` is a key of the kind's exact table."""
    path = path or kind
    node = _plain(node)
    if not isinstance(node, Mapping):
        raise ConfigError(f"{where}: refusing {path}={_short(node)}: expected a node "
                          f"({{_target_: ..., ...}}), got a {type(node).__name__}")
    allow = frozenset({"_target_", "_partial_"} if kind == "optim" else {"_target_"})
    check_plain(node, where, path, allow=allow)
    table = TABLES[kind]
    target = node.get("_target_")
    if target is None:
        names = sorted({k for k in table if k.count(".") <= 3})
        raise ConfigError(f"{where}: no {kind} description: {path} has no _target_ (expected one of "
                          f"{', '.join(names)})")
    if target not in table:
        names = sorted({k for k in table if k.count(".") <= 3})
        raise ConfigError(f"{where}: refusing {path}._target_={_short(target)}: {kind} nodes read "
                          f"from a file are built only from {', '.join(names)}")
    if kind == "optim" and node.get("_partial_", True) is not True:
        raise ConfigError(f"{where}: refusing {path}._partial_={_short(node['_partial_'])}: expected true")
    return dict(node)


def check_file_config(cfg, where: str, targets: bool = True) -> None:
    """A whole run-dir config (`config.yaml`): plain data throughout; with `targets`, every node
    that names a class is one of task/model/objective/optim and names it from the exact tables."""
    data = _plain(cfg)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    for key, value in data.items():
        if key in TABLES and targets:
            check_node(value, key, where)
        elif key in TABLES:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: refusing {key}={_short(value)}: expected a node "
                                  f"({{_target_: ..., ...}}), got a {type(value).__name__}")
            check_plain(value, where, key, allow=frozenset({"_target_", "_partial_"}))
        else:
            check_plain({key: value}, where, "")


def _resolve(kind: str, target: str):
    module, attr = TABLES[kind][target]
    return getattr(importlib.import_module(module), attr)


def build(node, kind: str, where: str, trusted: bool = False, **fill):
    """Construct the object a task / objective / optim node describes.

    Untrusted (a node from a file): only through the exact table of `kind` (see the module
    docstring). Trusted (the user's command line and search path): a table entry is built the
    same way; any other `_target_` goes to Hydra's `instantiate`. `fill` supplies constructor
    arguments the node does not set. An optim node gives a `functools.partial` (its `_partial_`)."""
    if kind == "model":
        from .models import build as build_model
        node = check_node(node, "model", where) if not trusted else dict(_plain(node))
        try:
            return build_model(node, **fill)
        except TypeError as e:
            raise ConfigError(f"{where}: cannot build the model: {e}") from None
    if trusted:
        plain = _plain(node)
        if not (isinstance(plain, Mapping) and plain.get("_target_") in TABLES[kind]
                and not any(_SPECIAL.match(str(k)) for k in plain if k not in ("_target_", "_partial_"))):
            from hydra.utils import instantiate
            node = node if isinstance(node, DictConfig) else OmegaConf.create(plain)
            return instantiate(node, _convert_="all")
        # a dcgen class: built the same way as from a file (the command line resolves first)
        node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(plain)
        node = check_node(node, kind, where)
    else:
        node = check_node(node, kind, where)
    target = node.pop("_target_")
    partial = bool(node.pop("_partial_", False))
    for k, v in fill.items():
        node.setdefault(k, v)
    cls = _resolve(kind, target)
    if partial:
        return functools.partial(cls, **node)
    try:
        return cls(**node)
    except TypeError as e:
        raise ConfigError(f"{where}: cannot build {kind} {target}: {e}") from None


__all__ = ["TASKS", "OBJECTIVES", "OPTIMIZERS", "MODELS", "build", "check_node", "check_file_config",
           "check_plain"]
