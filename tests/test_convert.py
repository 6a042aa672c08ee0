"""Checkpoint export/load (dcgen.io) and import of foreign checkpoints (dcgen.compat.convert).

The foreign layouts are generated here from their own descriptions (facebookresearch/DiT's
module list; METHOD §11's parameter table of [R]), independent of dcgen's module names.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from dcgen.compat.convert import (ConfigPlaceholder, convert_amd_dcdit, convert_dit, load_reference_checkpoint,
                           map_amd_dcdit_state)
from dcgen.io import export_model, load_model, read_export_config
from dcgen.models import build

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# foreign layouts
# --------------------------------------------------------------------------------------------

def mae_pos_table(D: int, g: int) -> np.ndarray:
    """The MAE/DiT 2D sin-cos table: first half encodes the column, second half the row."""
    def one_axis(w, pos):
        omega = 1.0 / 10000 ** (np.arange(w // 2, dtype=np.float64) / (w / 2))
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    cols, rows = np.meshgrid(np.arange(g), np.arange(g))  # 'xy': cols varies along axis 1
    return np.concatenate([one_axis(D // 2, cols), one_axis(D // 2, rows)], axis=1).astype(np.float32)


def _linear(out, inp, name):
    return {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}


def dit_layout(D, depth, C=4, p=2, num_classes=1000, learn_sigma=True) -> OrderedDict:
    """facebookresearch/DiT models.py state dict (pos_embed aside)."""
    lay = OrderedDict({"x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,)})
    lay.update(_linear(D, 256, "t_embedder.mlp.0"))
    lay.update(_linear(D, D, "t_embedder.mlp.2"))
    lay["y_embedder.embedding_table.weight"] = (num_classes + 1, D)
    for i in range(depth):
        b = f"blocks.{i}"
        lay.update(_linear(3 * D, D, f"{b}.attn.qkv"))
        lay.update(_linear(D, D, f"{b}.attn.proj"))
        lay.update(_linear(4 * D, D, f"{b}.mlp.fc1"))
        lay.update(_linear(D, 4 * D, f"{b}.mlp.fc2"))
        lay.update(_linear(6 * D, D, f"{b}.adaLN_modulation.1"))
    lay.update(_linear(p * p * C * (2 if learn_sigma else 1), D, "final_layer.linear"))
    lay.update(_linear(2 * D, D, "final_layer.adaLN_modulation.1"))
    return lay


def reference_layout(D, De, depth, C=4, num_classes=1000, g=32, learn_sigma=True) -> OrderedDict:
    """[R]'s DCDiT state dict, from the table in METHOD §11 (D_r = D_e)."""
    Dr = De
    lay = OrderedDict({"pos_embed": (1, g * g, D),
                       "x_embedder.proj.weight": (De, C, 3, 3), "x_embedder.proj.bias": (De,)})
    lay.update(_linear(D, 256, "t_embedder.mlp.0"))
    lay.update(_linear(D, D, "t_embedder.mlp.2"))
    lay["y_embedder.embedding_table.weight"] = (num_classes + 1, D)

    def conv_block(name, cin, cout):
        cmid = min(cin, cout)
        lay.update({f"{name}.norm1.weight": (cin,), f"{name}.norm1.bias": (cin,),
                    f"{name}.conv1.weight": (cmid, cin, 3, 3), f"{name}.conv1.bias": (cmid,)})
        lay.update(_linear(cmid, D, f"{name}.cond_proj.1"))
        lay.update({f"{name}.norm2.weight": (cmid,), f"{name}.norm2.bias": (cmid,),
                    f"{name}.conv2.weight": (cout, cmid, 3, 3), f"{name}.conv2.bias": (cout,)})
        if cin != cout:
            lay.update({f"{name}.skip_proj.weight": (cout, cin, 1, 1), f"{name}.skip_proj.bias": (cout,)})

    conv_block("hnet.encoder.layers.0", De, De)
    conv_block("hnet.encoder.layers.1", De, D)
    lay["hnet.encoder.rmsnorm.weight"] = (D,)
    lay.update(_linear(D, D, "hnet.residual_proj"))
    r = "hnet.routing_module"
    lay.update({f"{r}.proj.weight": (Dr, D, 1, 1), f"{r}.proj.bias": (Dr,),
                f"{r}.context_predictor.weight": (Dr, Dr, 3, 3), f"{r}.context_predictor.bias": (Dr,),
                f"{r}.residual_scorer.0.weight": (Dr, Dr, 3, 3), f"{r}.residual_scorer.0.bias": (Dr,),
                f"{r}.residual_scorer.1.weight": (Dr,), f"{r}.residual_scorer.1.bias": (Dr,),
                f"{r}.residual_scorer.3.weight": (1, Dr, 1, 1), f"{r}.residual_scorer.3.bias": (1,)})
    for i in range(depth):
        b = f"hnet.main_network.main_network.layers.{i}"
        lay.update(_linear(3 * D, D, f"{b}.attn.qkv"))
        lay.update(_linear(D, D, f"{b}.attn.proj"))
        lay.update(_linear(4 * D, D, f"{b}.mlp.fc1"))
        lay.update(_linear(D, 4 * D, f"{b}.mlp.fc2"))
        lay.update(_linear(6 * D, D, f"{b}.adaLN_modulation.1"))
    lay["hnet.main_network.main_network.rmsnorm.weight"] = (D,)
    conv_block("hnet.decoder.layers.0", D, De)
    conv_block("hnet.decoder.layers.1", De, De)
    lay["hnet.decoder.rmsnorm.weight"] = (De,)
    lay.update(_linear(2 * De, D, "final_layer.adaLN_modulation.1"))
    lay.update(_linear(C * (2 if learn_sigma else 1), De, "final_layer.linear"))
    return lay


