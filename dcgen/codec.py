"""Latent codec: a diffusers `AutoencoderKL` (SD-VAE by default) shared by every latent task
(ImageNet latents, per-frame video latents). METHOD §7.1: posterior sampled, scaled by 0.18215;
decode z / 0.18215.

Shape legend: N images, C_img = 3 RGB channels in [-1, 1], C = 4 latent channels, H, W pixels,
h = H / 8, w = W / 8.
"""
from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
SD_SCALE = 0.18215


class VAECodec:
    """Encode images to posterior moments, sample latents, decode latents back to images.

    `vae` is a hub id, a local directory saved with `save_pretrained`, or an AutoencoderKL."""

    def __init__(self, vae=DEFAULT_VAE, scale: float = SD_SCALE, device="cpu",
                 dtype=torch.float32, micro_batch: int = 32):
        from diffusers import AutoencoderKL
        if isinstance(vae, (str, Path)):
            path = Path(vae)
            try:
                vae = AutoencoderKL.from_pretrained(str(vae))
            except Exception as e:  # no network, bad path, wrong format
                where = "local directory" if path.exists() else "hub id (or a missing local path)"
                raise ValueError(f"cannot load the VAE from {vae} as a {where}: "
                                 f"{str(e).splitlines()[0]}") from None
        self.vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.scale = scale
        self.device = torch.device(device)
        self.dtype = dtype
        self.micro_batch = micro_batch
        self.latent_channels = self.vae.config.latent_channels
        self.downsample = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) in [-1, 1] -> posterior mean and log-variance (N, C, h, w), fp32, unscaled."""
        means, logvars = [], []
        for chunk in images.split(self.micro_batch):
            dist = self.vae.encode(chunk.to(self.device, self.dtype)).latent_dist
            means.append(dist.mean.float().cpu())
            logvars.append(dist.logvar.float().cpu())
        return torch.cat(means), torch.cat(logvars)

    def sample(self, mean: torch.Tensor, logvar: torch.Tensor, generator=None) -> torch.Tensor:
        """Posterior sample in model space (scaled)."""
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return (mean + torch.exp(0.5 * logvar) * noise) * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model-space latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1] (not clamped)."""
        outs = []
        for chunk in z.split(self.micro_batch):
            x = self.vae.decode(chunk.to(self.device, self.dtype) / self.scale).sample
            outs.append(x.float().cpu())
        return torch.cat(outs)


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
