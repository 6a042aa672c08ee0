"""REPA on a DiT or DC-DiT backbone: representation alignment (Yu et al., 2024, arXiv 2410.06940).

A projector (an MLP) maps one backbone block's output tokens to the feature width of a frozen
image encoder; the loss is the negative cosine similarity between each projected token and the
encoder's patch feature at that token's grid position, averaged over each sample's tokens, then
over the batch, and added to the diffusion loss with weight `repa.weight` (docs/method.md §8.2).

On a DC-DiT the backbone sees only the kept tokens, packed: token i belongs to sample
`pack.batch_idx[i]` and sits at raster position `pack.pos_idx[i]` of the token grid (the
`ChunkIndex` the chunk layer returns). Its target is the encoder feature map, resized to the
token grid, read at that position. Dropped tokens never pass through the backbone, so they have
no block output to align: they take no part in the loss (the router's choice is not pushed
towards or away from them by REPA; its gradient reaches the router only through the kept tokens'
values). Every sample's kept tokens weigh 1/M_b, so a sample with few boundaries counts as much
as one with many.

The encoder (`repa.encoder`), frozen, evaluated under no_grad, on the clean training images
(`task.decode(x0)`: the pixels themselves, or the VAE's decoding of a latent):

- `random:WIDTH` — a small conv encoder with fixed random weights (seed 0), patch 4: for tests
  and smoke runs; the alignment it teaches means nothing;
- `torchscript:PATH` — a TorchScript file taking (B, 3, S, S) images in [0, 1] and returning a
  feature map (B, d, h, w) or patch tokens (B, h*w, d) (a square); a program you trust, like the
  FID Inception file;
- `timm:NAME` — a timm model with pretrained weights (`pip install timm`), e.g.
  `timm:vit_base_patch14_dinov2.lvd142m` (REPA's DINOv2-B, with `repa.encoder_size=224` as REPA
  feeds it), downloaded once into the Hub cache, or `timm:NAME@/path/weights.safetensors` for
  local weights of that architecture (safetensors only); its prefix tokens (class, registers)
  are dropped, its own mean/std and input size used.

The projector is a submodule of the trained model (`repa_projector`), so DDP, the optimizer,
the EMA and the checkpoints carry it with no special case; the export leaves it out (it is a
training device, not part of the generator).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PROJECTOR = "repa_projector"  # the model attribute (and state-dict prefix) of the projector


class Projector(nn.Sequential):
    """REPA's three-layer MLP: D -> P -> P -> d with SiLU."""

    def __init__(self, width: int, hidden: int, out: int):
        super().__init__(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, out))


class RandomEncoder(nn.Module):
    """A frozen random conv encoder: (B, 3, S, S) in [0, 1] -> (B, width, S/4, S/4). A stand-in
    for tests and smoke runs only."""

    def __init__(self, width: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, width, 4, stride=4), nn.GELU(), nn.Conv2d(width, width, 3, padding=1))
        with torch.no_grad():
            for m in self.net:
                if isinstance(m, nn.Conv2d):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.weight[0].numel()))
                    m.bias.zero_()
        self.width, self.input_size = width, None

    def forward(self, x):
        return self.net(x)


@dataclass
class Encoder:
    """A frozen feature network: `module` maps (B, 3, S, S) normalised images to (B, d, h, w)."""
    module: nn.Module
    width: int
    input_size: int | None  # S, or None: the images' own size
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    prefix_tokens: int | None = None  # class / register tokens before the patch tokens (None: inferred)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images in [-1, 1] (C = 1 or 3) -> (B, d, h, w) fp32 features."""
        x = ((images.float().clamp(-1, 1) + 1) / 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"REPA encodes images with 1 or 3 channels, got {x.shape[1]}")
        if self.input_size and tuple(x.shape[-2:]) != (self.input_size,) * 2:
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bicubic", align_corners=False,
                              antialias=True)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        with torch.autocast(x.device.type, enabled=False):
            f = self.module((x - mean) / std)
        return _as_map(f, self.prefix_tokens).float()


def _as_map(f: torch.Tensor, prefix: int | None = None) -> torch.Tensor:
    """(B, d, h, w) as is; (B, prefix + h*w, d) patch tokens -> (B, d, h, w) (h = w). With
    `prefix` None, the prefix (class and register tokens) is what exceeds the largest square,
    which is unambiguous while it is shorter than 2 h + 1 (a ViT's 1 to 5)."""
    if f.dim() == 4:
        return f
    if f.dim() != 3:
        raise ValueError(f"REPA encoder: expected (B, d, h, w) or (B, N, d) features, got {tuple(f.shape)}")
    if prefix is None:
        prefix = f.shape[1] - math.isqrt(f.shape[1]) ** 2
    f = f[:, prefix:]
    side = math.isqrt(f.shape[1])
    if side * side != f.shape[1]:
        raise ValueError(f"REPA encoder: {f.shape[1]} patch tokens are not a square grid")
    return f.transpose(1, 2).reshape(f.shape[0], f.shape[2], side, side)


