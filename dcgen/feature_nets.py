"""Feature networks for Fréchet distances beyond FID: sFID's spatial Inception features (the ADM
evaluation suite) and any image encoder as a TorchScript file (FD-DINOv2 and the like).

Every distance goes through one function, `dcgen.metrics.fd_from_features` (torch-fidelity's
arithmetic; exact low-rank form for sets smaller than the feature size), so FID, sFID and FD on
another network differ only in their features.

sFID (Nash et al. 2021, used by ADM, DiT, SiT, REPA): the ADM suite reads the TF-FID graph's
tensor `mixed_6/conv:0`, keeps its first 7 channels and flattens the 17x17x7 map: 2023 features
per image, in (h, w, c) order. In the TF graph the 17x17 blocks are named mixed_4 ... mixed_7 after
the reduction block mixed_3, i.e. torch-fidelity's Mixed_6b ... Mixed_6e, so mixed_6 is Mixed_6d
and `mixed_6/conv` is its 1x1 branch (conv, batch norm, ReLU: the op named after the scope is the
ReLU). `SpatialInception` hooks that module of torch-fidelity's port. The layer is chosen by the
graph's naming, and the shape is the suite's; the values have not been compared with the
TensorFlow evaluator here (no network and no TensorFlow on this machine). A TorchScript
Inception (pool3 only) has no such layer: sFID then needs torch-fidelity's network.

FD on another encoder (Stein et al. 2023 recommend DINOv2 ViT-L/14): `TorchScriptFeatureNet`
takes a TorchScript file mapping (N, 3, S, S) floats to (N, d) features (export one with
`torch.jit.trace(model, torch.zeros(1, 3, 224, 224))`), resizes uint8 images to S (bicubic, with
antialiasing) and normalises them with the given mean/std (ImageNet's by default, as DINOv2
expects). The file's sha256 names the network in metrics.json. dcgen never downloads one.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
import torch.nn.functional as F

SFID_CHANNELS = 7
SFID_GRID = 17
SFID_FEATURES = SFID_CHANNELS * SFID_GRID * SFID_GRID  # 2023, the ADM suite's spatial feature size
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SpatialInception:
    """torch-fidelity's Inception with sFID's spatial features added: calling it on uint8
    (N, 3, H, W) returns the extractor's own features followed by "spatial" (N, 2023)."""

    def __init__(self, extractor):
        block = getattr(getattr(extractor, "Mixed_6d", None), "branch1x1", None)
        if block is None:
            raise ValueError("sFID needs torch-fidelity's Inception (a TorchScript pool3 file has no "
                             "mixed_6/conv layer); leave evaluate.inception_weights unset or give its "
                             "state-dict file")
        self.extractor = extractor
        self.features_list = (*extractor.features_list, "spatial")
        self._spatial = None
        block.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self._spatial = output

    def __call__(self, x: torch.Tensor):
        feats = self.extractor(x)
        s = self._spatial  # (N, 192, 17, 17)
        if s is None or tuple(s.shape[-2:]) != (SFID_GRID, SFID_GRID):
            raise ValueError(f"sFID: expected a 17x17 mixed_6/conv map, got {None if s is None else tuple(s.shape)}")
        spatial = s[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(s.shape[0], -1)  # (h, w, c) order
        self._spatial = None
        return (*feats, spatial.float())


class TorchScriptFeatureNet:
    """An image encoder from a TorchScript file: uint8 (N, 3, H, W) -> (N, d) features under the
    name `name` (the feature key and the metric `fd_<name>`)."""

    def __init__(self, path, name: str, size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 device="cpu"):
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"feature network {name}: no such file {path}")
        if not name.isidentifier():
            raise ValueError(f"feature network name must be an identifier (it names fd_<name>), got {name!r}")
        data = path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        try:
            self.net = torch.jit.load(io.BytesIO(data), map_location=device).eval()
        except Exception as e:
            raise ValueError(f"feature network {name}={path}: not a loadable TorchScript file "
                             f"({str(e).strip().splitlines()[0]})") from None
        self.name, self.path, self.size, self.device = name, path, int(size), device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.features_list = (name,)
        self.network = f"torchscript:{self.sha256[:16]}"

    def __call__(self, x: torch.Tensor):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"feature network {self.name}: expects uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        x = x.to(self.device, torch.float32) / 255.0
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        with torch.no_grad():
            f = self.net((x - self.mean) / self.std)
        if not torch.is_tensor(f) or f.dim() != 2 or f.shape[0] != x.shape[0]:
            got = tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
            raise ValueError(f"feature network {self.name}={self.path}: gives {got} for {x.shape[0]} images; "
                             "expected (N, d) features")
        return (f.float(),)

    def info(self) -> dict:
        return {"network": self.network, "sha256": self.sha256, "path": str(self.path), "size": self.size}


def parse_network(spec: str) -> tuple[str, str, int]:
    """"NAME=PATH[@SIZE]" -> (name, path, size); e.g. "dinov2=dinov2_vitl14.pt@224"."""
    name, sep, rest = str(spec).partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"evaluate.fd_networks entry {spec!r}: expected NAME=PATH[@SIZE] "
                         "(a TorchScript image encoder, e.g. dinov2=/models/dinov2_vitl14.pt@224)")
    path, at, size = rest.rpartition("@") if "@" in rest else (rest, "", "224")
    if not at:
        path = rest
    try:
        size_i = int(size)
    except ValueError:
        raise ValueError(f"evaluate.fd_networks entry {spec!r}: size {size!r} is not an integer") from None
    return name, path, size_i


__all__ = ["SFID_FEATURES", "SpatialInception", "TorchScriptFeatureNet", "parse_network"]
