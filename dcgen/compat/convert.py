"""Import foreign checkpoints as dcgen models (METHOD §11).

- `convert_dit`: facebookresearch/DiT files, a plain state dict (DiT-XL-2-256x256.pt) or a
  train.py checkpoint {model, ema, opt, args}; read with torch.load(weights_only=True).
- `convert_amd_dcdit`: AMD-AGI/DynamicChunkingDiT checkpoints {model, ema, opt, config}, whose
  `config` is a pickled `config.Config` dataclass. torch's weights_only loader refuses that class,
  so they are read with a restricted unpickler: it admits what tensors need, turns every class of
  the reference's `config` module into an inert `ConfigPlaceholder`, and refuses anything else.

Both infer the architecture from tensor shapes, map every source tensor exactly once onto our
names, check `pos_embed` against our sin-cos table and drop it (a frozen parameter there, a
non-persistent buffer here: Q10), then build the model and check every key and shape against it
before loading. `tools/convert_checkpoint.py` wraps them.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import codecs
import collections
import hashlib
import math
import pickle
import re
import types
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from ..chunking import grid as G
from ..io import check_state_dict, plain
from ..models import build

# heads of the published sizes; neither format stores them (qkv is (3D, D) for any head count)
DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")
# [R]'s sampling compatibility (METHOD §11 compat=reference); init flags only matter when the
# converted model is trained further, the others change its outputs
REFERENCE_COMPAT = dict(block_adaln_init="xavier", residual_proj_init="xavier",
                        residual_autocast=True, attn_qkv_bf16=True,
                        tail_drop_protect_forced=False)
REFERENCE_SIGMA = 1.0  # HNetConfig.dechunk_kernel_sigma default in [R], whatever the grid


# --------------------------------------------------------------------------------------------
# Restricted unpickling of [R] checkpoints
# --------------------------------------------------------------------------------------------

class ConfigPlaceholder:
    """Stands in for a class of [R]'s `config` module while unpickling. None of that code runs:
    the pickled state (a dataclass's fields) is kept as plain attributes."""

    _source = "config.?"

    def __init__(self, *args, **kwargs):  # REDUCE-style pickles call the class
        if args:
            self.__dict__["_args"] = list(args)
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        parts = state if isinstance(state, tuple) and len(state) == 2 else (state,)
        for part in parts:  # (dict state, slot state) for classes with __slots__
            if isinstance(part, dict):
                self.__dict__.update(part)
            elif part is not None:
                self.__dict__["_state"] = part

    def to_dict(self) -> dict:
        return {"_class": self._source, **{str(k): _config_plain(v) for k, v in self.__dict__.items()}}

    def __repr__(self):
        return f"<placeholder {self._source} {sorted(map(str, self.__dict__))}>"


def _config_plain(v):
    if isinstance(v, ConfigPlaceholder):
        return v.to_dict()
    if isinstance(v, dict):
        return {str(k): _config_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_config_plain(x) for x in v]
    if torch.is_tensor(v):
        return f"<tensor {tuple(v.shape)}>"
    return plain(v)


_PLACEHOLDERS: dict[tuple[str, str], type] = {}


def _placeholder_class(module: str, name: str) -> type:
    key = (module, name)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = type(name, (ConfigPlaceholder,),
                                  {"_source": f"{module}.{name}", "__module__": __name__})
    return _PLACEHOLDERS[key]


def _safe_globals() -> dict:
    """What torch.save output references besides storages (which torch resolves itself)."""
    import torch._tensor
    import torch._utils

    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "Tensor"): torch.Tensor,
        ("torch.nn.parameter", "Parameter"): nn.Parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
        ("_codecs", "encode"): codecs.encode,  # how protocol 2 pickles bytes
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                 "_rebuild_parameter", "_rebuild_parameter_with_state",
                 "_rebuild_meta_tensor_no_storage"):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Admits tensors and [R]'s config dataclasses (as placeholders); refuses every other global,
    so a checkpoint cannot run code (os.system, eval, ...) on load."""

    _allowed: dict | None = None

    def find_class(self, module, name):
        # protocol 2 writes Python 2 names (__builtin__.set); they never clash with Python 3 ones
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _safe_globals()
        obj = self._allowed.get((module, name))
        if obj is not None:
            return obj
        if module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        if module == "config" or module.startswith("config."):
            return _placeholder_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle global '{module}.{name}' (only tensors, containers and the "
            "reference's config.* dataclasses are allowed)")


# torch.load wants a module-like object with Unpickler and load
restricted_pickle = types.ModuleType("dcgen_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler
restricted_pickle.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()
restricted_pickle.__doc__ = "pickle_module for torch.load that only admits tensors (see RestrictedUnpickler)"


def _check_input(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            # torch.load hands TorchScript archives to torch.jit.load, which runs their code
            if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist()):
                raise ValueError(f"{path}: a TorchScript archive, not a checkpoint; refusing it")
    return path


def _torch_load(path: Path, **kw):
    # mmap keeps a multi-GB {model, ema, opt} file out of RAM; only the zip format supports it
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, **kw)
    except pickle.UnpicklingError as e:
        msg = " ".join(str(e).split())
        # torch's weights_only message advises weights_only=False; report only the global
        m = re.search(r"GLOBAL ([\w.]+)", msg)
        if m and "weights_only" in msg:
            hint = " (an AMD DC-DiT checkpoint? use --format amd-dcdit)" \
                if m.group(1).startswith("config.") else ""
            msg = f"refusing to unpickle global '{m.group(1)}': a DiT checkpoint holds only tensors{hint}"
        raise ValueError(f"{path}: unsafe or unreadable pickle: {msg[:400]}") from None
    except (RuntimeError, EOFError, OSError) as e:
        msg = " ".join(str(e).split())
        raise ValueError(f"{path}: cannot read as a torch checkpoint: {msg[:400]}") from None


def load_reference_checkpoint(path) -> dict:
    """An [R] checkpoint through the restricted unpickler (its `config` as placeholders)."""
    path = _check_input(path)
    obj = _torch_load(path, weights_only=False, pickle_module=restricted_pickle)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def load_dit_checkpoint(path):
    """A facebookresearch/DiT file with torch's weights_only loader. train.py checkpoints also
    hold the argparse Namespace, which is inert and admitted."""
    path = _check_input(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        return _torch_load(path, weights_only=True)


# --------------------------------------------------------------------------------------------
# State-dict plumbing
# --------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def strip_prefixes(sd: dict, where: str) -> dict:
    """Drop DDP / torch.compile / FSDP wrapper prefixes (in any order and repetition)."""
    out, origin = {}, {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise ValueError(f"{where}: non-string state-dict key {k!r}")
        name = k
        while name.startswith(WRAPPER_PREFIXES):
            name = name[next(len(p) for p in WRAPPER_PREFIXES if name.startswith(p)):]
        if name in out:
            raise ValueError(f"{where}: keys '{origin[name]}' and '{k}' both become '{name}' "
                             "once wrapper prefixes are stripped")
        out[name], origin[name] = v, k
    return out


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


class _Renamer:
    """Moves source tensors to our names; each source key can be taken once, and `finish` fails
    on whatever was not taken, so no tensor is silently lost or duplicated."""

    def __init__(self, src: dict, where: str):
        self.left = dict(src)
        self.out: dict[str, torch.Tensor] = {}
        self.where = where

    def take(self, key: str) -> torch.Tensor:
        if key not in self.left:
            raise ValueError(f"{self.where}: no tensor '{key}' (used already or absent)")
        return self.left.pop(key)

    def move(self, src_prefix: str, dst_prefix: str) -> None:
        for key in [k for k in self.left if k.startswith(src_prefix)]:
            dst = dst_prefix + key[len(src_prefix):]
            if dst in self.out:
                raise ValueError(f"{self.where}: two source tensors map to '{dst}'")
            self.out[dst] = self.take(key)

    def finish(self) -> dict:
        if self.left:
            names = sorted(self.left)
            shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
            raise ValueError(f"{self.where}: source tensors with no place in the dcgen model: [{shown}]")
        return self.out


def _shape(sd: dict, key: str, where: str, ndim: int | None = None) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"{where}: no tensor '{key}'; is this the right --format?")
    shape = tuple(sd[key].shape)
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{where}: '{key}' has shape {shape}, expected {ndim} dimensions")
    return shape


def _count_indexed(sd: dict, prefix: str, where: str) -> int:
    """Number of `prefix{N}.` sub-modules; they must be numbered 0..N-1."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = sorted({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})
    if idx != list(range(len(idx))):
        raise ValueError(f"{where}: '{prefix}N' modules are not numbered 0..N-1: {idx}")
    return len(idx)


