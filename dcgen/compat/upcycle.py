"""Upcycling a pretrained DiT into a DC-DiT (METHOD §9.1, D26-D28).

- `load_dit_teacher(source)`: the frozen teacher as a dcgen DiT, from an original
  facebookresearch/DiT `.pt`, a dcgen export directory, or a diffusers `DiTTransformer2DModel`
  (a directory, a pipeline directory with `transformer/`, or a hub id such as
  `facebook/DiT-XL-2-256`).
- `init_from_dit(dcdit, teacher)`: copy every DiT block (attention, MLP, adaLN) and the t and y
  embedders into a DC-DiT of the same width, heads and depth; freeze the embedders. Everything
  else (P = 1 patch embed, encoder, router, residual projection, decoder, final layer, backbone
  RMSNorm, the LayerNorm adaptor on c) stays new. Build the DC-DiT with `cond_adaptor=True` and
  `pe_coord_scale=0.5` (the teacher's P = 2 frequency range on the P = 1 grid).
- `distill_terms(...)`: the warm-up loss, MSE between the student's and the teacher's full output
  (ε and v channels) on the same (x_t, t, y) (D27).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger("dcgen.upcycle")


# --------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------

def _diffusers_dir(p: Path) -> Path | None:
    """The directory holding a DiTTransformer2DModel config: p itself or p/transformer."""
    for d in (p, p / "transformer"):
        cfg = d / "config.json"
        if cfg.is_file():
            try:
                if json.loads(cfg.read_text()).get("_class_name") == "DiTTransformer2DModel":
                    return d
            except json.JSONDecodeError:
                return None
    return None


def map_diffusers_dit_state(sd: dict, config: dict, where: str = "diffusers DiT") -> tuple[dict, dict]:
    """(dcgen DiT kwargs, state dict in dcgen names) from a diffusers DiTTransformer2DModel.

    diffusers keeps one copy of the timestep/label embedder per block (all equal after its own
    conversion from the original DiT); they must agree, since a DiT has one."""
    from ..io import listing
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise ValueError(f"{where}: norm_type {config.get('norm_type')!r} is not a class-conditional "
                         "DiT (ada_norm_zero)")
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    D, depth, p = heads * head_dim, int(config["num_layers"]), int(config["patch_size"])
    C = int(config["in_channels"])
    out = int(config.get("out_channels") or C)
    if out not in (C, 2 * C):
        raise ValueError(f"{where}: out_channels {out} is neither in_channels {C} nor twice it")
    size = int(config["sample_size"])
    ncls = int(config["num_embeds_ada_norm"])
    fc1 = sd["transformer_blocks.0.ff.net.0.proj.weight"]
    kwargs = dict(input_size=[size, size], in_channels=C, num_classes=ncls, hidden_size=D, depth=depth,
                  num_heads=heads, mlp_ratio=fc1.shape[0] / D, patch_size=p, learn_sigma=out == 2 * C)
    used, mapped = set(), {}

    def take(src):
        if src not in sd:
            raise ValueError(f"{where}: missing tensor '{src}'")
        used.add(src)
        return sd[src]

    def move(dst, src):
        for leaf in ("weight", "bias"):
            if f"{src}.{leaf}" in sd:
                mapped[f"{dst}.{leaf}"] = take(f"{src}.{leaf}")

    move("x_embedder.proj", "pos_embed.proj")
    emb = "transformer_blocks.{i}.norm1.emb"
    move("t_embedder.mlp.0", emb.format(i=0) + ".timestep_embedder.linear_1")
    move("t_embedder.mlp.2", emb.format(i=0) + ".timestep_embedder.linear_2")
    mapped["y_embedder.embedding_table.weight"] = take(emb.format(i=0) + ".class_embedder.embedding_table.weight")
    for i in range(depth):
        b, s = f"blocks.{i}", f"transformer_blocks.{i}"
        if i > 0:  # the per-block embedder copies must equal block 0's
            for k in [k for k in sd if k.startswith(emb.format(i=i) + ".")]:
                ref = k.replace(emb.format(i=i), emb.format(i=0), 1)
                if ref not in sd or not torch.equal(sd[k], sd[ref]):
                    raise ValueError(f"{where}: block {i}'s embedder differs from block 0's ({k}); a "
                                     "DiT has a single timestep/label embedder")
                used.add(k)
        for leaf in ("weight", "bias"):
            mapped[f"{b}.attn.qkv.{leaf}"] = torch.cat([take(f"{s}.attn1.to_{n}.{leaf}") for n in "qkv"])
        move(f"{b}.attn.proj", f"{s}.attn1.to_out.0")
        move(f"{b}.mlp.fc1", f"{s}.ff.net.0.proj")
        move(f"{b}.mlp.fc2", f"{s}.ff.net.2")
        move(f"{b}.adaLN_modulation.1", f"{s}.norm1.linear")
    move("final_layer.adaLN_modulation.1", "proj_out_1")  # rows [shift | scale], as DiT
    move("final_layer.linear", "proj_out_2")
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"{where}: tensors with no place in a DiT: {listing(left)}")
    return kwargs, mapped


def _load_diffusers_dit(source: str, where: str):
    from diffusers import DiTTransformer2DModel

    from ..io import check_state_dict
    from ..models import build
    p = Path(source).expanduser()
    try:
        if p.is_dir():
            d = _diffusers_dir(p)
            hf = DiTTransformer2DModel.from_pretrained(str(d))
        else:  # a hub id: the pipeline repos (facebook/DiT-XL-2-256) keep it in transformer/
            try:
                hf = DiTTransformer2DModel.from_pretrained(source, subfolder="transformer")
            except (OSError, ValueError, EnvironmentError):
                hf = DiTTransformer2DModel.from_pretrained(source)
    except Exception as e:  # no network, no such repo, wrong format
        raise ValueError(f"{where}: cannot load a diffusers DiTTransformer2DModel "
                         f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    kwargs, mapped = map_diffusers_dit_state(hf.state_dict(), dict(hf.config), where)
    model = build({"_target_": "dcgen.models.DiT", **kwargs})
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, mapped, where)
    model.load_state_dict(mapped, strict=True)
    return model


def load_dit_teacher(source, device="cpu", num_heads: int | None = None):
    """The teacher as a frozen dcgen DiT in eval mode on `device` (see the module docstring)."""
    from .convert import convert_dit
    from ..io import load_model
    from ..models import DiT
    where = f"init.from_dit={source}"
    p = Path(str(source)).expanduser()
    if p.is_file() and p.suffix not in (".safetensors", ".yaml", ".json"):
        model, _ = convert_dit(p, num_heads=num_heads)
    elif p.is_dir() and _diffusers_dir(p) is not None:
        model = _load_diffusers_dit(str(p), where)
    elif p.exists():
        model = load_model(p)  # a dcgen export or a run directory (its EMA weights)
    elif str(source).count("/") == 1 and not str(source).startswith((".", "/", "~")) \
            and p.suffix not in (".pt", ".pth", ".ckpt", ".bin", ".safetensors"):
        model = _load_diffusers_dit(str(source), where)
    else:
        raise FileNotFoundError(f"{where}: no such file or directory (nor a hub id 'owner/name')")
    if not isinstance(model, DiT):
        raise ValueError(f"{where}: the teacher must be a DiT, got a {type(model).__name__}")
    return model.to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


def init_from_dit(model: nn.Module, teacher: nn.Module, freeze_embedders: bool = True) -> dict:
    """Copy the teacher's DiT blocks and t/y embedders into `model` (a DC-DiT) in place.
    Raises ValueError naming the first dimension that differs. Returns a small report."""
    from ..models import DCDiT, DiT
    from ..models import unwrap
    model, teacher = unwrap(model), unwrap(teacher)
    if not isinstance(model, DCDiT):
        raise ValueError(f"init.from_dit upcycles into a DC-DiT; the model is a {type(model).__name__}")
    if not isinstance(teacher, DiT):
        raise ValueError(f"init.from_dit: the teacher must be a DiT, got a {type(teacher).__name__}")
    s_cfg, t_cfg = model.config, teacher.config
    for key in ("hidden_size", "depth", "num_heads", "num_classes"):
        if s_cfg[key] != t_cfg[key]:
            raise ValueError(f"init.from_dit: teacher {key}={t_cfg[key]} but model.{key}={s_cfg[key]} "
                             "(upcycling needs the same width, heads, depth and classes)")
    if model.blocks[0].mlp.fc1.out_features != teacher.blocks[0].mlp.fc1.out_features:
        raise ValueError(f"init.from_dit: teacher mlp_ratio={t_cfg['mlp_ratio']} but "
                         f"model.mlp_ratio={s_cfg['mlp_ratio']}")
    pairs = [(f"blocks.{i}", model.blocks[i], teacher.blocks[i]) for i in range(len(model.blocks))]
    pairs.append(("t_embedder", model.t_embedder, teacher.t_embedder))
    if model.y_embedder is not None:
        pairs.append(("y_embedder", model.y_embedder, teacher.y_embedder))
    tensors = params = 0
    with torch.no_grad():
        for name, dst, src in pairs:
            sd = src.state_dict()
            dst.load_state_dict(sd, strict=True)
            tensors += len(sd)
            params += sum(v.numel() for v in sd.values())
    frozen = []
    if freeze_embedders:
        for name, mod in (("t_embedder", model.t_embedder), ("y_embedder", model.y_embedder)):
            if mod is not None:
                mod.requires_grad_(False)
                frozen.append(name)
    if model.cond_adaptor is None:
        log.warning("upcycling without model.cond_adaptor: the new modules read the teacher's raw "
                    "conditioning (METHOD §9.1 adds a trainable LayerNorm adaptor)")
    if float(s_cfg.get("pe_coord_scale", 1.0)) != 0.5:
        log.warning("upcycling with model.pe_coord_scale=%s (METHOD §9.1 uses 0.5 for a P=2 teacher)",
                    s_cfg.get("pe_coord_scale"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"blocks": len(model.blocks), "tensors_copied": tensors, "params_copied": params,
            "frozen": frozen, "trainable_params": trainable,
            "new_params": sum(p.numel() for p in model.parameters()) - params,
            "teacher_patch": list(teacher.patch), "cond_adaptor": model.cond_adaptor is not None,
            "pe_coord_scale": float(s_cfg.get("pe_coord_scale", 1.0))}


# --------------------------------------------------------------------------------------------
# Distillation warm-up
# --------------------------------------------------------------------------------------------

def distill_terms(objective, student, teacher, x0: torch.Tensor, y=None, t=None, noise=None,
                  tail_drop=0.0, generator=None):
    """({"loss", "mse"} per sample, student aux): MSE between the student's and the frozen
    teacher's full output on the same x_t, t, y; "mse" is the ε-channel part alone.

    Gaussian objective: t integer timesteps, x_t = q_sample(x0, t, noise). Flow matching: t is the
    flow time s in [0, 1], x_s = interpolate(x0, s, noise). Missing t / noise are drawn from
    `generator`. The student runs at `tail_drop` (multi-budget warm-up); the teacher keeps every
    token."""
    from ..diffusion.objective import check_objective
    from ..rng import host_to_device, randn
    check_objective(objective, "distillation")
    B, C = x0.shape[0], x0.shape[1]
    if noise is None:
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
    if t is None:
        t = objective.draw_timesteps(B, generator, shape=tuple(x0.shape))
    t = host_to_device(torch.as_tensor(t), x0.device)
    t = t.to(x0.dtype) if t.is_floating_point() else t.long()  # flow times / integer steps
    x_t = objective.noised(x0, t, noise)
    t_model = objective.model_timesteps(t)
    out, aux = student(x_t, t_model, y, tail_drop=tail_drop)  # (B, 2C|C, *G)
    with torch.no_grad():
        target, _ = teacher(x_t, t_model, y)
    if target.shape != out.shape:
        raise ValueError(f"distillation: teacher output {tuple(target.shape)} != student output "
                         f"{tuple(out.shape)} (learn_sigma must match)")
    err = (out.float() - target.float()) ** 2
    loss = err.flatten(1).mean(1)
    mse = err[:, :C].flatten(1).mean(1)
    return {"loss": loss, "mse": mse}, aux


__all__ = ["load_dit_teacher", "init_from_dit", "distill_terms", "map_diffusers_dit_state"]
