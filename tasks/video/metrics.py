"""Video metrics: per-frame FID (torch-fidelity's Inception-v3) and FVD (an I3D TorchScript model).

Clips enter as uint8 (N, T, H, W, 3), the frames exactly as written to disk.

FVD follows the common `i3d_torchscript.pt` protocol (StyleGAN-V's TorchScript port of the
Kinetics-400 I3D, as used by universome/fvd-comparison): every frame resized with bilinear
interpolation (short side to 224, centre crop), mapped to [-1, 1], and passed as float
(N, 3, T, 224, 224) with `rescale=False, resize=False, return_features=True` -> (N, 400)
logits-layer features; the Fréchet distance of the two Gaussians is computed in float64.
Numbers are only comparable at the same clip count, frames, stride and resolution (the returned
protocol records them); the usual UCF-101 setting is 2048 clips of 16 frames.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("dcgen.metrics")


def as_uint8_clips(clips, what: str = "clips") -> np.ndarray:
    """(N, 3, T, H, W) floats in [-1, 1] or uint8 (N, T, H, W, 3) -> uint8 (N, T, H, W, 3)."""
    from .data import to_uint8_frames
    if hasattr(clips, "detach"):
        clips = clips.detach().cpu().numpy() if clips.dtype != torch.bfloat16 \
            else clips.detach().float().cpu().numpy()
    a = np.asarray(clips)
    if a.ndim != 5:
        raise ValueError(f"{what}: expected clips of rank 5, got shape {a.shape}")
    if a.dtype == np.uint8:
        if a.shape[-1] != 3:
            raise ValueError(f"{what}: uint8 clips must be (N, T, H, W, 3), got {a.shape}")
        return np.ascontiguousarray(a)
    if a.shape[1] != 3:
        raise ValueError(f"{what}: float clips must be (N, 3, T, H, W) in [-1, 1], got {a.shape}")
    return to_uint8_frames(a)


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------

def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


# The one Fréchet distance of dcgen (torch-fidelity's arithmetic, in float64), for FVD as for FID.
from dcgen.metrics import frechet_distance  # noqa: E402


# --------------------------------------------------------------------------------------------
# FVD
# --------------------------------------------------------------------------------------------

def load_i3d(path: str | Path, device="cpu") -> torch.jit.ScriptModule:
    """The I3D TorchScript detector (`i3d_torchscript.pt`). TorchScript, not a pickle: loading
    it runs no Python code from the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"FVD: I3D TorchScript model not found: {path} (the common "
                                f"i3d_torchscript.pt; see tasks/video/README.md)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
            model = torch.jit.load(str(path), map_location=device)
    except Exception as e:
        raise ValueError(f"FVD: {path} is not a TorchScript model: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                         ) from None
    return model.eval()


def i3d_input(clips_u8: np.ndarray, size: int = 224) -> torch.Tensor:
    """uint8 (N, T, H, W, 3) -> float (N, 3, T, size, size) in [-1, 1]: short side to `size`
    (bilinear, no antialias, as in the reference preprocessing), centre crop."""
    x = torch.from_numpy(np.ascontiguousarray(clips_u8)).float() / 255.0  # (N, T, H, W, 3)
    N, T, H, W, _ = x.shape
    x = x.permute(0, 1, 4, 2, 3).reshape(N * T, 3, H, W)
    scale = size / min(H, W)
    th, tw = (size, math.ceil(W * scale)) if H <= W else (math.ceil(H * scale), size)
    if (th, tw) != (H, W):
        x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)
    top, left = (th - size) // 2, (tw - size) // 2
    x = x[:, :, top:top + size, left:left + size]
    x = x.reshape(N, T, 3, size, size).permute(0, 2, 1, 3, 4)  # (N, 3, T, S, S)
    return ((x - 0.5) * 2.0).contiguous()


