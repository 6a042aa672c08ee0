"""DC-DiT: a DiT backbone on the data-dependent set of tokens a learned router keeps
(arXiv 2603.06351 v2; METHOD §2).

Shape legend: B batch, C data channels, G token grid (rank n), L = prod(G), D width,
D_e = encoder/decoder width, M_b kept tokens of sample b, T = sum_b M_b packed tokens.
"""
from __future__ import annotations

import logging

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..chunking import grid as G
from ..chunking.chunk import ChunkIndex, ChunkLayer, DeChunkLayer, ste
from ..chunking.router import build_router
from .dit import ConditionedModel, DiTBlock, init_block_adaln, init_conditioning, init_dit_linears
from .layers import (ConvStack, FinalLayer, LabelEmbedder, PatchEmbedND, RMSNorm, TimestepEmbedder,
                     fp32_call, unpatchify)


@dataclass
class StageAux:
    """Per-stage router outputs returned by the forward (nothing is cached on the module). The
    chunking vocabulary (docs/design.md): boundary_prob p; boundary_mask the natural boundaries
    p > 0.5 (H-Net's name, as in the router's output); kept_mask what tail dropping left;
    selected_probs kappa; kept_counts / natural_counts their sizes per sample."""

    grid: G.Grid
    boundary_prob: torch.Tensor  # (B, L) p, fp32
    boundary_mask: torch.Tensor  # (B, L) natural boundaries, p > 0.5
    kept_mask: torch.Tensor  # (B, L) kept after tail dropping (subset of boundary_mask)
    selected_probs: torch.Tensor  # (B, L) kappa
    kept_counts: torch.Tensor  # (B,) M_b = kept_mask.sum(1)
    natural_counts: torch.Tensor  # (B,) boundary_mask.sum(1)


def default_sigma(grid: G.Grid) -> tuple[float, ...]:
    """De-chunk width per axis: 1 at side 32, 2 at side 64, max(1, g/32) in general (D9)."""
    return tuple(max(1.0, g / 32) for g in grid)


PADDING_MODES = ("zeros", "replicate", "reflect")


def set_conv_padding(modules, mode: str) -> str:
    """The padding mode of every padded conv inside `modules` (PyTorch's `padding_mode`)."""
    if mode not in PADDING_MODES:
        raise ValueError(f"conv_padding must be one of {PADDING_MODES}, got {mode!r}")
    for m in modules:
        for conv in m.modules():
            if isinstance(conv, nn.modules.conv._ConvNd) and any(conv.padding):
                conv.padding_mode = mode
    return mode


