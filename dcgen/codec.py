"""Latent codec: a diffusers autoencoder shared by every latent task (ImageNet latents,
per-frame video latents): `AutoencoderKL` (SD-VAE by default; SDXL-VAE, VA-VAE / E2E-VAE exports)
or `AutoencoderDC` (DC-AE, deterministic, f32 -> an 8x8 grid at 256 px). METHOD §7.1: posterior
sampled, scaled by 0.18215; decode z / 0.18215.

Normalisation into model space, one of:
- a scalar `scale` (SD-VAE's 0.18215; None: the autoencoder's own `config.scaling_factor`);
- per-channel statistics `latent_mean`, `latent_std` (C,), measured over the training set when
  the cache is prepared: z = (latent − mean_c) / std_c, so every channel has mean 0 and std 1
  (LightningDiT's latent normalisation; without it a VA-VAE trains to FID ≈ 130).

Channels and downsampling are read from the model's config. A DC-AE encodes deterministically:
its "posterior" has log-variance −inf, so a sample is its mean exactly.

Loading from a path: the directory's config.json must name one of the classes of `CODECS` (an
exact table; anything else is refused), and only safetensors weights are read.

Shape legend: N images, C_img = 3 RGB channels in [-1, 1], C latent channels, H, W pixels,
h = H / f, w = W / f for downsampling f.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
SD_SCALE = 0.18215
CODECS = ("AutoencoderKL", "AutoencoderDC", "AutoencoderKLTemporalDecoder")  # the last: SVD's, per frame


def codec_class(name: str):
    """The diffusers class of a codec named in `CODECS` (the exact table), else ValueError."""
    if name not in CODECS:
        raise ValueError(f"codec class {name!r} is not one of {list(CODECS)}")
    import diffusers
    return getattr(diffusers, name)


def load_autoencoder(vae, kind: str = "auto"):
    """An AutoencoderKL or AutoencoderDC from an instance, a local directory (its config.json's
    `_class_name` picks the class) or a hub id (`kind`: auto tries AutoencoderKL, then
    AutoencoderDC; kl or dc say which)."""
    if not isinstance(vae, (str, Path)):
        if type(vae).__name__ not in CODECS:
            raise ValueError(f"codec: {type(vae).__name__} is not one of {list(CODECS)}")
        return vae
    kinds = {"auto": CODECS[:2], "kl": ("AutoencoderKL",), "dc": ("AutoencoderDC",)}
    if kind not in kinds:
        raise ValueError(f"codec kind must be one of {list(kinds)}, got {kind!r}")
    path = Path(vae)
    names = kinds[kind]
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            declared = json.loads(cfg.read_text()).get("_class_name")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise ValueError(f"cannot load the VAE from {vae}: config.json is not a JSON object") from None
        if declared not in names:
            raise ValueError(f"cannot load the VAE from {vae}: its config names {declared!r}, expected one of "
                             f"{list(names)}")
        names = (declared,)
    errors = []
    for name in names:
        try:
            return codec_class(name).from_pretrained(str(vae), use_safetensors=True)
        except Exception as e:  # no network, bad path, wrong format, no safetensors file
            errors.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    where = "local directory" if path.exists() else "hub id (or a missing local path)"
    raise ValueError(f"cannot load the VAE from {vae} as a {where}: " + "; ".join(errors))


def given_statistics(latent_mean, latent_std, where: str):
    """The per-channel statistics a task was given (its export records the ones the model was
    trained with) as two lists of floats, checked; None when neither is given."""
    if latent_mean is None and latent_std is None:
        return None
    if (latent_mean is None) != (latent_std is None):
        raise ValueError(f"{where}: latent_mean and latent_std come together")
    try:
        mean = [float(v) for v in latent_mean]
        std = [float(v) for v in latent_std]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: latent_mean and latent_std must be lists of numbers") from None
    if len(mean) != len(std) or not mean:
        raise ValueError(f"{where}: latent_mean has {len(mean)} values, latent_std {len(std)}")
    if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(v) and v > 0 for v in std):
        raise ValueError(f"{where}: per-channel latent std must be finite and > 0, mean finite")
    return mean, std


def unnormalise_channels(z: torch.Tensor, mean, std) -> torch.Tensor:
    """Per-channel normalised latents (N, C, ...) -> raw latents: z · std_c + mean_c (channels on
    dim 1; `mean`, `std` (C,) tensors or lists)."""
    shape = (1, -1) + (1,) * (z.dim() - 2)
    return z * torch.as_tensor(std).view(shape).to(z) + torch.as_tensor(mean).view(shape).to(z)


def check_same_statistics(given, index: dict, where: str) -> None:
    """Refuse a cache whose measured statistics differ from the ones the model was trained with
    (a re-prepared cache would otherwise shift every latent silently)."""
    if "latent_mean" not in index:
        return
    for name, a, b in (("mean", given[0], index["latent_mean"]), ("std", given[1], index["latent_std"])):
        if len(a) != len(b) or any(abs(x - y) > 1e-5 * max(1.0, abs(y)) for x, y in zip(a, b)):
            raise ValueError(f"{where}: the cache's per-channel latent {name} {[round(v, 5) for v in b]} "
                             f"differs from the task's latent_{name} {[round(v, 5) for v in a]} (the "
                             "statistics the model was trained with); was the cache prepared again?")


class VAECodec:
    """Encode images to posterior moments, sample latents, decode latents back to images.

    `vae` is a hub id, a local directory saved with `save_pretrained`, or an AutoencoderKL /
    AutoencoderDC instance. `scale` None takes the model's own scaling factor; `latent_mean` and
    `latent_std` (C,) replace the scalar with per-channel normalisation."""

    def __init__(self, vae=DEFAULT_VAE, scale: float | None = SD_SCALE, device="cpu",
                 dtype=torch.float32, micro_batch: int = 32, kind: str = "auto",
                 latent_mean=None, latent_std=None):
        vae = load_autoencoder(vae, kind)
        self.vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.kind = type(self.vae).__name__
        self.deterministic = self.kind == "AutoencoderDC"
        cfg = self.vae.config
        self.scale = float(scale) if scale is not None else float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.device = torch.device(device)
        self.dtype = dtype
        self.micro_batch = micro_batch
        self.latent_channels = int(cfg.latent_channels)
        blocks = cfg.encoder_block_out_channels if self.deterministic else cfg.block_out_channels
        self.downsample = 2 ** (len(blocks) - 1)
        self.latent_mean = self.latent_std = None
        stats = given_statistics(None if latent_mean is None else torch.as_tensor(latent_mean).reshape(-1).tolist(),
                                 None if latent_std is None else torch.as_tensor(latent_std).reshape(-1).tolist(),
                                 "codec")
        if stats is not None:
            if len(stats[0]) != self.latent_channels:
                raise ValueError(f"per-channel statistics have {len(stats[0])} values for "
                                 f"{self.latent_channels} latent channels")
            self.latent_mean, self.latent_std = (torch.tensor(v, dtype=torch.float32) for v in stats)

    def info(self) -> dict:
        """What the cache and the run record of the codec."""
        d = {"class": self.kind, "latent_channels": self.latent_channels, "downsample": self.downsample}
        if self.latent_mean is not None:
            d.update(latent_mean=self.latent_mean.tolist(), latent_std=self.latent_std.tolist())
        else:
            d["scale"] = self.scale
        return d

    def to_model(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw latents (N, C, ...) -> model space."""
        if self.latent_mean is None:
            return latent * self.scale
        shape = (1, -1) + (1,) * (latent.dim() - 2)
        return (latent - self.latent_mean.view(shape).to(latent)) / self.latent_std.view(shape).to(latent)

    def from_model(self, z: torch.Tensor) -> torch.Tensor:
        """Model space -> raw latents."""
        if self.latent_mean is None:
            return z / self.scale
        return unnormalise_channels(z, self.latent_mean, self.latent_std)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) in [-1, 1] -> posterior mean and log-variance (N, C, h, w), fp32, unscaled
        (a DC-AE: its latent and −inf)."""
        means, logvars = [], []
        for chunk in images.split(self.micro_batch):
            enc = self.vae.encode(chunk.to(self.device, self.dtype))
            if self.deterministic:
                m = enc.latent.float().cpu()
                means.append(m)
                logvars.append(torch.full_like(m, float("-inf")))
            else:
                means.append(enc.latent_dist.mean.float().cpu())
                logvars.append(enc.latent_dist.logvar.float().cpu())
        return torch.cat(means), torch.cat(logvars)

    def sample(self, mean: torch.Tensor, logvar: torch.Tensor, generator=None) -> torch.Tensor:
        """Posterior sample in model space (normalised)."""
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return self.to_model(mean + torch.exp(0.5 * logvar) * noise)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model-space latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1] (not clamped)."""
        outs = []
        for chunk in z.split(self.micro_batch):
            x = self.vae.decode(self.from_model(chunk.float()).to(self.device, self.dtype)).sample
            outs.append(x.float().cpu())
        return torch.cat(outs)