def random_state(layout, seed=0, std=0.05, pos_table=None, cheap=False) -> OrderedDict:
    """Small random values (norm weights near 1); `cheap` fills each tensor with one value
    through a stride-0 view, so real-size layouts cost no memory (torch.save keeps the view)."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    for i, (k, shape) in enumerate(layout.items()):
        if k == "pos_embed":
            sd[k] = torch.from_numpy(pos_table).reshape(shape)
            continue
        base = 1.0 if ("norm" in k and k.endswith("weight")) else 0.0
        if cheap:
            sd[k] = torch.full((1,), base + 1e-3 * (i + 1)).expand(shape)
        else:
            sd[k] = base + std * torch.randn(shape, generator=g)
    return sd


CONFIG_MODULE_SRC = '''
from dataclasses import dataclass, field

@dataclass
class HNetConfig:
    arch_layout: list = field(default_factory=lambda: ["c2", ["D2"], "c2"])
    d_model: list = field(default_factory=lambda: [128, 128])
    num_heads: list = field(default_factory=lambda: [4, 4])
    enc_dec_dim_factor: list = field(default_factory=lambda: [4, None])
    dechunk_kernel_sigma: float = 1.5
    fp32_router_dechunk: bool = True

@dataclass
class ModelConfig:
    name: str = "DC-DiT"
    hnet: HNetConfig = field(default_factory=HNetConfig)
    mlp_ratio: float = 4.0

@dataclass
class TrainingConfig:
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True

@dataclass
class DataConfig:
    image_size: int = 128
    num_classes: int = 10

@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ckpt: str = None
'''


@contextmanager
def throwaway_config_module():
    """A module named `config` (as in [R]) that exists only while the checkpoint is saved."""
    old = sys.modules.get("config")
    mod = types.ModuleType("config")
    sys.modules["config"] = mod
    try:
        exec(CONFIG_MODULE_SRC, mod.__dict__)
        yield mod
    finally:
        if old is None:
            sys.modules.pop("config", None)
        else:
            sys.modules["config"] = old


def adamw_state(n=3):
    params = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(n)]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sum(p.sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


def save_reference_ckpt(path, ema, model=None, with_config=True, **cfg_overrides):
    ckpt = {"model": {f"_orig_mod.module.{k}": v for k, v in (model or ema).items()},
            "ema": {f"module.{k}": v for k, v in ema.items()},
            "opt": adamw_state()}
    if with_config:
        with throwaway_config_module() as config:
            cfg = config.Config()
            for k, v in cfg_overrides.items():
                setattr(cfg.model.hnet, k, v)
            ckpt["config"] = cfg
            torch.save(ckpt, path)
        assert "config" not in sys.modules or not hasattr(sys.modules["config"], "HNetConfig")
    else:
        torch.save(ckpt, path)
    return path


TINY = dict(D=128, De=32, depth=2, C=4, num_classes=10, g=16)


def tiny_reference_state(seed=0):
    lay = reference_layout(**TINY)
    return random_state(lay, seed=seed, pos_table=mae_pos_table(TINY["D"], TINY["g"]))


def perturb(model, seed=0, std=0.05):
    """Non-zero everywhere, so zero-initialised layers do not hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def run(model, seed=0, B=2, tail_drop=0.0):
    g = torch.Generator().manual_seed(seed)
    size = model.config["input_size"]
    x = torch.randn(B, model.in_channels, *size, generator=g)
    t = torch.tensor([10, 700][:B])
    y = torch.tensor([1, model.num_classes][:B])  # one real label, one null label
    with torch.no_grad():
        return model(x, t, y, tail_drop=tail_drop)[0]