def _check_pos_embed(pos: torch.Tensor, grid: tuple[int, ...], dim: int, where: str) -> None:
    table = G.sincos_pos_embed(grid, dim)  # (L, D), what our model adds instead
    src = pos.detach().float().reshape(-1, dim)
    if src.shape != table.shape:
        raise ValueError(f"{where}: pos_embed has {src.shape[0]} rows, the {grid} grid has {table.shape[0]}")
    # a half-precision checkpoint cannot hold the table closer than its own rounding
    tol = max(1e-6, torch.finfo(pos.dtype).eps if pos.dtype.is_floating_point else 0.0)
    err = (src - table).abs().max().item()
    if not err <= tol:
        raise ValueError(f"{where}: pos_embed differs from the sin-cos table by {err:.3g} (> {tol:.1g}); "
                         "a learned or differently laid out position embedding cannot be dropped")


def _grid_from_pos(sd: dict, where: str) -> tuple[int, int]:
    L = sd["pos_embed"].shape[-2]
    g = math.isqrt(L)
    if g * g != L:
        raise ValueError(f"{where}: pos_embed has {L} positions, not a square grid; pass input_size")
    return g, g


def expected_shapes(kwargs: dict) -> dict:
    """Key -> shape of the model `kwargs` describe, built on the meta device (no memory; the
    first meta build in a process pays a one-off import of torch's reference kernels)."""
    with torch.device("meta"):
        model = build(kwargs)
    return {k: v.shape for k, v in model.state_dict().items()}


