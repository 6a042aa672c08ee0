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
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .files import fsync_dir, fsync_file
from .rng import check_rng_state, rng_state
from .run import Run
from .validate import one_line


def _contiguous(sd: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def _fault(stage: str):
    """Fault injection for the crash-safety tests: DCGEN_FAULT_KILL_CKPT=<stage> SIGKILLs the
    process at that point of a checkpoint write."""
    if os.environ.get("DCGEN_FAULT_KILL_CKPT") == stage:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions): its temporary folder is
    removed, the previous checkpoint is intact; the CLI reports one line and exits 2."""


def ranks_agree(state, ok: bool) -> bool:
    """True when `ok` is True on every process of `state` (an Accelerator or a PartialState, or
    None for one process): one tiny all-reduce, also a barrier. Every rank then takes the same
    branch, so none is left waiting at a collective behind a rank that failed."""
    if state is None or state.num_processes == 1:
        return ok
    from accelerate.utils import reduce
    flag = torch.tensor([0.0 if ok else 1.0], device=state.device)
    return float(reduce(flag, reduction="sum")[0]) == 0.0


def save_checkpoint(run_dir, step: int, model, ema, optimizer, state: dict, extra_rng: dict,
                    accelerator=None, keep: int = 2, keep_every: int = 0) -> Path:
    """Write the full state of `step`. Collective: every rank must call it. Every file is
    fsynced before the folder is renamed into place; a failed write (e.g. a full disk) on any
    rank removes the temporary folder and raises CheckpointWriteError on every rank. The newest
    `keep` checkpoints are kept, and with `keep_every` > 0 also every milestone whose step is a
    multiple of it."""
    root = Run(run_dir).checkpoints
    final = checkpoint_dir(run_dir, step)
    tmp = root / f".tmp_step_{step:08d}"
    is_main = accelerator is None or accelerator.is_main_process
    rank = 0 if accelerator is None else accelerator.process_index
    error = None
    if is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as e:
            error = e
    if not ranks_agree(accelerator, error is None):
        return _failed_save(tmp, is_main, error, step)
    written = []
    try:
        rng_file = tmp / f"rng_rank{rank}.pt"
        torch.save({"global": rng_state(), **extra_rng}, rng_file)
        written.append(rng_file)
        if is_main:
            save_file(_contiguous(model.state_dict()), tmp / "model.safetensors")
            _fault("after_model")
            save_file(_contiguous(ema.state_dict()), tmp / "ema.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
            written += [tmp / n for n in ("model.safetensors", "ema.safetensors", "optimizer.pt",
                                          "state.json")]
            _fault("before_rename")
        for f in written:
            fsync_file(f)
    except OSError as e:
        error = e
    if not ranks_agree(accelerator, error is None):
        return _failed_save(tmp, is_main, error, step)
    if is_main:
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ptr_tmp = root / ".latest.tmp"
        ptr_tmp.write_text(final.name)
        fsync_file(ptr_tmp)
        os.replace(ptr_tmp, root / "latest")
        fsync_dir(root)
        old = sorted(p for p in root.glob("step_*") if p.is_dir() and p != final)
        for p in old[: max(0, len(old) - (keep - 1))]:
            if keep_every and _step_of(p) > 0 and _step_of(p) % keep_every == 0:
                continue  # a milestone
            shutil.rmtree(p, ignore_errors=True)
    _barrier(accelerator)
    return final


def checkpoint_dir(run_dir, step: int) -> Path:
    """The folder of step `step`'s checkpoint in `run_dir` (kept or not)."""
    return Run(run_dir).checkpoint_dir(step)


def _failed_save(tmp: Path, is_main: bool, error, step: int):
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    why = f"{error.strerror or error}" if isinstance(error, OSError) else "a write failed on another process"
    where = f" ({error.filename})" if isinstance(error, OSError) and error.filename else ""
    raise CheckpointWriteError(f"cannot write the checkpoint of step {step}: {why}{where}; the "
                               "previous checkpoint is intact")


def _barrier(accelerator):
    if accelerator is not None:
        accelerator.wait_for_everyone()


def _pointed(root: Path, ptr: Path) -> Path:
    """The checkpoint folder `latest` names: a `step_NNNNNNNN` folder of this run, nothing else
    (a crafted pointer must not send a resume anywhere else)."""
    name = ptr.read_text().strip()
    if not re.fullmatch(r"step_\d{8}", name):
        raise ValueError(f"checkpoint pointer {ptr} names {name[:80]!r}, not a step_NNNNNNNN folder")
    return root / name


def latest_checkpoint(run_dir) -> Path | None:
    root = Run(run_dir).checkpoints
    ptr = root / "latest"
    if not ptr.exists():
        return None
    path = _pointed(root, ptr)
    if not (path / "state.json").exists():
        raise ValueError(f"checkpoint pointer {ptr} names {path}, which is incomplete or missing")
    return path


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def resume_candidates(run_dir) -> list[Path]:
    """The checkpoints a resume may use, newest first: the one `latest` names, then every older
    kept one (a folder only gets its step_* name once it is complete)."""
    root = Run(run_dir).checkpoints
    ptr = root / "latest"
    if not ptr.exists():
        return []
    named = _pointed(root, ptr)
    older = sorted((p for p in root.glob("step_*") if p.is_dir() and _step_of(p) < _step_of(named)),
                   key=_step_of, reverse=True)
    return [named, *older]