# --------------------------------------------------------------------------------------------
# facebookresearch/DiT
# --------------------------------------------------------------------------------------------

def dit_reference_forward(sd, x, t, y, heads):
    """The original DiT forward written out functionally on the source state dict."""
    w = sd["x_embedder.proj.weight"]
    D, C, p = w.shape[0], w.shape[1], w.shape[2]
    h = F.conv2d(x, w, sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    arg = t.float()[:, None] * freqs[None]
    temb = torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)
    lin = lambda v, n: F.linear(v, sd[f"{n}.weight"], sd[f"{n}.bias"])  # noqa: E731
    c = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    ln = lambda v: F.layer_norm(v, (D,), eps=1e-6)  # noqa: E731
    B, N, _ = h.shape
    d = D // heads
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in sd:
        b = f"blocks.{i}"
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(c), f"{b}.adaLN_modulation.1")[:, None].chunk(6, dim=-1)
        a = ln(h) * (1 + sc1) + sh1
        q, k, v = lin(a, f"{b}.attn.qkv").reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1) @ v
        h = h + g1 * lin(att.transpose(1, 2).reshape(B, N, D), f"{b}.attn.proj")
        m = ln(h) * (1 + sc2) + sh2
        h = h + g2 * lin(F.gelu(lin(m, f"{b}.mlp.fc1"), approximate="tanh"), f"{b}.mlp.fc2")
        i += 1
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1")[:, None].chunk(2, dim=-1)
    out = lin(ln(h) * (1 + scale) + shift, "final_layer.linear")
    g = int(N ** 0.5)
    co = out.shape[-1] // (p * p)
    out = out.reshape(B, g, g, p, p, co)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(B, co, g * p, g * p)


@pytest.fixture(scope="module")
def dit_s2(tmp_path_factory):
    """DiT-S/2 at 256 px (32x32 latents), real size, saved both ways DiT writes files."""
    d = tmp_path_factory.mktemp("dit")
    sd = random_state(dit_layout(384, 12), seed=1, std=0.02)
    sd["pos_embed"] = torch.from_numpy(mae_pos_table(384, 16))[None]
    plain_file = d / "DiT-S-2-256x256.pt"
    torch.save(sd, plain_file)
    # train.py layout: {model, ema, opt, args}; model differs from ema in one tensor
    model_sd = {f"module.{k}": v for k, v in sd.items()}
    model_sd["module.final_layer.linear.bias"] = torch.full_like(sd["final_layer.linear.bias"], 7.0)
    train_file = d / "0400000.pt"
    torch.save({"model": model_sd, "ema": sd, "opt": adamw_state(),
                "args": argparse.Namespace(model="DiT-S/2", num_classes=1000, image_size=256)}, train_file)
    return sd, plain_file, train_file