def _build(kwargs: dict, sd: dict, where: str, renames=()) -> nn.Module:
    model = build(kwargs)

    def label(key):  # name the source tensor too, which is what the user can look up
        for src, dst in renames:
            if key.startswith(dst) and src != dst:
                return f"{key} (source {src + key[len(dst):]})"
        return key
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, sd, where, label)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _heads(D: int, num_heads, from_config, where: str) -> int:
    heads = num_heads or from_config or DIT_HEADS.get(D)
    if heads is None:
        raise ValueError(f"{where}: hidden size {D} is not a published size and the checkpoint "
                         "does not record the head count; pass num_heads (--num-heads)")
    heads = int(heads)
    if D % heads:
        raise ValueError(f"{where}: hidden size {D} is not divisible by {heads} heads")
    return heads


def _mlp_ratio(sd: dict, key: str, D: int, where: str) -> float:
    hidden = _shape(sd, key, where, 2)[0]
    ratio = hidden / D
    if int(D * ratio) != hidden:
        raise ValueError(f"{where}: MLP width {hidden} is not expressible as int({D} * ratio)")
    return ratio


def _learn_sigma(out: int, per_token: int, C: int, where: str) -> bool:
    if out == per_token * 2 * C:
        return True
    if out == per_token * C:
        return False
    raise ValueError(f"{where}: final layer emits {out} values per token, expected "
                     f"{per_token * C} or {per_token * 2 * C} for {C} channels")


def _num_classes(sd: dict, key: str, known, where: str) -> int:
    if key not in sd:
        return 0
    rows = sd[key].shape[0]
    if known is not None and int(known) == rows:
        raise ValueError(f"{where}: the label table has {rows} rows for {known} classes, i.e. no "
                         "null row (trained without label dropout); dcgen needs the null row")
    return rows - 1


