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

from .validate import ConfigError, one_line

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

# keys of a class that name a program to load (TorchScript runs its own code): never from a file,
# only from the user's command line (e.g. `dcgen evaluate ... +evaluate.i3d=/path`)
CODE_KEYS = {"VideoTask": ("i3d", "inception_weights")}
# sizes a file may not exceed: beyond them building the object alone would exhaust memory or time
BOUNDS = {
    "model": {"depth": 1024, "hidden_size": 16384, "num_heads": 1024, "encoder_dim": 16384,
              "mlp_ratio": 64, "num_classes": 10 ** 6},
    "task": {"resolution": 4096, "frames": 1024, "num_samples": 10 ** 7, "num_classes": 10 ** 6,
             "channels": 64, "latent_channels": 1024},
    "objective": {"num_timesteps": 10 ** 5},
}
# per class, tighter than its kind's: the digits source upscales every image when it is built
CLASS_BOUNDS = {"PixelTask": {"resolution": 512}}
# what the training loop reads from a stored run config (a file lacking one is refused as read)
REQUIRED_RUN_KEYS = {
    "": ("seed", "train", "dc", "sample", "optim", "task", "model", "objective"),
    "train": ("max_steps", "global_batch_size", "grad_accum_steps", "grad_clip", "ema_decay",
              "ckpt_every", "ckpt_keep", "sample_every", "log_every", "num_workers", "label_dropout"),
    "dc": ("ratio_weight", "target_n", "ratio_group_size", "n_warmup_steps", "n_start", "multi_budget",
           "multi_budget_start_step", "budgets"),
}
# the largest file dcgen reads as a config (a run dir's config.yaml, config.json, dcgen.json)
MAX_CONFIG_BYTES = 4 * 2 ** 20

# Hydra's instantiate keys; a file may carry `_target_` at the top of a node (a table key) and,
# for the optimizer, `_partial_: true` (the optimizer is built once the parameters exist)
_SPECIAL = re.compile(r"^_[A-Za-z]+_$")
_INTERPOLATION = "${"


def _plain(node):
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=False)  # no resolver runs here
    return node


MAX_DEPTH = 32