def test_dit_s2_converts_every_tensor_and_round_trips(dit_s2, tmp_path):
    sd, plain_file, _ = dit_s2
    model, extra = convert_dit(plain_file)
    cfg = model.config
    assert (cfg["hidden_size"], cfg["depth"], cfg["num_heads"], cfg["patch_size"]) == (384, 12, 6, 2)
    assert (cfg["input_size"], cfg["in_channels"], cfg["num_classes"], cfg["learn_sigma"]) == ([32, 32], 4, 1000, True)
    assert extra["sample"] == {"cfg_channels": "legacy3"}
    assert extra["source"]["weights"] == "state_dict"
    # every source tensor used once: same names, same values, nothing else in the model
    ours = model.state_dict()
    assert set(ours) == set(sd) - {"pos_embed"}
    for k, v in ours.items():
        assert torch.equal(v, sd[k]), k

    # one sample: a DiT-S/2 forward costs ~11 GFLOP on a CPU (the functional comparison with
    # the original forward runs on a smaller DiT below)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=g)
    t, y = torch.tensor([900]), torch.tensor([5])
    with torch.no_grad():
        out, aux = model(x, t, y)
    assert aux == [] and out.shape == (1, 8, 32, 32) and out.abs().sum() > 0

    export_model(model, tmp_path / "exp", extra)
    cfg_file = read_export_config(tmp_path / "exp")
    assert cfg_file["model"]["_target_"] == "dcgen.models.DiT" and cfg_file["sample"]["cfg_channels"] == "legacy3"
    with torch.no_grad():
        again = load_model(tmp_path / "exp")(x, t, y)[0]
    assert torch.equal(out, again)


def test_dit_train_checkpoint_prefers_ema(dit_s2):
    sd, _, train_file = dit_s2
    model, extra = convert_dit(train_file)
    assert extra["source"]["weights"] == "ema" and extra["source"]["args"]["model"] == "DiT-S/2"
    assert torch.equal(model.final_layer.linear.bias, sd["final_layer.linear.bias"])
    model, extra = convert_dit(train_file, use="model")  # module. prefixes stripped
    assert torch.equal(model.final_layer.linear.bias, torch.full((32,), 7.0))


def test_dit_small_variants_and_errors(tmp_path):
    # no learned sigma, patch 4, 2D width 256 (not a published size: heads must be given)
    lay = dit_layout(256, 2, C=3, p=4, num_classes=5, learn_sigma=False)
    sd = random_state(lay, seed=2)
    sd["pos_embed"] = torch.from_numpy(mae_pos_table(256, 8))[None]
    f = tmp_path / "small.pt"
    torch.save(sd, f)
    with pytest.raises(ValueError, match="num_heads"):
        convert_dit(f)
    model, _ = convert_dit(f, num_heads=4)
    assert (model.config["input_size"], model.config["patch_size"], model.config["learn_sigma"]) == ([32, 32], 4, False)
    # the converted model computes what the original DiT computes with these weights
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t, y = torch.tensor([3, 900]), torch.tensor([4, 5])  # 5 = the null label
    with torch.no_grad():
        out = model(x, t, y)[0]
        ref = dit_reference_forward(sd, x, t, y, heads=4)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)

    leftover = dict(sd, **{"blocks.0.attn.extra": torch.zeros(3)})
    torch.save(leftover, tmp_path / "leftover.pt")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.extra"):
        convert_dit(tmp_path / "leftover.pt", num_heads=4)

    bad_pos = dict(sd, pos_embed=sd["pos_embed"] + 1e-3)
    torch.save(bad_pos, tmp_path / "badpos.pt")
    with pytest.raises(ValueError, match="pos_embed"):
        convert_dit(tmp_path / "badpos.pt", num_heads=4)

    missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc2\.bias"):
        convert_dit(tmp_path / "missing.pt", num_heads=4)

    with pytest.raises(FileNotFoundError, match="nope.pt"):
        convert_dit(tmp_path / "nope.pt")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pt"
    torch.save({"ema": {"w": torch.zeros(1)}, "hook": _Evil(marker)}, f)
    with pytest.raises(ValueError, match=r"evil\.pt.*(posix|os|nt)\.system"):
        load_reference_checkpoint(f)
    with pytest.raises(ValueError, match="evil.pt"):
        convert_amd_dcdit(f)
    with pytest.raises(ValueError, match="evil.pt"):
        convert_dit(f)  # torch's weights_only loader refuses it too
    assert not marker.exists()

    class _Eval:
        def __reduce__(self):
            return (eval, ("1 + 1",))
    torch.save({"ema": {}, "x": _Eval()}, tmp_path / "eval.pt")
    with pytest.raises(ValueError, match=r"builtins\.eval"):
        load_reference_checkpoint(tmp_path / "eval.pt")