def read_checkpoint(path, model, ema, optimizer, rank: int = 0, world: int | None = None,
                    weights: bool = True, mmap: bool = False) -> dict:
    """Everything of one checkpoint read into memory and checked against the model, nothing
    applied yet: {"model", "ema", "optimizer", "state", "rng"}. Any damage (a torn or truncated
    file, a missing one, wrong keys or shapes) is a ValueError with one line.

    `weights` False skips model and EMA (a DDP rank other than 0: DDP broadcasts rank 0's
    parameters when it wraps the model, and only rank 0 keeps the EMA it saves and exports).
    `world`: the current number of processes; when it differs from the checkpoint's, there is no
    RNG state for this rank and "rng" is None (the caller re-derives it). `mmap`: map the
    optimizer file instead of reading it (the processes of one machine share its pages; for
    GPU training, where the state is copied to the device and the map released)."""
    from .io import check_state_dict
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        check_state(state)
        same_world = world is None or int(state.get("world", world)) == int(world)
        rng_file = path / f"rng_rank{rank}.pt"
        if same_world and not rng_file.exists():
            raise FileNotFoundError(f"{rng_file.name} missing")
        out = {"state": state,
               "optimizer": torch.load(path / "optimizer.pt", weights_only=True, mmap=mmap),
               "rng": torch.load(rng_file, weights_only=True) if same_world else None}
        if out["rng"] is not None:
            _check_rng(out["rng"])
        if not isinstance(out["optimizer"], dict) or not isinstance(out["optimizer"].get("param_groups"), list) \
                or not isinstance(out["optimizer"].get("state"), dict):
            raise ValueError("optimizer.pt is not an optimizer state dict")
        if weights:
            out["model"] = load_file(path / "model.safetensors")
            out["ema"] = load_file(path / "ema.safetensors")
    except Exception as e:  # a torn file fails in many ways (safetensors, zip, pickle, JSON, OS)
        raise ValueError(f"checkpoint {path} cannot be read: {type(e).__name__}: {one_line(e, 200)}") from None
    for key, module in (("model", model), ("ema", ema)) if weights else ():
        expected = {k: v.shape for k, v in module.state_dict().items()}
        check_state_dict(expected, out[key], f"{path / (key + '.safetensors')}")
    return out


def check_state(state) -> None:
    """state.json holds what the loop wrote: a step >= 0, and the process and thread counts."""
    from .validate import int_
    if not isinstance(state, dict) or not int_(0).check(state.get("step")):
        raise ValueError("state.json has no step (an integer >= 0)")
    for key in ("world", "num_threads"):
        if state.get(key) is not None and not int_(1).check(state[key]):
            raise ValueError(f"state.json: {key}={state[key]!r} is not an integer >= 1")


def _check_rng(rng) -> None:
    """The RNG file restores into fresh generators (not the process's own) first: a file that
    does not is damaged (or crafted), and resume falls back past it."""
    try:
        check_rng_state(rng["global"])
    except Exception as e:  # any malformed structure: a TypeError, KeyError, ValueError, ...
        raise ValueError(f"rng file does not restore ({type(e).__name__}: {str(e)[:100]})") from None


def resume(run_dir, model, ema, optimizer, rank: int = 0, accelerator=None, log=None):
    """Load the newest checkpoint of `run_dir` that every rank can read, falling back past a torn
    one to the previous kept checkpoint (said in one line each). Returns (path, state, rng), or
    None when the run has no checkpoint; a ValueError naming the newest one's damage when none
    loads. rng is None when the checkpoint was written by another number of processes.

    Under DDP only rank 0 reads the model and EMA files (DDP broadcasts rank 0's parameters when
    `accelerator.prepare` wraps the model; the EMA is saved and exported by rank 0 alone), and
    on GPUs the optimizer file is memory-mapped, so a node's processes share its pages."""
    candidates = resume_candidates(run_dir)
    world = 1 if accelerator is None else accelerator.num_processes
    weights = rank == 0 or world == 1
    mmap = accelerator is not None and accelerator.device.type == "cuda"
    newest_error = None
    for i, path in enumerate(candidates):
        try:
            data, error = read_checkpoint(path, model, ema, optimizer, rank, world, weights, mmap), None
        except ValueError as e:
            data, error = None, e
        if not ranks_agree(accelerator, error is None):
            error = error or ValueError(f"checkpoint {path} cannot be read on another process")
            newest_error = newest_error or error
            if log is not None and (accelerator is None or accelerator.is_main_process):
                nxt = candidates[i + 1] if i + 1 < len(candidates) else None
                log.warning("%s; %s", one_line(error),
                            f"falling back to {nxt}" if nxt else "no older checkpoint is kept")
            continue
        if weights:
            model.load_state_dict(data["model"])
            ema.load_state_dict(data["ema"])
        try:
            optimizer.load_state_dict(data["optimizer"])
        except Exception as e:  # a malformed state dict fails in many ways
            raise ValueError(f"checkpoint {path} does not match the optimizer: "
                             f"{type(e).__name__}: {one_line(e)}") from None
        return path, data["state"], data["rng"]
    if newest_error is not None:
        raise ValueError(f"no checkpoint of {run_dir} can be loaded; the newest: {one_line(newest_error)}")
    return None