def _select(obj, use: str | None, where: str):
    """(state dict, which) from a plain state dict or a {model, ema, ...} checkpoint."""
    if _is_state_dict(obj):
        return obj, "state_dict"
    if isinstance(obj, dict) and ("ema" in obj or "model" in obj):
        which = use or ("ema" if "ema" in obj else "model")
        if which not in obj:
            raise ValueError(f"{where}: no '{which}' weights (top-level keys: {sorted(map(str, obj))})")
        if not _is_state_dict(obj[which]):
            raise ValueError(f"{where}: '{which}' is not a state dict of tensors")
        return obj[which], which
    keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{where}: neither a state dict nor a {{model, ema}} checkpoint ({keys})")


# --------------------------------------------------------------------------------------------
# facebookresearch/DiT
# --------------------------------------------------------------------------------------------

def map_dit_state(sd: dict, where: str = "checkpoint", num_heads: int | None = None,
                  input_size=None, num_classes_hint=None) -> tuple[dict, dict]:
    """(DiT constructor kwargs, state dict in our names) from an original DiT state dict. Every
    source tensor is placed once; the model check happens when the model is built."""
    sd = strip_prefixes(sd, where)
    D, C, ph, pw = _shape(sd, "x_embedder.proj.weight", where, 4)
    depth = _count_indexed(sd, "blocks.", where)
    if depth == 0:
        raise ValueError(f"{where}: no 'blocks.N' tensors")
    heads = _heads(D, num_heads, None, where)
    out = _shape(sd, "final_layer.linear.weight", where, 2)[0]
    if "pos_embed" in sd:
        gh, gw = _grid_from_pos(sd, where)
        size = [gh * ph, gw * pw]
    elif input_size is not None:
        size = [int(s) for s in input_size]
    else:
        raise ValueError(f"{where}: no pos_embed to read the input size from; pass input_size")
    kwargs = dict(input_size=size, in_channels=C,
                  num_classes=_num_classes(sd, "y_embedder.embedding_table.weight", num_classes_hint, where),
                  hidden_size=D, depth=depth, num_heads=heads,
                  mlp_ratio=_mlp_ratio(sd, "blocks.0.mlp.fc1.weight", D, where),
                  patch_size=ph if ph == pw else [ph, pw],
                  learn_sigma=_learn_sigma(out, ph * pw, C, where))

    r = _Renamer(sd, where)
    if "pos_embed" in sd:
        _check_pos_embed(r.take("pos_embed"), (size[0] // ph, size[1] // pw), D, where)
    for prefix in ("x_embedder.", "t_embedder.", "y_embedder.", "blocks.", "final_layer."):
        r.move(prefix, prefix)  # our DiT keeps the original module names
    return kwargs, r.finish()


def convert_dit(path, use: str | None = None, num_heads: int | None = None, input_size=None,
                cfg_channels: str = "legacy3"):
    """Convert a facebookresearch/DiT checkpoint; returns (model, extra) for `export_model`.

    Published DiT numbers use guidance on 3 channels (Q5, D18), hence `cfg_channels=legacy3`."""
    path = Path(path)
    obj = load_dit_checkpoint(path)
    sd, which = _select(obj, use, str(path))
    args = obj.get("args") if isinstance(obj, dict) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else None
    hint = args.get("num_classes") if args else None
    kwargs, mapped = map_dit_state(sd, str(path), num_heads, input_size, hint)
    model = _build({"_target_": "dcgen.models.DiT", **kwargs}, mapped, str(path))
    source = {"format": "dit", "file": str(path.resolve()), "sha256": _sha256(path), "weights": which}
    if args:
        source["args"] = plain(args)
    return model, {"sample": {"cfg_channels": cfg_channels}, "source": source}


# --------------------------------------------------------------------------------------------
# AMD-AGI/DynamicChunkingDiT ([R])
# --------------------------------------------------------------------------------------------

_R_BLOCKS = "hnet.main_network.main_network.layers."
# [R] names -> ours; embedders and the final layer keep their names
_R_RENAMES = (
    ("hnet.encoder.", "encoder."),
    ("hnet.decoder.", "decoder."),
    ("hnet.residual_proj.", "residual_proj."),
    ("hnet.routing_module.", "router."),
    (_R_BLOCKS, "blocks."),
    ("hnet.main_network.main_network.rmsnorm.", "backbone_norm."),
    ("x_embedder.", "x_embedder."),
    ("t_embedder.", "t_embedder."),
    ("y_embedder.", "y_embedder."),
    ("final_layer.", "final_layer."),
)


def config_value(cfg, names: tuple[str, ...]):
    """First attribute named in `names`, breadth-first through a placeholder tree (None if none)."""
    stack, seen = [cfg], set()
    while stack:
        node = stack.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, ConfigPlaceholder):
            attrs = node.__dict__
        elif isinstance(node, dict):
            attrs = node
        else:
            continue
        for n in names:
            if n in attrs and attrs[n] is not None:
                return attrs[n]
        stack.extend(v for v in attrs.values() if isinstance(v, (ConfigPlaceholder, dict)))
    return None


def _last(v):
    # per-stage lists in HNetConfig; the innermost stage runs the DiT blocks
    return v[-1] if isinstance(v, (list, tuple)) and v else v


def map_amd_dcdit_state(ckpt: dict, use: str = "ema", where: str = "checkpoint",
                        num_heads: int | None = None, dechunk_sigma=None,
                        input_size=None) -> tuple[dict, dict, dict]:
    """(DCDiT kwargs, state dict in our names, info) from a loaded [R] checkpoint. Every source
    tensor is placed once; compare with `expected_shapes(kwargs)` or build the model to check."""
    if use not in ("ema", "model"):
        raise ValueError(f"use must be 'ema' or 'model', got {use!r}")
    cfg = ckpt.get("config") if isinstance(ckpt, dict) else None
    sd, which = _select(ckpt, use, where)
    sd = strip_prefixes(sd, where)

    De, C, kh, kw = _shape(sd, "x_embedder.proj.weight", where, 4)
    if (kh, kw) != (3, 3):
        raise ValueError(f"{where}: x_embedder kernel {(kh, kw)}; [R] uses 3x3 at patch size 1")
    D = _shape(sd, "t_embedder.mlp.2.weight", where, 2)[0]
    Dr = _shape(sd, "hnet.routing_module.proj.weight", where, 4)[0]
    k_enc = _shape(sd, "hnet.encoder.layers.0.conv1.weight", where, 4)[2:]
    k_rt = _shape(sd, "hnet.routing_module.context_predictor.weight", where, 4)[2:]
    depth = _count_indexed(sd, _R_BLOCKS, where)
    if depth == 0:
        raise ValueError(f"{where}: no '{_R_BLOCKS}N' tensors")
    heads = _heads(D, num_heads, _last(config_value(cfg, ("num_heads", "n_heads"))), where)
    out = _shape(sd, "final_layer.linear.weight", where, 2)[0]
    if "pos_embed" in sd:
        grid = _grid_from_pos(sd, where)
    elif input_size is not None:
        grid = tuple(int(s) for s in input_size)
    elif config_value(cfg, ("image_size",)) is not None:
        s = int(config_value(cfg, ("image_size",))) // 8  # [R] trains on SD-VAE latents
        grid = (s, s)
    else:
        raise ValueError(f"{where}: no pos_embed or config image_size to read the grid from; pass input_size")
    sigma = dechunk_sigma if dechunk_sigma is not None else \
        config_value(cfg, ("dechunk_sigma", "dechunk_kernel_sigma"))
    kernel = k_enc[0] if len(set(k_enc)) == 1 else list(k_enc)
    rkernel = k_rt[0] if len(set(k_rt)) == 1 else list(k_rt)
    kwargs = dict(
        input_size=list(grid), in_channels=C,
        num_classes=_num_classes(sd, "y_embedder.embedding_table.weight",
                                 config_value(cfg, ("num_classes",)), where),
        hidden_size=D, depth=depth, num_heads=heads,
        mlp_ratio=_mlp_ratio(sd, _R_BLOCKS + "0.mlp.fc1.weight", D, where),
        patch_size=1, patch_mode="overlap", encoder_dim=De, router_dim=Dr,
        encoder_depth=_count_indexed(sd, "hnet.encoder.layers.", where),
        decoder_depth=_count_indexed(sd, "hnet.decoder.layers.", where),
        conv_kernel=kernel, router_kernel=None if rkernel == kernel else rkernel,
        # [R] smooths with its configured sigma (default 1.0) at every resolution, unlike our
        # grid-dependent default, so it is always written out
        dechunk_sigma=float(sigma) if sigma is not None else REFERENCE_SIGMA,
        learn_sigma=_learn_sigma(out, 1, C, where),
        **REFERENCE_COMPAT)

    r = _Renamer(sd, where)
    if "pos_embed" in sd:
        _check_pos_embed(r.take("pos_embed"), grid, D, where)
    for src, dst in _R_RENAMES:
        r.move(src, dst)
    mapped = r.finish()
    info = {"weights": which,
            "reference_config": cfg.to_dict() if isinstance(cfg, ConfigPlaceholder) else None}
    return kwargs, mapped, info


def convert_amd_dcdit(path, use: str = "ema", num_heads: int | None = None, dechunk_sigma=None,
                      input_size=None, cfg_channels: str = "all"):
    """Convert an [R] checkpoint with the `compat=reference` flags; returns (model, extra).

    Note: [R]'s own forward_with_cfg guides 3 channels (Q5); pass cfg_channels='legacy3' to
    reproduce its guided samples exactly."""
    path = Path(path)
    ckpt = load_reference_checkpoint(path)
    kwargs, mapped, info = map_amd_dcdit_state(ckpt, use, str(path), num_heads, dechunk_sigma, input_size)
    model = _build({"_target_": "dcgen.models.DCDiT", **kwargs}, mapped, str(path), _R_RENAMES)
    source = {"format": "amd-dcdit", "file": str(path.resolve()), "sha256": _sha256(path),
              "compat": "reference", **info}
    return model, {"sample": {"cfg_channels": cfg_channels}, "source": source}


__all__ = ["convert_dit", "convert_amd_dcdit", "map_dit_state", "map_amd_dcdit_state",
           "load_dit_checkpoint", "load_reference_checkpoint", "RestrictedUnpickler",
           "ConfigPlaceholder", "restricted_pickle", "config_value", "strip_prefixes",
           "expected_shapes"]


def convert_command(cfg):
    """`dcgen convert format=dit|amd-dcdit input=... out_dir=...`: the checkpoint as a dcgen export
    (config.json + model.safetensors + dcgen.json); then `dcgen sample run_dir=<out_dir>`."""
    from ..io import export_model
    from ..validate import ConfigError
    size = list(cfg.input_size) if cfg.input_size is not None else None
    try:
        if cfg.format == "dit":
            model, extra = convert_dit(cfg.input, use=cfg.use, num_heads=cfg.num_heads, input_size=size,
                                       cfg_channels=cfg.cfg_channels or "legacy3")
        else:
            model, extra = convert_amd_dcdit(cfg.input, use=cfg.use or "ema", num_heads=cfg.num_heads,
                                             dechunk_sigma=cfg.dechunk_sigma, input_size=size,
                                             cfg_channels=cfg.cfg_channels or "all")
    except FileNotFoundError as e:
        raise ConfigError(f"input={cfg.input}: {e}") from None
    out = export_model(model, cfg.out_dir, extra)
    n = sum(p.numel() for p in model.parameters())
    c = model.config
    print(f"wrote {out}: {type(model).__name__} D={c['hidden_size']} depth={c['depth']} "
          f"heads={c['num_heads']} input={c['input_size']} classes={c['num_classes']} "
          f"({n / 1e6:.2f}M parameters, weights: {extra['source']['weights']})")
    return out

