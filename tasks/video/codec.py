"""Video latent codecs: clips (N, 3, T, H, W) in [-1, 1] <-> posterior moments (N, C, T', h, w).

kinds (picked from the VAE's `config.json` `_class_name` when `kind="auto"`):
- image: a diffusers `AutoencoderKL` (SD-VAE by default) or `AutoencoderDC` (DC-AE, deterministic:
  its cached log-variance is -inf, so a "posterior sample" is its latent) applied frame by frame
  through `dcgen.codec.VAECodec` (T' = T; the model's own downsampling and scaling factor).
- svd: `AutoencoderKLTemporalDecoder` (Stable Video Diffusion): the same per-frame image
  encoder, so the latents have the image layout, but a decoder that mixes frames (smoother
  motion); decoding needs whole clips.
A 3D causal video VAE (CogVideoX, T' = 1 + (T - 1)/4) is future work: its decoder's temporal
upsampling only round-trips odd latent lengths, which changes the clip geometry (README).

Shape legend: N clips, T frames, C latent channels, h = H / f, w = W / f, f the downsampling.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dcgen.codec import DEFAULT_VAE, VAECodec

KIND_OF_CLASS = {"AutoencoderKL": "image", "AutoencoderDC": "image", "AutoencoderKLTemporalDecoder": "svd"}
KINDS = tuple(sorted(set(KIND_OF_CLASS.values())))


def vae_info(vae, kind: str = "auto") -> dict:
    """What the task needs to know about a VAE without loading its weights: kind, latent
    channels, spatial downsampling, scaling factor. `vae`: hub id, local dir or a model."""
    if isinstance(vae, (str, Path)):
        from diffusers import AutoencoderKL
        path = Path(vae)
        try:
            cfg = dict(AutoencoderKL.load_config(str(vae)))
        except Exception as e:  # no network, bad path, not a diffusers model
            where = "local directory" if path.exists() else "hub id (or a missing local path)"
            raise ValueError(f"video: cannot read the VAE config from {vae} as a {where}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    else:
        cfg = dict(vae.config)
        cfg.setdefault("_class_name", type(vae).__name__)
    cls = cfg.get("_class_name", "AutoencoderKL")
    if kind == "auto":
        if cls not in KIND_OF_CLASS:
            raise ValueError(f"video: VAE {vae} is a {cls}; supported: "
                             f"{', '.join(KIND_OF_CLASS)} (set task.vae_type to force a kind)")
        kind = KIND_OF_CLASS[cls]
    if kind not in KINDS:
        raise ValueError(f"video: vae_type must be 'auto' or one of {list(KINDS)}, got '{kind}'")
    blocks = cfg.get("encoder_block_out_channels" if cls == "AutoencoderDC" else "block_out_channels",
                     (0, 0, 0, 0))
    return {"kind": kind, "class_name": cls, "latent_channels": int(cfg.get("latent_channels", 4)),
            "downsample": 2 ** (len(blocks) - 1),
            "scaling_factor": float(cfg.get("scaling_factor", 0.18215))}


class VideoCodec:
    """Encode clips to posterior moments, sample scaled latents, decode latents to clips."""

    def __init__(self, vae=DEFAULT_VAE, kind: str = "auto", scale: float | None = None,
                 device="cpu", dtype=torch.float32, micro_batch: int = 32, latent_mean=None,
                 latent_std=None):
        info = vae_info(vae, kind)
        self.kind = info["kind"]
        self.scale = float(info["scaling_factor"] if scale is None else scale)
        self.latent_channels, self.downsample = info["latent_channels"], info["downsample"]
        self.device, self.dtype = torch.device(device), dtype
        self.micro_batch = int(micro_batch)
        if self.kind == "image":
            self.image = VAECodec(vae, scale=self.scale, device=device, dtype=dtype,
                                  micro_batch=micro_batch, latent_mean=latent_mean, latent_std=latent_std)
            self.vae = self.image.vae
        else:
            from diffusers import AutoencoderKLTemporalDecoder
            if isinstance(vae, (str, Path)):
                try:
                    vae = AutoencoderKLTemporalDecoder.from_pretrained(str(vae))
                except Exception as e:
                    raise ValueError(f"video: cannot load the VAE from {vae}: "
                                     f"{str(e).splitlines()[0]}") from None
            self.vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
            # the temporal decoder's encoder is the image one: reuse the per-frame moments path
            self.image = VAECodec(self.vae, scale=self.scale, device=device, dtype=dtype,
                                  micro_batch=micro_batch, latent_mean=latent_mean, latent_std=latent_std)

    def latent_shape(self, frames: int, resolution: int) -> tuple[int, int, int, int]:
        """(C, T', h, w) of one clip of `frames` frames at `resolution`."""
        if resolution % self.downsample:
            raise ValueError(f"video: resolution {resolution} is not a multiple of the VAE's "
                             f"downsampling factor {self.downsample}")
        h = resolution // self.downsample
        return (self.latent_channels, frames, h, h)

    @torch.no_grad()
    def encode_moments(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, T, H, W) in [-1, 1] -> mean, logvar (N, C, T, h, w) fp32, unscaled."""
        N, _, T, H, W = clips.shape
        frames = clips.permute(0, 2, 1, 3, 4).reshape(N * T, 3, H, W)  # (N T, 3, H, W)
        mean, logvar = self.image.encode_moments(frames)  # (N T, C, h, w)
        return tuple(z.reshape(N, T, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()
                     for z in (mean, logvar))

    def sample(self, mean: torch.Tensor, logvar: torch.Tensor, generator=None) -> torch.Tensor:
        return self.image.sample(mean, logvar, generator)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Model-space latents (N, C, T, h, w) -> clips (N, 3, T, H, W) in [-1, 1], not clamped."""
        N, C, T, h, w = z.shape
        flat = z.permute(0, 2, 1, 3, 4).reshape(N * T, C, h, w)  # (N T, C, h, w)
        if self.kind == "image":
            x = self.image.decode(flat)  # (N T, 3, H, W)
        else:  # whole clips per call: the temporal decoder mixes the frames of one clip
            per = max(1, self.micro_batch // T) * T
            x = torch.cat([self.vae.decode(self.image.from_model(c).to(self.device, self.dtype),
                                           num_frames=T).sample.float().cpu()
                           for c in flat.split(per)])
        return x.reshape(N, T, *x.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()
