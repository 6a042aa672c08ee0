"""Random numbers, in one place.

- Draws (`randn`, `rand`, `randint`) through an optional generator, made on the generator's own
  device and then moved: one CPU generator gives the same numbers whether the model runs on the
  CPU or a GPU (reproducible sample sets).
- Per-item seeds (`draw_seed`, `item_generator`): a function of (seed, purpose, item, epoch),
  never of the global RNG, so every process count, worker count and resume draws the same
  numbers (data augmentation, per-sample training noise, evaluation chunks).
- The process's global state (`rng_state`, `set_rng_state`, `check_rng_state`), saved with
  each checkpoint in a form `torch.load(weights_only=True)` reads.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Move a draw to `device`; a host draw goes to a GPU through pinned memory, non-blocking
    (a pageable copy would stall the host every sampling step)."""
    device = torch.device(device) if device is not None else t.device
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def randn(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal draw through `generator` if given (made on its device, then moved)."""
    gdev = generator.device if generator is not None else device
    return host_to_device(torch.randn(tuple(shape), generator=generator, device=gdev, dtype=dtype), device)


def rand(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) draw through `generator` if given (see `randn`)."""
    gdev = generator.device if generator is not None else device
    return host_to_device(torch.rand(tuple(shape), generator=generator, device=gdev, dtype=dtype), device)


def randint(high: int, shape, generator=None, device=None) -> torch.Tensor:
    """Uniform integers in [0, high) through `generator` if given (see `randn`)."""
    gdev = generator.device if generator is not None else device
    return host_to_device(torch.randint(0, high, tuple(shape), generator=generator, device=gdev), device)


def draw_seed(seed: int, purpose: str, item: int, epoch: int = 0) -> int:
    """A 63-bit seed for one item's draw. Hashing (rather than seed*K + item arithmetic) keeps
    streams of different seeds, items and epochs from colliding."""
    key = f"dcgen/{purpose}/{int(seed)}/{int(item)}/{int(epoch)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def item_generator(seed: int, purpose: str, item: int, epoch: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(draw_seed(seed, purpose, item, epoch))


def rng_state() -> dict:
    """The process's torch, Python, NumPy (and CUDA) generator states as tensors and lists."""
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    # numpy's state is a tuple holding an ndarray; store it as plain lists for weights_only loading
    name, keys, pos, has_gauss, cached = st["numpy"]
    st["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]
    return st


def _restore(st: dict, set_torch, py_random, np_random) -> None:
    """`st` (as `rng_state` returns it) into the given torch setter, Python and NumPy generators."""
    set_torch(st["torch"])
    py_random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in st["python"]))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np_random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def set_rng_state(st: dict):
    _restore(st, torch.set_rng_state, random, np.random)
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def check_rng_state(st) -> None:
    """Raise unless `st` (as `rng_state` returns it) restores into fresh generators, leaving the
    process's own untouched: a file that does not is damaged or crafted."""
    _restore(st, torch.Generator().set_state, random.Random(), np.random.RandomState())