# --------------------------------------------------------------------------------------------
# AMD-AGI/DynamicChunkingDiT ([R])
# --------------------------------------------------------------------------------------------

def test_reference_layouts_match_method_counts():
    assert len(reference_layout(**TINY)) == 91
    assert len(reference_layout(768, 192, 12)) == 191


def test_amd_tiny_converts_every_tensor_once(tmp_path):
    ema = tiny_reference_state(seed=0)
    model_w = tiny_reference_state(seed=1)
    f = save_reference_ckpt(tmp_path / "0050000.pt", ema, model_w)
    assert "config" not in sys.modules or not hasattr(sys.modules["config"], "HNetConfig")

    ckpt = load_reference_checkpoint(f)
    cfg = ckpt["config"]
    assert isinstance(cfg, ConfigPlaceholder) and cfg._source == "config.Config"
    assert cfg.model.hnet.num_heads == [4, 4] and cfg.data.num_classes == 10
    assert set(ckpt["opt"]) == {"state", "param_groups"}
    no_pos = dict(ckpt, ema={k: v for k, v in ckpt["ema"].items() if not k.endswith("pos_embed")})
    kwargs, mapped, _ = map_amd_dcdit_state(no_pos, "ema")  # grid from config image_size / 8
    assert kwargs["input_size"] == [16, 16] and len(mapped) == 90

    model, extra = convert_amd_dcdit(f)
    c = model.config
    assert (c["hidden_size"], c["num_heads"], c["depth"], c["encoder_dim"], c["router_dim"]) == (128, 4, 2, 32, 32)
    assert (c["input_size"], c["num_classes"], c["learn_sigma"], c["dechunk_sigma"]) == ([16, 16], 10, True, 1.5)

    # a bijection by value: every source tensor (pos_embed aside) sits in exactly one of ours
    ours = model.state_dict()
    assert len(ours) == len(ema) - 1
    used = set()
    for k, v in ema.items():
        if k == "pos_embed":
            continue
        hits = [n for n, w in ours.items() if w.shape == v.shape and torch.equal(w, v)]
        assert len(hits) == 1, (k, hits)
        used.add(hits[0])
    assert used == set(ours)
    # and the semantic spots of the mapping
    R = "hnet.main_network.main_network"
    assert torch.equal(model.blocks[1].attn.qkv.weight, ema[f"{R}.layers.1.attn.qkv.weight"])
    assert torch.equal(model.backbone_norm.weight, ema[f"{R}.rmsnorm.weight"])
    assert torch.equal(model.router.residual_scorer[3].bias, ema["hnet.routing_module.residual_scorer.3.bias"])
    assert torch.equal(model.decoder.layers[0].skip_proj.weight, ema["hnet.decoder.layers.0.skip_proj.weight"])
    assert torch.equal(model.residual_proj.weight, ema["hnet.residual_proj.weight"])

    # export: compat flags of METHOD §11 compat=reference, sampling and provenance nodes
    out = export_model(model, tmp_path / "export", extra)
    written = read_export_config(out)
    m = json.loads((out / "config.json").read_text())  # the one model description (HF layout)
    assert m == written["model"] and m["_target_"] == "dcgen.models.DCDiT"
    assert (m["block_adaln_init"], m["residual_proj_init"]) == ("xavier", "xavier")
    assert m["residual_autocast"] is True and m["attn_qkv_bf16"] is True
    assert m["tail_drop_protect_forced"] is False and m["dechunk_sigma"] == 1.5
    assert written["sample"] == {"cfg_channels": "all"}
    src = written["source"]
    assert src["format"] == "amd-dcdit" and src["weights"] == "ema" and len(src["sha256"]) == 64
    assert src["reference_config"]["model"]["hnet"]["num_heads"] == [4, 4]

    loaded = load_model(out)
    a, b = run(model), run(loaded)
    assert a.shape == (2, 8, 16, 16) and torch.isfinite(a).all() and torch.equal(a, b)

    model_m, extra_m = convert_amd_dcdit(f, use="model")
    assert extra_m["source"]["weights"] == "model"
    assert torch.equal(model_m.blocks[0].mlp.fc1.weight, model_w[f"{R}.layers.0.mlp.fc1.weight"])