def load_encoder(spec: str, device="cpu", size: int | None = None) -> Encoder:
    """The frozen encoder `repa.encoder` names (module docstring); `size`: a timm model's input
    side (`repa.encoder_size`; None: its own)."""
    kind, _, arg = str(spec).partition(":")
    if kind == "random":
        module = RandomEncoder(int(arg or 32))
        enc = Encoder(module, module.width, None)
    elif kind == "torchscript":
        from pathlib import Path
        path = Path(arg).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"repa.encoder={spec}: no such file")
        module = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():  # its width, from one probe
            width = _as_map(module(torch.zeros(1, 3, 64, 64))).shape[1]
        enc = Encoder(module, width, None)
    elif kind == "timm":
        try:
            import timm
        except ImportError:
            raise ValueError(f"repa.encoder={spec} needs timm (pip install timm)") from None
        name, _, file = arg.partition("@")
        kwargs = {"num_classes": 0}
        if size:
            kwargs["img_size"] = int(size)
        if file:  # local weights: a safetensors file only (no pickle is ever opened)
            from pathlib import Path
            path = Path(file).expanduser()
            if path.suffix != ".safetensors" or not path.is_file():
                raise ValueError(f"repa.encoder={spec}: the weights must be an existing .safetensors file")
            kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        try:
            module = timm.create_model(name, pretrained=True, **kwargs)
        except (RuntimeError, TypeError, OSError) as e:  # no such model, wrong keys or shapes, an
            # argument the architecture does not take (img_size on a CNN), no network for its weights
            raise ValueError(f"repa.encoder={spec}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from None
        cfg = module.pretrained_cfg
        img = getattr(getattr(module, "patch_embed", None), "img_size", None) or cfg["input_size"][-2:]
        enc = Encoder(module.forward_features, module.num_features, int(img[-1]),
                      tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225))),
                      int(getattr(module, "num_prefix_tokens", 0)))
        enc.owner = module  # kept for .to() / eval()
    else:
        raise ValueError(f"repa.encoder={spec!r}: expected random:WIDTH, torchscript:PATH or timm:NAME")
    owner = getattr(enc, "owner", enc.module)
    owner.eval()
    for p in owner.parameters():
        p.requires_grad_(False)
    owner.to(device)
    return enc


def grid_targets(features: torch.Tensor, token_grid) -> torch.Tensor:
    """(B, d, h, w) -> (B, L, d) on the token grid (raster order): area means (adaptive, also
    when the grid does not divide the map) where the map is at least as fine as the grid,
    bilinear where it is coarser."""
    gh, gw = token_grid
    h, w = features.shape[-2:]
    if (h, w) == (gh, gw):
        f = features
    elif h >= gh and w >= gw:
        f = F.adaptive_avg_pool2d(features, (gh, gw))  # point-sampling a finer map would alias
    else:
        f = F.interpolate(features, size=(gh, gw), mode="bilinear", align_corners=False)
    return f.flatten(2).transpose(1, 2)


def alignment_loss(h: torch.Tensor, pack, targets: torch.Tensor, projector: nn.Module) -> torch.Tensor:
    """-cos(projector(h), target) averaged over each sample's tokens, then over samples.

    h: a block's output, (B, L, D) dense or (T, D) packed with `pack` (batch_idx, pos_idx);
    targets: (B, L, d) on the token grid."""
    proj = projector(h).float()
    if pack is None:
        cos = F.cosine_similarity(proj, targets, dim=-1, eps=1e-6)  # (B, L)
        return -cos.mean(1).mean()
    tgt = targets[pack.batch_idx, pack.pos_idx]  # (T, d): each kept token's own position
    cos = F.cosine_similarity(proj, tgt, dim=-1, eps=1e-6)  # (T,)
    B = targets.shape[0]
    per_sample = torch.zeros(B, dtype=cos.dtype, device=cos.device).index_add_(0, pack.batch_idx, cos)
    counts = torch.bincount(pack.batch_idx, minlength=B).clamp_min(1)
    return -(per_sample / counts).mean()