class DCDiT(ConditionedModel):
    """Dynamic Chunking DiT on a grid of rank 1, 2 or 3. `forward` returns (out, [StageAux])."""

    def __init__(self, input_size=(32, 32), in_channels: int = 4, num_classes: int = 1000,
                 hidden_size: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, patch_size=1, patch_mode: str = "overlap",
                 encoder_dim: int | None = None, router_dim: int | None = None,
                 encoder_depth: int = 2, decoder_depth: int = 2, conv_kernel=3,
                 router: str = "predictability", router_kernel=None, mask_center: bool = False,
                 dechunk_sigma=None, plug_weights=None, dechunk_smoothing: bool = True,
                 learn_sigma: bool = True,
                 norm_groups: int = 32,
                 attn_backend: str = "auto", pe_coord_scale: float = 1.0,
                 cond_adaptor: bool = False,
                 # compatibility with the reference code (METHOD §11); defaults are the clean behaviour
                 block_adaln_init: str = "zero", residual_proj_init: str = "zero",
                 residual_autocast: bool = False, attn_qkv_bf16: bool = False,
                 tail_drop_protect_forced: bool = True, class_embed_std: float = 1.0,
                 conv_padding: str = "zeros"):
        super().__init__()
        spatial = G.check_grid(input_size)
        n = len(spatial)
        D = hidden_size
        De = encoder_dim or D // 4
        self.patch = G.per_axis(patch_size, n, "patch_size")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.residual_autocast = residual_autocast
        self.class_embed_std = float(class_embed_std)

        self.x_embedder = PatchEmbedND(in_channels, De, self.patch, mode=patch_mode)
        self.token_grid = self.x_embedder.token_grid(spatial)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(num_classes, D) if num_classes > 0 else None
        # upcycling: new modules read LN(c) through a trainable adaptor (METHOD §9.1)
        self.cond_adaptor = nn.LayerNorm(D, eps=1e-6) if cond_adaptor else None

        if De == norm_groups and (encoder_depth or decoder_depth):
            logging.getLogger("dcgen.models").warning(
                "DCDiT: conv width %d with norm_groups %d, one channel per GroupNorm group: the timestep "
                "and class that each conv block adds per channel are normalised away by the next GroupNorm, "
                "so the encoder, router and decoder do not see them; use norm_groups < %d", De, norm_groups, De)
        self.encoder = ConvStack([De] * encoder_depth + [D], D, n, conv_kernel, norm_groups)
        self.residual_proj = nn.Linear(D, D)
        rk = conv_kernel if router_kernel is None else router_kernel
        rkw = dict(router_dim=router_dim or D // 4, kernel=rk, mask_center=mask_center) \
            if router == "predictability" else {}
        self.router = build_router(router, D, n, **rkw)
        self.chunk = ChunkLayer(protect_forced=tail_drop_protect_forced)
        self.register_buffer("pos_embed", G.sincos_pos_embed(self.token_grid, D, pe_coord_scale),
                             persistent=False)
        self.blocks = nn.ModuleList(
            DiTBlock(D, num_heads, mlp_ratio, attn_backend, attn_qkv_bf16) for _ in range(depth))
        self.backbone_norm = RMSNorm(D)
        sigma = default_sigma(self.token_grid) if dechunk_sigma is None else dechunk_sigma
        self.dechunk = DeChunkLayer(sigma=sigma, plug_weights=plug_weights, smoothing=dechunk_smoothing)
        self.decoder = ConvStack([D] + [De] * decoder_depth, D, n, conv_kernel, norm_groups)
        self.final_layer = FinalLayer(De, D, G.numel(self.patch) * self.out_channels)
        # zero padding tells a border token where it is; the full-resolution convs' receptive
        # field spans most of a small grid (docs/results.md, "The clean-timestep stripes")
        self.conv_padding = set_conv_padding((self.x_embedder, self.encoder, self.router, self.decoder),
                                             conv_padding)
        self.initialize_weights(block_adaln_init, residual_proj_init)

    def initialize_weights(self, block_adaln_init: str = "zero", residual_proj_init: str = "zero"):
        init_dit_linears(self)  # convs keep PyTorch's default init
        self.x_embedder.reset_parameters()
        init_conditioning(self.t_embedder, self.y_embedder, self.class_embed_std)
        init_block_adaln(self.blocks, block_adaln_init)  # adaLN-Zero; [R] keeps Xavier (Q1)
        if residual_proj_init == "zero":  # H-Net's intent; [R] overwrites it with Xavier (Q2)
            nn.init.zeros_(self.residual_proj.weight)
        elif residual_proj_init != "xavier":
            raise ValueError(f"residual_proj_init must be 'zero' or 'xavier', got {residual_proj_init!r}")
        nn.init.zeros_(self.residual_proj.bias)
        self.final_layer.zero_init()

    drops_tokens = True  # the router keeps a data-dependent subset for the backbone

    def training_hooks(self, dc):
        """The multi-budget tail-drop schedule and the ratio loss (dcgen.hooks)."""
        from .hooks import ChunkingHooks
        return ChunkingHooks(dc)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                tail_drop=0.0):
        self.check_inputs(x, t, y)
        with self.precision_context(x):
            return self._forward(x, t, y, tail_drop)

    def _forward(self, x, t, y, tail_drop):
        # Precision (docs/design.md, "Precision under autocast"): convs and Linears in the
        # autocast dtype; router, de-chunk, residual projection and merge in fp32 with autocast
        # off; the backbone's residual stream in fp32.
        grid = self.token_grid
        dev = x.device.type
        c = self.conditioning(t, y)  # (B, D)
        c_new = self.cond_adaptor(c) if self.cond_adaptor is not None else c

        # 1. full-resolution encoder
        h = self.x_embedder(x)  # (B, L, D_e)
        e = self.encoder(h, c_new, grid)  # (B, L, D), autocast dtype under autocast
        if self.residual_autocast:  # [R] Q3: the projection runs in the autocast dtype
            res = self.residual_proj(e)  # (B, L, D)
        else:
            with torch.autocast(dev, enabled=False):
                res = fp32_call(self.residual_proj, e.float())  # (B, L, D) fp32

        # 2. route and chunk
        route = fp32_call(self.router, e, grid)  # p, natural mask, kappa: (B, L) fp32
        z, idx = self.chunk(e, route, grid, tail_drop)  # (T, D), a gather: e's dtype

        # 3. backbone on the kept tokens, position embedding at their original coordinates; the
        # add promotes the chunk to the fp32 residual stream (never the table down to bf16)
        sd = self.stream_dtype
        cache = self.step_cache  # step caching: reuse the last computed step's de-chunked output
        if cache is not None and cache.reuse(self.blocks[0].modulated_input(e.to(sd) + self.pos_embed.to(sd), c)):
            zt = cache.value  # (B, L, D) fp32
        else:
            z = z.to(sd) + self.pos_embed[idx.pos_idx].to(sd)  # (T, D) fp32
            z = self.run_blocks(z, c, idx)  # the ChunkIndex is the packing attention needs  # (T, D) fp32
            z = self.backbone_norm(z)

            # 4. de-chunk, STE-weighted residual merge (fp32), decoder
            zt = self.dechunk(z, idx, route.boundary_prob)  # (B, L, D) fp32
            if cache is not None:
                cache.store(zt)
        kappa = ste(route.selected_probs)[..., None]  # fp32 ones, gradient to p
        if self.residual_autocast:
            # [R] Q3: h.to(residual.dtype) * ste(p) + residual: zt is rounded to the residual's
            # dtype, but ste(p) is fp32, so the product and the sum are promoted to fp32
            y_ = zt.to(res.dtype) * kappa + res  # (B, L, D) fp32
        else:
            y_ = zt * kappa + res  # (B, L, D) fp32
        # the decoder takes the merge in the weights' dtype: fp32 for an fp32 model, also under
        # autocast (as [R]; autocast casts per op); bf16 for a bf16-weight model
        h = self.decoder(y_.to(self.param_dtype), c_new, grid)  # (B, L, D_e)
        out = self.final_layer(h, c_new)  # (B, L, prod(P) * 2C), autocast dtype under autocast
        out = unpatchify(out, grid, self.patch, self.out_channels)
        return out, [self.stage_aux(route, idx)]

    @staticmethod
    def stage_aux(route, idx: ChunkIndex) -> StageAux:
        return StageAux(grid=idx.grid, boundary_prob=route.boundary_prob, boundary_mask=route.boundary_mask,
                        kept_mask=idx.kept_mask, selected_probs=route.selected_probs,
                        kept_counts=idx.kept_counts, natural_counts=route.boundary_mask.sum(1))