def test_amd_without_config_and_errors(tmp_path):
    ema = tiny_reference_state()
    f = save_reference_ckpt(tmp_path / "noconf.pt", ema, with_config=False)
    with pytest.raises(ValueError, match="num_heads"):  # 128 is no published width
        convert_amd_dcdit(f)
    model, extra = convert_amd_dcdit(f, num_heads=4)
    assert model.config["dechunk_sigma"] == 1.0 and extra["source"]["reference_config"] is None

    extra_key = OrderedDict(ema, **{"hnet.pad_dimension": torch.zeros(4)})
    save_reference_ckpt(tmp_path / "extra.pt", extra_key)
    with pytest.raises(ValueError, match=r"hnet\.pad_dimension"):
        convert_amd_dcdit(tmp_path / "extra.pt")

    wrong = OrderedDict(ema)
    wrong["hnet.routing_module.proj.weight"] = torch.zeros(32, 128, 3, 3)
    save_reference_ckpt(tmp_path / "wrong.pt", wrong)
    with pytest.raises(ValueError, match=r"router\.proj\.weight"):
        convert_amd_dcdit(tmp_path / "wrong.pt")

    flipped = OrderedDict(ema)  # rows and columns swapped: a different table
    flipped["pos_embed"] = torch.from_numpy(mae_pos_table(128, 16)[:, ::-1].copy())[None]
    save_reference_ckpt(tmp_path / "pos.pt", flipped)
    with pytest.raises(ValueError, match="pos_embed"):
        convert_amd_dcdit(tmp_path / "pos.pt")


def test_amd_b_n4_real_shapes_map_onto_meta_model(tmp_path):
    lay = reference_layout(768, 192, 12)
    ema = random_state(lay, pos_table=mae_pos_table(768, 32), cheap=True)
    f = save_reference_ckpt(tmp_path / "b.pt", ema, with_config=False)
    assert f.stat().st_size < 20e6  # stride-0 tensors: the real-size file stays small
    kwargs, mapped, info = map_amd_dcdit_state(load_reference_checkpoint(f), "ema", str(f))
    assert (kwargs["hidden_size"], kwargs["num_heads"], kwargs["depth"]) == (768, 12, 12)
    assert (kwargs["encoder_dim"], kwargs["router_dim"], kwargs["input_size"]) == (192, 192, [32, 32])
    assert kwargs["num_classes"] == 1000 and kwargs["mlp_ratio"] == 4.0
    with torch.device("meta"):
        meta = build({"_target_": "dcgen.models.DCDiT", **kwargs})
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == expected
    assert len(mapped) == 190 and info["weights"] == "ema"
    n = sum(math.prod(s) for s in expected.values())
    assert abs(n - 136.34e6) < 0.01e6  # METHOD §7.2: 136.34M trainable


def test_cli_converts_and_reports_errors(tmp_path, capsys):
    from dcgen.cli import main
    f = save_reference_ckpt(tmp_path / "r.pt", tiny_reference_state())
    rc = main(["convert", "format=amd-dcdit", f"input={f}", f"out_dir={tmp_path / 'out'}", "cfg_channels=legacy3"])
    assert rc == 0 and "DCDiT" in capsys.readouterr().out
    assert read_export_config(tmp_path / "out")["sample"]["cfg_channels"] == "legacy3"
    rc = main(["convert", "format=dit", f"input={f}", f"out_dir={tmp_path / 'out2'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "error" in err[0]  # one line, the bad-input exit code
    assert not (tmp_path / "out2").exists()
    rc = main(["convert", "format=onnx", f"input={f}", f"out_dir={tmp_path / 'out3'}"])
    assert rc == 2 and "format='onnx': expected one of dit, amd-dcdit" in capsys.readouterr().err
    # the old tool's spelling drives the same command
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "tools" / "convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--format", "amd-dcdit", "--input", str(f), "--output", str(tmp_path / "out4")]) == 0
    assert read_export_config(tmp_path / "out4")["sample"]["cfg_channels"] == "all"


# --------------------------------------------------------------------------------------------
# export / load
# --------------------------------------------------------------------------------------------