def channel_statistics(latents) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of raw latents, streamed over an iterable of (N, C, ...) batches
    (float64 sums: nothing held but two (C,) accumulators)."""
    n, s1, s2 = 0, None, None
    for z in latents:
        z = torch.as_tensor(z).double().transpose(0, 1).reshape(z.shape[1], -1)  # (C, N * spatial)
        s1 = z.sum(1) if s1 is None else s1 + z.sum(1)
        s2 = (z * z).sum(1) if s2 is None else s2 + (z * z).sum(1)
        n += z.shape[1]
    if not n:
        raise ValueError("no latents to measure")
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp_min(0) * n / max(n - 1, 1)
    return mean.float(), var.sqrt().float()


def tiny_autoencoder_kl(seed: int = 0, latent_channels: int = 4, width: int = 32):
    """A small random AutoencoderKL with SD-VAE's 8x downsampling, for tests and CPU smoke runs
    (no download). Built from config only."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(width, width, width, width),
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=min(32, width), sample_size=32)


def tiny_autoencoder_dc(seed: int = 0, latent_channels: int = 8, width: int = 16):
    """A small random AutoencoderDC (4x downsampling, one attention stage), for tests (no download)."""
    from diffusers import AutoencoderDC
    torch.manual_seed(seed)
    return AutoencoderDC(in_channels=3, latent_channels=latent_channels, attention_head_dim=8,
                         encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                         decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
                         encoder_block_out_channels=(width, 2 * width, 2 * width),
                         decoder_block_out_channels=(width, 2 * width, 2 * width),
                         encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                         encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
                         upsample_block_type="interpolate", downsample_block_type="Conv",
                         decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.5)
