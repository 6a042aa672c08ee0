"""DiT and DC-DiT models, and the one way to build one from its description.

A model is described by one node, `{_target_: dcgen.models.DCDiT, <constructor arguments>}`, in
training configs (where the task fills `input_size`, `in_channels` and `num_classes`), run dirs,
exports (`config.json`) and converter output alike. `describe(model)` gives the node with every
constructor argument resolved; `build(node)` is the only function that constructs a model from
one. The paper sizes (S/B/L/XL) live in configs/model/*.yaml.
"""
from __future__ import annotations

from typing import Mapping

import torch.nn as nn

from .dcdit import DCDiT, StageAux
from .dit import DiT

MODULE = "dcgen.models"
# constructor arguments that older descriptions may carry and that no longer exist:
# class_dropout_prob (label dropout is the training loop's train.label_dropout: one knob)
REMOVED_ARGS = ("class_dropout_prob",)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP/FSDP and torch.compile wrappers."""
    # DDP/FSDP wrappers keep the model in .module, torch.compile in ._orig_mod
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def describe(model) -> dict:
    """The model's description node: `_target_` and every constructor argument (resolved)."""
    model = unwrap(model)
    if type(model) not in (DCDiT, DiT):
        raise ValueError(f"cannot describe a {type(model).__name__}: not a dcgen model (DCDiT, DiT)")
    return {"_target_": f"{MODULE}.{type(model).__name__}", **model.config}


def model_class(target) -> type:
    """The dcgen model class a `_target_` names (DCDiT or DiT), nothing else."""
    if not isinstance(target, str) or not target.startswith(MODULE + "."):
        raise ValueError(f"model _target_ {target!r}: a dcgen model is built only from "
                         f"{MODULE}.DCDiT or {MODULE}.DiT")
    cls = {f"{MODULE}.DCDiT": DCDiT, f"{MODULE}.DiT": DiT}.get(target)
    if cls is None:
        raise ValueError(f"model _target_ {target!r}: not a model class ({MODULE}.DCDiT, {MODULE}.DiT)")
    return cls


def build(node: Mapping, **fill):
    """Construct the model a description node names. `fill` supplies keys the node leaves unset
    (None or absent), e.g. the task's input_size / in_channels / num_classes."""
    node = dict(node)
    if "arch" in node and "_target_" not in node:
        node = from_legacy(node)
    cls = model_class(node.pop("_target_", None))
    for key, value in fill.items():
        if node.get(key) is None:
            node[key] = value
    node.pop("_partial_", None)
    for removed in REMOVED_ARGS:  # descriptions written before an argument was removed
        node.pop(removed, None)
    return cls(**node)


def from_legacy(node: Mapping) -> dict:
    """Translate a model node of the old `{arch: dcdit|dit, ...}` schema (exports written before
    2026-11-30) into a description node."""
    node = dict(node)
    arch = node.pop("arch", None)
    names = {"dcdit": "DCDiT", "dit": "DiT"}
    if arch not in names:
        raise ValueError(f"old-format model node: arch must be dcdit or dit, got {arch!r}")
    return {"_target_": f"{MODULE}.{names[arch]}", **node}


def config_node(name: str) -> dict:
    """The description node of a shipped model config (configs/model/<name>.yaml), e.g.
    "dcdit_b" or "dit_xl_2": where the paper sizes live."""
    from importlib.resources import files

    import yaml
    path = files("dcgen.configs") / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no model config {name!r} in dcgen/configs/model")
    return yaml.safe_load(path.read_text())


__all__ = ["DCDiT", "DiT", "StageAux", "build", "config_node", "describe", "from_legacy"]