class Repa:
    """REPA for one training run: attaches the projector to `model`, records the chosen block's
    output on every forward, and gives the loss for the clean batch `x0`."""

    def __init__(self, cfg, model: nn.Module, task, device="cpu"):
        self.weight = float(cfg.weight)
        self.depth = int(cfg.depth)
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise ValueError(f"REPA needs a DiT or DC-DiT backbone; {type(model).__name__} has no blocks")
        if not 1 <= self.depth <= len(blocks):
            raise ValueError(f"repa.depth={self.depth}: the model has {len(blocks)} blocks (1..{len(blocks)})")
        if len(model.token_grid) != 2:
            raise ValueError(f"REPA aligns to an image encoder: it needs a 2D token grid, the model's is "
                             f"{tuple(model.token_grid)}")
        if not cfg.encoder:
            raise ValueError("repa.weight > 0 needs repa.encoder (random:WIDTH, torchscript:PATH or timm:NAME)")
        size = cfg.get("encoder_size") if hasattr(cfg, "get") else getattr(cfg, "encoder_size", None)
        self.encoder = load_encoder(cfg.encoder, device, size)
        self.task, self.token_grid = task, tuple(model.token_grid)
        width = model.blocks[0].adaLN_modulation[-1].in_features
        setattr(model, PROJECTOR, Projector(width, int(cfg.projector_dim), self.encoder.width))
        self._seen = None
        self._block = blocks[self.depth - 1]
        self._handle = self._block.register_forward_hook(self._record)

    def __deepcopy__(self, memo):
        # a deep copy of the model (the EMA, an export) copies its blocks' hooks, this bound
        # method among them: share this object (encoder, task) rather than duplicate it; the
        # copy's block is not ours, so its forwards record nothing (_record)
        return self

    def _record(self, module, args, output):
        if module is not self._block:  # a copy of the model (the EMA): not the trained block
            return
        pack = args[2] if len(args) > 2 else None
        self._seen = (output, pack)

    def loss(self, model: nn.Module, x0: torch.Tensor) -> torch.Tensor:
        """The alignment loss of the last forward's block output against x0's encoder features."""
        if self._seen is None:
            raise RuntimeError("REPA: the chosen block did not run in this forward")
        h, pack = self._seen
        self._seen = None
        with torch.no_grad():
            images = self.task.decode(x0)
            targets = grid_targets(self.encoder.features(images.to(x0.device)), self.token_grid)
        return alignment_loss(h, pack, targets, getattr(model, PROJECTOR))

    def remove(self):
        self._handle.remove()


class _StandIn(nn.Module):
    """A small CNN: (B, 3, S, S) in [0, 1] -> (B, 64, S/4, S/4) features (`forward`), with a
    linear class head on their mean used only to fit it."""

    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 32, 3, stride=2, padding=1),
                                   nn.GELU(), nn.Conv2d(32, width, 3, padding=1), nn.GELU(),
                                   nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.trunk(x)


def fit_standin_encoder(task, path, steps: int = 600, batch_size: int = 64, seed: int = 0) -> dict:
    """A stand-in REPA encoder for data with no pretrained encoder offline: a small CNN fitted
    to classify the task's own training images, saved as TorchScript (its feature map) for
    `repa.encoder=torchscript:PATH`. Supervised, trained on the training set itself: it shows
    what alignment to a fixed feature network does, not what DINOv2 would. Returns
    {"path", "train_accuracy", "width"}."""
    if not task.num_classes:
        raise ValueError("the stand-in encoder is fitted as a classifier: it needs a class-conditional task")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = _StandIn(task.num_classes)
    data = task.train_dataset()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)

    def batch(idx):
        xs, ys = zip(*(data[int(i)] for i in idx))
        x = torch.stack(xs).float()
        x = ((x.clamp(-1, 1) + 1) / 2)
        return (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x), torch.as_tensor(ys).long()

    for _ in range(int(steps)):
        x, y = batch(torch.randint(len(data), (batch_size,), generator=g))
        loss = F.cross_entropy(net.head(net(x).mean((2, 3))), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        idx = torch.arange(min(len(data), 1024))
        correct = 0
        for chunk in idx.split(256):
            x, y = batch(chunk)
            correct += int((net.head(net(x).mean((2, 3))).argmax(1) == y).sum())
    from pathlib import Path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(net).save(str(path))
    return {"path": str(path), "train_accuracy": correct / len(idx), "width": 64}


def strip_projector(state: dict) -> dict:
    """A state dict without the REPA projector (what the export writes)."""
    return {k: v for k, v in state.items() if not k.startswith(PROJECTOR + ".")}


__all__ = ["fit_standin_encoder", "Encoder", "PROJECTOR", "Projector", "RandomEncoder", "Repa", "alignment_loss", "grid_targets",
           "load_encoder", "strip_projector"]