def build_node(arch, **kw):
    return build({"_target_": {"dcdit": "dcgen.models.DCDiT", "dit": "dcgen.models.DiT"}[arch], **kw})


def tiny_dcdit():
    # smaller than the parity model (conv widths stay multiples of 32): CPU time matters here
    return perturb(build_node("dcdit", input_size=(8, 8), num_classes=10, hidden_size=64, depth=1,
                               num_heads=2, encoder_dim=32), seed=3)


def tiny_dit():
    return perturb(build_node("dit", input_size=(8, 8), num_classes=10, hidden_size=64, depth=1,
                               num_heads=4, patch_size=2), seed=4)


@pytest.mark.parametrize("make", [tiny_dcdit, tiny_dit])
def test_export_load_round_trip(make, tmp_path):
    model = make()
    out = export_model(model, tmp_path / "exp", {"sample": {"cfg_channels": "all"}})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "dcgen.json", "model.safetensors"]
    loaded = load_model(out)
    assert not loaded.training and loaded.config == model.config
    assert torch.equal(run(model), run(loaded))
    if isinstance(model.config.get("encoder_dim"), int):
        assert torch.equal(run(model, tail_drop=0.3), run(loaded, tail_drop=0.3))
    assert load_model(out, dtype=torch.float64).final_layer.linear.weight.dtype == torch.float64


def test_export_replaces_atomically_and_protects_other_dirs(tmp_path):
    a, b = tiny_dit(), perturb(tiny_dit(), seed=9)
    export_model(a, tmp_path / "exp")
    export_model(b, tmp_path / "exp")
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]  # no temporaries left behind
    assert torch.equal(load_model(tmp_path / "exp").final_layer.linear.weight, b.final_layer.linear.weight)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="notes.txt"):
        export_model(a, busy)
    assert (busy / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="'model'"):
        export_model(a, tmp_path / "x", {"model": {}})


def test_load_errors_name_file_and_key(tmp_path):
    model = tiny_dcdit()
    out = export_model(model, tmp_path / "exp")
    w = out / "model.safetensors"
    sd = load_file(str(w))

    bad = dict(sd, **{"blocks.0.attn.qkv.weight": torch.zeros(10, 64)})
    save_file(bad, str(w))
    with pytest.raises(ValueError, match=r"model\.safetensors.*blocks\.0\.attn\.qkv\.weight \(10, 64\)"):
        load_model(out)
    save_file({k: v for k, v in sd.items() if k != "router.proj.bias"}, str(w))
    with pytest.raises(ValueError, match=r"missing keys \[router\.proj\.bias\]"):
        load_model(out)
    save_file(dict(sd, stray=torch.zeros(1)), str(w))
    with pytest.raises(ValueError, match=r"unexpected keys \[stray\]"):
        load_model(out)
    w.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(out)
    w.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(out)

    save_file(sd, str(w))
    (out / "config.json").write_text('{"hidden_size": 64}\n')
    with pytest.raises(ValueError, match=r"config\.json.*no model description"):
        load_model(out)
    (out / "config.json").write_text('{"_target_": "dcgen.models.DCDiT", "hidden_sise": 64}\n')
    with pytest.raises(ValueError, match=r"config\.json.*hidden_sise"):
        load_model(out)
    (out / "config.json").write_text('{"_target_": "dcgen.models.DCDiT", ')
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_model(out)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent")


def test_run_dir_with_export_loads(tmp_path):
    model = tiny_dcdit()
    run_dir = tmp_path / "runs" / "r1"
    export_model(model, run_dir / "export")
    (run_dir / "config.yaml").write_text("task: {name: toy}\n")  # the run's own config
    (run_dir / "checkpoints").mkdir()
    loaded = load_model(run_dir)
    assert torch.equal(run(model), run(loaded))
    assert read_export_config(run_dir)["model"]["_target_"] == "dcgen.models.DCDiT"
    assert read_export_config(run_dir / "export" / "config.json")["model"]["_target_"] == "dcgen.models.DCDiT"
    unfinished = tmp_path / "runs" / "r2"  # a run that has not exported yet
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("task: {name: toy}\n")
    with pytest.raises(FileNotFoundError, match=r"r2/model\.safetensors.*export/"):
        load_model(unfinished)
