"""dcgen: Dynamic Chunking Diffusion Transformers (DC-DiT) on any token grid."""
__version__ = "0.1.0"


def load_model(path, device="cpu", dtype=None):
    """The model (EMA weights) of a run directory, an export directory (config.json +
    model.safetensors, or the older config.yaml layout) or a Hub id `owner/name`."""
    from .io import load_model as _load
    return _load(path, device=device, dtype=dtype)


def export_model(model, out_dir, extra=None):
    """Write `config.json` + `model.safetensors` (+ `dcgen.json` with `extra`) into `out_dir`,
    atomically: the Hugging Face layout."""
    from .io import export_model as _export
    return _export(model, out_dir, extra=extra)


__all__ = ["load_model", "export_model", "__version__"]