def check_plain(value: Any, where: str, path: str, allow: frozenset = frozenset(), depth: int = 0) -> None:
    """Refuse anything but plain data below `path`: interpolations, Hydra's special keys (except
    `allow`, at this level only), nesting deeper than MAX_DEPTH and objects that are not numbers,
    strings, booleans, null, lists or string-keyed mappings."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"{where}: refusing {path[:80]}...: nested deeper than {MAX_DEPTH} levels")
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
            check_plain(v, where, sub, depth=depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(v, where, f"{path}[{i}]", depth=depth + 1)
    elif isinstance(value, str):
        if _INTERPOLATION in value:
            raise ConfigError(f"{where}: refusing {path}={_short(value)}: interpolations and resolvers "
                              "are not read from files")
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise ConfigError(f"{where}: refusing {path}: a {type(value).__name__} is not plain data")


def _short(v, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n - 3] + "..."


def check_node(node, kind: str, where: str, path: str | None = None, trusted: bool = False) -> dict:
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
    cls_name = target.rsplit(".", 1)[-1]
    for key in () if trusted else CODE_KEYS.get(cls_name, ()):
        if node.get(key) is not None:
            raise ConfigError(f"{where}: refusing {path}.{key}={_short(node[key])}: a file may not name a "
                              f"program to load; give it on the command line (e.g. +evaluate.{key}=...)")
    for key, limit in {**BOUNDS.get(kind, {}), **CLASS_BOUNDS.get(cls_name, {})}.items():
        for v in _numbers(node.get(key)):
            if not -limit <= v <= limit:
                raise ConfigError(f"{where}: refusing {path}.{key}={_short(node[key])}: beyond {limit}")
    return dict(node)


def _numbers(v):
    if isinstance(v, bool):
        return []
    if isinstance(v, (int, float)):
        return [v]
    if isinstance(v, (list, tuple)):
        return [x for x in v if isinstance(x, (int, float)) and not isinstance(x, bool)]
    return []


ALLOW_LINKS_ENV = "DCGEN_ALLOW_RUN_DIR_LINKS"


def check_files(directory, where: str | None = None, limit: int = 100_000, links_within=None) -> None:
    """A run dir or export from elsewhere holds only directories and regular files: a symbolic
    link would send dcgen's writes (log lines, checkpoints, samples) or reads (/dev/zero) to a
    place the file chose, and a FIFO or device would hang a read. Refused in one line.
    `links_within`: links to regular files inside that folder are fine (a Hugging Face cache
    snapshot links its files to ../../blobs). For a run dir of your own that links, e.g.,
    checkpoints/ to scratch space, set DCGEN_ALLOW_RUN_DIR_LINKS=1."""
    import os
    import stat
    root = os.fspath(directory)
    allow_all = os.environ.get(ALLOW_LINKS_ENV) == "1"
    inside = os.path.realpath(links_within) if links_within is not None else None
    n = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=allow_all):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                target = os.path.realpath(p)
                ok = allow_all or (inside is not None and os.path.isfile(target)
                                   and os.path.commonpath([inside, target]) == inside)
                if not ok:
                    raise ConfigError(f"{where or root}: refusing {p}: a symbolic link inside a run or "
                                      f"export directory (copy what it points to; for a run dir of "
                                      f"your own, {ALLOW_LINKS_ENV}=1)")
                mode = os.stat(p).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise ConfigError(f"{where or root}: refusing {p}: not a regular file")
            n += 1
            if n > limit:
                return


def read_text(path, what: str = "file") -> str:
    """A config file's text, refused in one line when it is not a regular file of at most
    MAX_CONFIG_BYTES (a link to /dev/zero, a FIFO, a multi-GB file)."""
    import os
    import stat
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: refusing a {what} that is not a regular file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: refusing a {what} of {st.st_size} bytes (at most {MAX_CONFIG_BYTES})")
    with open(path, "rb") as f:
        return f.read(MAX_CONFIG_BYTES + 1).decode("utf-8", errors="strict")


def parse_yaml(text: str, where: str):
    """YAML from an untrusted file: safe tags only, no anchors or aliases (an alias bomb expands
    exponentially; dcgen never writes them), bounded nesting."""
    import yaml
    try:
        for tok in yaml.scan(text):
            if isinstance(tok, (yaml.AnchorToken, yaml.AliasToken)):
                raise ConfigError(f"{where}: refusing YAML anchors and aliases")
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"{where}: not valid YAML: {' '.join(str(e).split())[:200]}") from None


def check_file_config(cfg, where: str, targets: bool = True) -> None:
    """A whole run-dir config (`config.yaml`): plain data throughout; with `targets`, every node
    that names a class is one of task/model/objective/optim and names it from the exact tables."""
    data = _plain(cfg)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    if targets:  # built from: every key the loop reads must be there, sections must be sections
        for section, keys in REQUIRED_RUN_KEYS.items():
            node = data if not section else data.get(section)
            if not isinstance(node, Mapping):
                raise ConfigError(f"{where}: refusing {section}={_short(node)}: expected a section")
            missing = [k for k in keys if k not in node]
            if missing:
                raise ConfigError(f"{where}: refusing a run config without "
                                  f"{', '.join((section + '.' if section else '') + k for k in missing)}")
        if data.get("init") is not None and not isinstance(data.get("init"), Mapping):
            raise ConfigError(f"{where}: refusing init={_short(data['init'])}: expected a section or null")
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


def resolve_class(kind: str, target: str):
    """The class an accepted `_target_` of a `kind` node names (TABLES), imported now."""
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
        except (TypeError, ArithmeticError, RuntimeError, MemoryError, RecursionError, IndexError) as e:
            raise ConfigError(f"{where}: cannot build the model: {type(e).__name__}: {one_line(e, 200)}") from None
    if trusted:
        plain = _plain(node)
        if not (isinstance(plain, Mapping) and plain.get("_target_") in TABLES[kind]
                and not any(_SPECIAL.match(str(k)) for k in plain if k not in ("_target_", "_partial_"))):
            from hydra.utils import instantiate
            node = node if isinstance(node, DictConfig) else OmegaConf.create(plain)
            return instantiate(node, _convert_="all")
        # a dcgen class: built the same way as from a file (the command line resolves first)
        node = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(plain)
        node = check_node(node, kind, where, trusted=True)
    else:
        node = check_node(node, kind, where)
    target = node.pop("_target_")
    partial = bool(node.pop("_partial_", False))
    for k, v in fill.items():
        node.setdefault(k, v)
    cls = resolve_class(kind, target)
    if partial:
        return functools.partial(cls, **node)
    try:
        return cls(**node)
    except (TypeError, ArithmeticError, RuntimeError, MemoryError, RecursionError, IndexError) as e:
        # values a file chose (a zero divisor, an overflow, an allocation): one line, not a traceback
        raise ConfigError(f"{where}: cannot build {kind} {target}: {type(e).__name__}: {one_line(e, 200)}") from None


__all__ = ["TASKS", "OBJECTIVES", "OPTIMIZERS", "MODELS", "build", "check_node", "check_file_config",
           "check_plain", "check_files", "read_text", "parse_yaml"]
