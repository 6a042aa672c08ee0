"""DiT blocks (adaLN-Zero) that run on dense (B, L, D) or packed (T, D) tokens, and the plain DiT
baseline on any grid rank.

Shape legend: B batch, L tokens per sample, T packed tokens, D width, H heads, d = D / H.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin

from ..chunking import grid as G
from .attention import BucketedPack, PackInfo, bucketed_attention, varlen_attention
from .layers import FinalLayer, LabelEmbedder, PatchEmbedND, TimestepEmbedder, modulate, unpatchify



class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, backend: str = "auto", qkv_bf16: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.backend = backend
        self.qkv_bf16 = qkv_bf16  # [R] Q4: q/k/v always cast to bf16 before the kernel

    def forward(self, x: torch.Tensor, pack: PackInfo | BucketedPack | None = None) -> torch.Tensor:
        H = self.num_heads
        qkv = self.qkv(x)  # autocast dtype under autocast
        if pack is None:  # dense (B, L, D)
            B, L, D = x.shape
            q, k, v = qkv.view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, L, d) each
            dtype = q.dtype
            if self.qkv_bf16:
                q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
            o = F.scaled_dot_product_attention(q, k, v).to(dtype)
            o = o.transpose(1, 2).reshape(B, L, D)
        else:  # packed (T, D)
            T, D = x.shape
            q, k, v = qkv.view(T, 3, H, D // H).unbind(1)  # (T, H, d) each
            dtype = q.dtype
            if self.qkv_bf16:
                q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
            attend = bucketed_attention if isinstance(pack, BucketedPack) else varlen_attention
            o = attend(q, k, v, pack, self.backend).to(dtype).reshape(T, D)
        return self.proj(o)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """x += gate1 * Attn(modulate(LN(x))); x += gate2 * MLP(modulate(LN(x))).

    The six modulation vectors are computed once per sample from c and, on packed input,
    expanded to tokens through the token -> sample map (never computed per token).
    Precision: x is the residual stream and stays fp32 under autocast (its dtype is the input's);
    the branches (Linears, attention, MLP) run in the autocast dtype, their gated outputs are
    added to x with type promotion, so every residual add is fp32."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_backend="auto",
                 qkv_bf16: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_backend, qkv_bf16)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                pack: PackInfo | BucketedPack | None = None) -> torch.Tensor:
        mod = self.adaLN_modulation(c)  # (B, 6D)
        # index_select is several times faster than advanced indexing for this row gather
        mod = mod[:, None] if pack is None else torch.index_select(mod, 0, pack.batch_idx)
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1), pack)
        x = x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))
        return x

    def modulated_input(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """modulate(LN(x), shift1, scale1) of dense (B, L, D) tokens: what the attention branch
        reads, the indicator of step caching (dcgen.diffusion.caching)."""
        sh1, sc1 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)[:2]
        return modulate(self.norm1(x), sh1, sc1)


def init_dit_linears(module: nn.Module):
    """Xavier-uniform weights, zero biases for every Linear not flagged to keep its init."""
    for m in module.modules():
        if isinstance(m, nn.Linear) and not getattr(m, "_dcgen_keep_init", False):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_block_adaln(blocks, mode: str = "zero"):
    """adaLN-Zero ('zero', DiT's intent) or keep Xavier ('xavier', [R]'s accidental Q1)."""
    if mode == "zero":
        for blk in blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
    elif mode != "xavier":
        raise ValueError(f"block_adaln_init must be 'zero' or 'xavier', got {mode!r}")


