"""Full resumable training state, written atomically (docs/design.md, "Training").

Layout of `run_dir/checkpoints/`:
    step_00001000/   model.safetensors, ema.safetensors, optimizer.pt, state.json, rng_rank{r}.pt
    latest           text file naming the newest complete checkpoint
A checkpoint is written into a hidden temporary directory and renamed into place only when every
rank has finished writing; `latest` is replaced (write + rename) after that. A kill at any moment
leaves the previous checkpoint and pointer intact. Nothing here unpickles foreign code: tensors go
through safetensors and `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CKPT_DIR = "checkpoints"


def _contiguous(sd: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    # numpy's state is a tuple holding an ndarray; store it as plain lists for weights_only loading
    name, keys, pos, has_gauss, cached = st["numpy"]
    st["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    return st


def set_rng_state(st: dict):
    torch.set_rng_state(st["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in st["python"]))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _fault(stage: str):
    """Fault injection for the crash-safety tests: DCGEN_FAULT_KILL_CKPT=<stage> SIGKILLs the
    process at that point of a checkpoint write."""
    if os.environ.get("DCGEN_FAULT_KILL_CKPT") == stage:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(run_dir, step: int, model, ema, optimizer, state: dict, extra_rng: dict,
                    accelerator=None, keep: int = 2) -> Path:
    """Write the full state of `step`. Collective: every rank must call it."""
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    is_main = accelerator is None or accelerator.is_main_process
    rank = 0 if accelerator is None else accelerator.process_index
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(accelerator)
    torch.save({"global": rng_state(), **extra_rng}, tmp / f"rng_rank{rank}.pt")
    if is_main:
        save_file(_contiguous(model.state_dict()), tmp / "model.safetensors")
        _fault("after_model")
        save_file(_contiguous(ema.state_dict()), tmp / "ema.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        _fault("before_rename")
    _barrier(accelerator)
    if is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ptr_tmp = root / ".latest.tmp"
        ptr_tmp.write_text(final.name)
        os.replace(ptr_tmp, root / "latest")
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and p != final)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    _barrier(accelerator)
    return final


def _barrier(accelerator):
    if accelerator is not None:
        accelerator.wait_for_everyone()


def latest_checkpoint(run_dir) -> Path | None:
    root = Path(run_dir) / CKPT_DIR
    ptr = root / "latest"
    if not ptr.exists():
        return None
    path = root / ptr.read_text().strip()
    if not (path / "state.json").exists():
        raise ValueError(f"checkpoint pointer {ptr} names {path}, which is incomplete or missing")
    return path


def load_checkpoint(path, model, ema, optimizer, rank: int = 0) -> tuple[dict, dict]:
    """Restore model, EMA and optimizer in place; return (state.json, this rank's RNG dict)."""
    path = Path(path)
    try:
        model.load_state_dict(load_file(path / "model.safetensors"))
        ema.load_state_dict(load_file(path / "ema.safetensors"))
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not match the model: {str(e).splitlines()[0]}") from None
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    state = json.loads((path / "state.json").read_text())
    rng_file = path / f"rng_rank{rank}.pt"
    if not rng_file.exists():
        raise ValueError(f"{rng_file} missing: was this checkpoint written with another number of processes?")
    rng = torch.load(rng_file, weights_only=True)
    return state, rng