@torch.no_grad()
def i3d_features(model, clips_u8: np.ndarray, batch_size: int = 16, device="cpu",
                 size: int = 224) -> np.ndarray:
    """(N, D) float64 detector features (D = 400 for the Kinetics-400 I3D)."""
    feats = []
    for i in range(0, len(clips_u8), batch_size):
        x = i3d_input(clips_u8[i:i + batch_size], size).to(device)
        f = model(x, rescale=False, resize=False, return_features=True)
        if f.ndim != 2 or f.shape[0] != x.shape[0]:
            raise ValueError(f"FVD: the I3D model returned shape {tuple(f.shape)} for "
                             f"{x.shape[0]} clips; expected (N, D)")
        feats.append(f.double().cpu().numpy())
    return np.concatenate(feats)


def fvd(gen_u8: np.ndarray, ref_u8: np.ndarray, i3d_path: str | Path, batch_size: int = 16,
        device="cpu", size: int = 224) -> float:
    """Fréchet Video Distance between two sets of uint8 clips (N, T, H, W, 3)."""
    model = load_i3d(i3d_path, device)
    fg = i3d_features(model, gen_u8, batch_size, device, size)
    fr = i3d_features(model, ref_u8, batch_size, device, size)
    return frechet_distance(*gaussian_stats(fg), *gaussian_stats(fr))


# --------------------------------------------------------------------------------------------
# Per-frame FID (torch-fidelity)
# --------------------------------------------------------------------------------------------

class FrameDataset(torch.utils.data.Dataset):
    """Frames of uint8 clips as torch-fidelity wants them: uint8 (3, H, W)."""

    def __init__(self, clips_u8: np.ndarray, frames_per_clip: int | None = None):
        T = clips_u8.shape[1]
        k = T if frames_per_clip is None else min(int(frames_per_clip), T)
        self.t_idx = np.unique(np.linspace(0, T - 1, k).round().astype(int))
        self.clips = clips_u8

    def __len__(self) -> int:
        return len(self.clips) * len(self.t_idx)

    def __getitem__(self, i: int) -> torch.Tensor:
        c, t = divmod(i, len(self.t_idx))
        return torch.from_numpy(np.ascontiguousarray(self.clips[c, self.t_idx[t]])).permute(2, 0, 1)


def num_fid_frames(clips_u8: np.ndarray, frames_per_clip: int | None) -> int:
    return len(FrameDataset(clips_u8, frames_per_clip))


def check_inception_weights(path: str | Path) -> str:
    """torch-fidelity loads the file with `weights_only=False`; make sure first that it is a
    plain state dict (tensors only), so a foreign pickle never runs."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"FID: Inception weights not found: {path}")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"FID: {path} is not a plain state dict of tensors: "
                         f"{str(e).strip().splitlines()[0]}") from None
    if not isinstance(sd, dict) or "fc.weight" not in sd:
        raise ValueError(f"FID: {path} is not a torch-fidelity InceptionV3 state dict (no "
                         f"'fc.weight')")
    return str(path)


def frame_fid(gen_u8: np.ndarray, ref_u8: np.ndarray, inception_weights: str | Path | None,
              batch_size: int = 64, device="cpu", frames_per_clip: int | None = None,
              feature_layer: str = "2048") -> float:
    """FID between the frames of two clip sets, with torch-fidelity's `inception-v3-compat`
    (images resized to 299 inside the extractor). `feature_layer` "2048" (the pool features) is
    the FID everyone reports; "64"/"192"/"768" exist for quick smoke checks only.
    `inception_weights` None lets torch-fidelity download its weights."""
    import torch_fidelity
    kw = {}
    if inception_weights is not None:
        kw["feature_extractor_weights_path"] = check_inception_weights(inception_weights)
    out = torch_fidelity.calculate_metrics(
        input1=FrameDataset(gen_u8, frames_per_clip), input2=FrameDataset(ref_u8, frames_per_clip),
        fid=True, feature_extractor="inception-v3-compat", feature_layer_fid=str(feature_layer),
        batch_size=batch_size,
        cuda=torch.device(device).type == "cuda", cache=False, save_cpu_ram=True, verbose=False,
        **kw)
    return float(out["frechet_inception_distance"])