def _plain(v):
    """JSON/YAML-safe config values: tuples as lists."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


class ConditionedModel(nn.Module, PyTorchModelHubMixin, library_name="dcgen",
                       repo_url="https://arxiv.org/abs/2603.06351"):
    """Shared conditioning c = t_emb (+ y_emb) of DiT and DC-DiT, and the precision rules both
    follow (docs/design.md, "Precision under autocast")."""

    step_cache = None  # a dcgen.diffusion.caching.StepCache while sampling with step caching

    @property
    def config(self) -> dict:
        """Every constructor argument, as passed or defaulted (recorded by the Hub mixin when the
        model is built): what `dcgen.models.describe` writes and `dcgen.models.build` reads."""
        return {k: _plain(v) for k, v in self._hub_mixin_config.items()}

    drops_tokens = False  # the backbone sees every token (DC-DiT: a data-dependent subset)

    def training_hooks(self, dc):
        """What this model family adds to a training step (dcgen.models.hooks): nothing for a DiT."""
        from .hooks import TrainingHooks
        return TrainingHooks(dc)

    @property
    def param_dtype(self) -> torch.dtype:
        return self.t_embedder.mlp[0].weight.dtype

    @property
    def stream_dtype(self) -> torch.dtype:
        """Dtype of the backbone's residual stream: fp32 (fp64 for an fp64 model), never the
        autocast dtype."""
        return torch.promote_types(self.param_dtype, torch.float32)

    def precision_context(self, x: torch.Tensor):
        """A model whose weights are bf16/fp16 (e.g. `load_model(dtype=torch.bfloat16)`, FSDP
        with a half param dtype) computes as the fp32 model would under autocast to that dtype:
        same fp32 islands and fp32 residual stream, weights rounded. Called outside autocast,
        its forward therefore runs under that autocast; otherwise nothing changes."""
        dt = self.param_dtype
        if dt in (torch.bfloat16, torch.float16) and not torch.is_autocast_enabled(x.device.type):
            return torch.autocast(x.device.type, dtype=dt)
        return contextlib.nullcontext()

    def set_grad_checkpointing(self, enabled: bool = True) -> "ConditionedModel":
        """Activation checkpointing per backbone block: in training, each block keeps only its
        input and recomputes its activations in the backward pass (non-reentrant
        torch.utils.checkpoint; the recomputation runs the same kernels in the same order, so
        the gradients are those of the plain run). Not a constructor argument: it changes memory,
        not the model, and is not part of the model's description."""
        self._grad_checkpointing = bool(enabled)
        return self

    def run_blocks(self, h: torch.Tensor, c: torch.Tensor, pack: PackInfo | None = None) -> torch.Tensor:
        """The DiT blocks, eager or compiled (`dcgen.models.compile.compile_backbone`), with
        activation checkpointing per block when it is on and gradients are recorded."""
        spec = getattr(self, "_backbone_compile", None)
        if spec is not None and spec.active():
            return spec.run(self.blocks, h, c, pack)
        if getattr(self, "_grad_checkpointing", False) and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint
            for blk in self.blocks:
                h = checkpoint(blk, h, c, pack, use_reentrant=False)
            return h
        for blk in self.blocks:
            h = blk(h, c, pack)
        return h

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None):
        """ValueError for inputs that do not fit the model: the shape of x against the model's
        (in_channels, *input grid), the shapes of t and y, and labels outside [0, num_classes]
        (num_classes is the null label). Label values are read only from host tensors: on a GPU
        the read would stall the host every forward (generate() and the tasks check labels)."""
        want = (self.in_channels, *(g * p for g, p in zip(self.token_grid, self.patch)))
        if x.dim() != len(want) + 1 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x has shape {tuple(x.shape)} but the model takes (B, {', '.join(map(str, want))})")
        B = x.shape[0]
        if t.shape != (B,):
            raise ValueError(f"t has shape {tuple(t.shape)}, expected ({B},) for x of shape {tuple(x.shape)}")
        if self.y_embedder is None:
            return
        if y is None or y.shape != (B,):
            raise ValueError(f"y has shape {None if y is None else tuple(y.shape)}, expected ({B},) "
                             f"class labels in [0, {self.num_classes}] ({self.num_classes} = null)")
        if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null), "
                             f"got values in [{int(y.min())}, {int(y.max())}]")

    def conditioning(self, t, y):
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)
        return c


def init_conditioning(t_embedder: TimestepEmbedder, y_embedder: LabelEmbedder | None,
                      class_embed_std: float = 1.0):
    """DiT's N(0, 0.02) for the timestep MLP; the label table's std is a model argument. The
    default N(0, 1) is ADM's (PyTorch's nn.Embedding init): codes that differ from the start.
    DiT's N(0, 0.02) (the ImageNet recipe's) leaves the codes nearly equal, and a short run never
    separates them: the label is then ignored (docs/results.md, "Class conditioning")."""
    nn.init.normal_(t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(t_embedder.mlp[2].weight, std=0.02)
    if y_embedder is not None:
        nn.init.normal_(y_embedder.embedding_table.weight, std=class_embed_std)


class DiT(ConditionedModel):
    """Plain DiT on a grid of rank 1-3 with fixed patchify; returns (out, []) like DC-DiT."""

    def __init__(self, input_size=(32, 32), in_channels: int = 4, num_classes: int = 1000,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, patch_size=2, learn_sigma: bool = True,
                 attn_backend: str = "auto",
                 block_adaln_init: str = "zero", class_embed_std: float = 1.0):
        super().__init__()
        self.class_embed_std = float(class_embed_std)
        spatial = G.check_grid(input_size)
        n = len(spatial)
        self.patch = G.per_axis(patch_size, n, "patch_size")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.x_embedder = PatchEmbedND(in_channels, hidden_size, self.patch, mode="dit")
        self.token_grid = self.x_embedder.token_grid(spatial)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        self.register_buffer("pos_embed", G.sincos_pos_embed(self.token_grid, hidden_size), persistent=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, attn_backend) for _ in range(depth))
        out = G.numel(self.patch) * self.out_channels
        self.final_layer = FinalLayer(hidden_size, hidden_size, out)
        self.initialize_weights(block_adaln_init)

    def initialize_weights(self, block_adaln_init: str = "zero"):
        init_dit_linears(self)
        self.x_embedder.reset_parameters()
        init_conditioning(self.t_embedder, self.y_embedder, self.class_embed_std)
        init_block_adaln(self.blocks, block_adaln_init)
        self.final_layer.zero_init()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                tail_drop=0.0):
        if (torch.is_tensor(tail_drop) and bool((tail_drop != 0).any())) or \
                (not torch.is_tensor(tail_drop) and tail_drop != 0):
            raise ValueError("tail_drop needs a DC-DiT; a DiT has a fixed token count")
        self.check_inputs(x, t, y)
        with self.precision_context(x):
            sd = self.stream_dtype  # the residual stream is fp32 under autocast
            h = self.x_embedder(x).to(sd) + self.pos_embed.to(sd)  # (B, L, D)
            c = self.conditioning(t, y)  # (B, D)
            cache = self.step_cache
            if cache is not None and cache.reuse(self.blocks[0].modulated_input(h, c)):
                h = h + cache.value  # the backbone's residual of the last computed step
            else:
                h_in = h
                h = self.run_blocks(h, c)  # (B, L, D)
                if cache is not None:
                    cache.store(h - h_in)
            h = self.final_layer(h, c)  # (B, L, prod(P) * 2C), autocast dtype under autocast
            return unpatchify(h, self.token_grid, self.patch, self.out_channels), []
