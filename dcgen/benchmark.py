"""DiT against DC-DiT on the current device: time, throughput, memory and where DC-DiT spends it.

    python tools/bench.py                                  # default CPU/CUDA run, ~8 min on 2 CPU cores
    python tools/bench.py --quick --out /tmp/b             # tiny models and grids, seconds (smoke test)
    python tools/bench.py --sizes B --grids 32x32,64x64 --profile   # + torch.profiler op tables
    python tools/bench.py --device cuda --dtype bf16 --time-budget 0 --repeats 10
    python tools/bench.py --render                         # re-render docs/performance.md from docs/bench/*.json
    python tools/bench.py --attn-only --threads 1 --tag attn   # only the attention-path check (~3 min on CPU)

What one run measures, for every size (S, B, ...) and grid (image 32x32 and 64x64, video 8x32x32,
voxel 32x32x32), DiT and DC-DiT at matched settings (DiT/2 sees L/prod(P) patches; DC-DiT keeps the
same fraction of its L grid tokens, see "Kept fraction" below):

  forward       train mode, autograd recording (the forward half of a training step)
  fwd+bwd       forward + backward of an MSE on the output (grads of every parameter)
  sample step   eval, no grad: one `GaussianDiffusion.p_mean_variance` (one forward + the DDPM
                posterior); DC-DiT at tail_drop 0 and 0.5
  throughput    samples/s and tokens/s (grid tokens L and backbone tokens) from the forward
  peak memory   CUDA: max_memory_allocated above the live set; CPU: growth of the process's peak
                RSS (VmHWM reset through /proc/self/clear_refs after malloc_trim), both taken on the
                warm-up call of each measurement
  breakdown     DC-DiT forward time per component (forward hooks with perf_counter on CPU, CUDA
                events on GPU; run during the timed forwards) plus direct timings of the packing pieces
                that live inside other modules (PackInfo, position-embedding gather, per-block adaLN
                gather, SDPA pad/unpad) and of the de-chunk pieces (scatter, separable smoothing,
                nearest-kept search, plug-back gather)
  backends      DC-DiT forward with every backend of dcgen.models.attention.available_backends(device)
  attention     the path `auto` chooses against per-sample (`loop`) and padded (`sdpa`) attention:
                DC-DiT-B forward (`--attn-size`) at 32x32 and 64x64 with fixed unequal kept counts
                (`--attn-lengths`, default 387/226 and 882/351, batch 2), every backend interleaved,
                medians of the paired per-round ratios; target: auto / loop <= 1 + noise, noise =
                max(3 %, two standard errors of that median, sigma = 1.4826 MAD of the paired
                ratios). `--attn-only` runs just this check.
  FLOPs         dcgen.flops.model_flops (METHOD §7.3 convention: FLOP = 2 MAC, residual_proj counted,
                de-chunk as the dense-equivalent M^2 D); fwd+bwd counted as 3x forward; time per GFLOP
                of DC-DiT against DiT

Timing: warm-up calls, then interleaved repeats (DiT, DC-DiT, DiT, ... so both see the same machine
load), median reported (and the minimum, the better estimate where other processes share the CPU).
Measurements behind a target keep a floor of repeats (forward and scale 3, fwd+bwd and sampling 2). A total `--time-budget` (default 480 s; 0 = none) caps the run: measurements
are ordered so the target grids (rank 2) come first, the number of repeats of a slow measurement is
cut to fit `--group-budget`, and a measurement whose estimated cost (counted FLOPs x the throughput
measured so far) no longer fits is skipped and listed as skipped in the output.

Kept fraction (`--kept-mode`): an untrained router keeps ~2 tokens, so DC-DiT would look free.
  mask (default)  a forward hook on the router replaces p by a fixed random target of the wanted
                  density (exact count per sample, corners forced, p in (0.5, 1) on kept and (0, 0.5)
                  elsewhere, so tail dropping ranks a realistic spread). The router still runs and
                  gets gradients: p = p_router + (p_target - p_router).detach().
  bias            the router's last conv bias is set so that the fraction of logits above 0 on the
                  benchmark input equals the target (natural per-sample variation, predictability
                  router only).
  The target defaults to 1/prod(DiT patch) (N = 4 against DiT/2 on images and (1,2,2)-patched video,
  N = 8 against isotropic /2 voxels); per-sample fractions spread by +-`--kept-spread` around it
  (mean exact) so the packed batch has unequal lengths, as a trained router gives.

CPU threads: `--threads auto` uses torch's default unless the 1-minute load average says other
processes already occupy the cores; then it uses fewer. On an oversubscribed CPU every OpenMP region
waits for a descheduled thread (a 200K-element add took 12 ms instead of 30 us here), which punishes
the many small ops of DC-DiT far more than DiT's large matmuls and makes the comparison meaningless.

Output: <out>/bench/<device>.json (one file per machine) and <out>/performance.md, rendered from
every JSON in <out>/bench/ (so CPU and GPU runs sit side by side), followed by the sections of
tools/gpu_check.py found in <out>/gpu_check/*.json.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from dcgen.chunking import grid as G
from dcgen.chunking.chunk import ChunkIndex, plug_back_rows
from dcgen.chunking.router import finish_probs
from dcgen.diffusion import GaussianDiffusion
from dcgen.flops import model_flops
from dcgen.models import DCDiT, build, config_node
from dcgen.chunking.router import RoutingModule
from dcgen.models.attention import PackInfo, available_backends, resolve_backend

SCHEMA = 1
TINY = {"T": (128, 2, 2)}  # --quick: D = 128 is the smallest width whose D/4 fits GroupNorm(32)
GRID_KINDS = {  # channels, DiT patch per axis (None: 2 on every axis)
    "seq": (4, None), "image": (4, None), "video": (4, "spatial"), "voxel": (1, None)}
TARGETS = {"efficiency": 1.10, "overhead": 0.10, "scale": 1.05, "sampling": 1.5}


# --------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def choose_threads(arg: str) -> tuple[int, str]:
    default = torch.get_num_threads()
    if arg != "auto":
        return int(arg), "set by --threads"
    load, cores = load_average(), os.cpu_count() or default
    if load is None:
        return default, "torch default"
    free = int(cores - load + 0.5)  # cores other processes leave idle
    if free >= default:
        return default, f"torch default (load average {load:.1f} on {cores} cores)"
    n = max(1, free)
    return n, (f"auto: load average {load:.1f} on {cores} cores leaves ~{max(free, 0)} idle; "
               f"{n} thread(s) instead of {default} avoids OpenMP stalls on descheduled threads")


def machine_info(dev: torch.device, dtype: str, threads_note: str) -> dict:
    info = {"device_type": dev.type, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "threads_note": threads_note,
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "load_average_start": load_average(),
            "dtype": dtype, "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if dev.type == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
        info["memory_GiB"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
    else:
        info["name"] = info["cpu"]
    return info


def device_slug(info: dict) -> str:
    return re.sub(r"[^a-z0-9]+", "-", f"{info['device_type']}-{info['name']}".lower()).strip("-")


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------

def sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


_LIBC = None


def _malloc_trim():
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:
        pass


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of one call above what was live before it (bytes; None if not measurable)."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.value: int | None = None

    def __enter__(self):
        gc.collect()
        if self.dev.type == "cuda":
            sync(self.dev)
            self.base = torch.cuda.memory_allocated(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
        else:
            _malloc_trim()  # hand freed heap back so RSS ~ the live set
            self.base = _proc_status_kib("VmRSS")
            try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            sync(self.dev)
            self.value = torch.cuda.max_memory_allocated(self.dev) - self.base
        elif self.base is not None:
            hwm = _proc_status_kib("VmHWM")
            self.value = None if hwm is None else max(0, hwm - self.base) * 1024
        return False


class Budget:
    """Wall-clock budget of the whole run; 0 = unlimited."""

    def __init__(self, total_s: float):
        self.total = total_s
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return math.inf if self.total <= 0 else self.total - self.elapsed()


@dataclass
class Plan:
    warmup: int
    repeats: int
    group_budget: float
    budget: Budget


def stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "repeats": len(times), "times_s": [round(t, 6) for t in times]}


def measure_group(fns: dict[str, Callable], dev: torch.device, plan: Plan, est_s: float,
                  on_call: Callable | None = None, min_repeats: int = 1) -> dict:
    """Time callables interleaved (a, b, a, b, ...): warm-up rounds, then timed rounds.

    est_s: estimated seconds of one round (all callables once), to skip what the budget cannot hold.
    Returns {"results": {name: stats | {"error": ...}}, "skipped": reason or None}.
    on_call(name, seconds, timed) runs after each call (used by the per-component timers).
    """
    remaining = plan.budget.remaining()
    min_repeats = min(min_repeats, plan.repeats)
    if est_s * (plan.warmup + min_repeats) > remaining:
        return {"results": {}, "skipped": f"time budget: estimated {est_s * (plan.warmup + min_repeats):.0f} s "
                                          f"> {max(remaining, 0):.0f} s left"}
    results: dict[str, dict] = {}
    live = dict(fns)
    mem: dict[str, int | None] = {}
    round_s = 0.0
    for w in range(max(1, plan.warmup)):
        round_s = 0.0
        for name, fn in list(live.items()):
            try:
                with PeakMemory(dev) as pm:
                    sync(dev)
                    t0 = time.perf_counter()
                    fn()
                    sync(dev)
                    dt = time.perf_counter() - t0
            except Exception as e:  # a backend that cannot run here: record, keep the others
                results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                del live[name]
                continue
            if w == 0:
                mem[name] = pm.value
            round_s += dt
            if on_call:
                on_call(name, dt, False)
    if not live:
        return {"results": results, "skipped": None}
    room = min(plan.group_budget, plan.budget.remaining())
    repeats = max(min_repeats, min(plan.repeats, int(room / max(round_s, 1e-9))))
    times: dict[str, list[float]] = {k: [] for k in live}
    for _ in range(repeats):
        for name, fn in live.items():
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            dt = time.perf_counter() - t0
            times[name].append(dt)
            if on_call:
                on_call(name, dt, True)
    for name in live:
        results[name] = stats(times[name])
        results[name]["peak_mem_bytes"] = mem.get(name)
    return {"results": results, "skipped": None}


def time_piece(fn: Callable, dev: torch.device, repeats: int = 7, max_s: float = 2.0) -> tuple[float, float]:
    """(median, min) seconds of a small piece (one warm-up call; up to `repeats` timed calls in max_s)."""
    fn()
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - t_start < max_s):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


# --------------------------------------------------------------------------------------------
# Grids, models, inputs
# --------------------------------------------------------------------------------------------

@dataclass
class GridSpec:
    kind: str
    grid: tuple[int, ...]
    channels: int
    dit_patch: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.kind}:{'x'.join(map(str, self.grid))}"

    @property
    def L(self) -> int:
        return math.prod(self.grid)


def parse_grid(text: str) -> GridSpec:
    """'32x32', 'image:64x64', 'video:8x32x32', 'voxel:32x32x32', 'seq:256'."""
    kind, _, dims = text.strip().rpartition(":")
    try:
        grid = G.check_grid([int(d) for d in dims.lower().split("x")])
    except ValueError as e:
        raise ValueError(f"--grids: cannot read grid {text!r}: {e}") from None
    kind = kind or {1: "seq", 2: "image", 3: "video"}[len(grid)]
    if kind not in GRID_KINDS:
        raise ValueError(f"--grids: unknown grid kind {kind!r} in {text!r} (valid: {', '.join(GRID_KINDS)})")
    channels, patch_rule = GRID_KINDS[kind]
    if patch_rule == "spatial":  # video: patch space, not time (a (1, 2, 2) DiT/2)
        patch = (1,) * (len(grid) - 2) + (2, 2)
    else:
        patch = (2,) * len(grid)
    if any(g % p for g, p in zip(grid, patch)):
        raise ValueError(f"--grids: {text!r} is not divisible by the DiT patch {patch}")
    return GridSpec(kind, grid, channels, patch)


PAPER_SIZE_NAMES = ("S", "B", "L", "XL")


def size_dims(size: str) -> tuple[int, int, int]:
    """(hidden, depth, heads) of a size: the paper sizes come from configs/model/dcdit_<s>.yaml."""
    if size in PAPER_SIZE_NAMES:
        with torch.device("meta"):
            cfg = build(config_node(f"dcdit_{size.lower()}"), input_size=[8, 8], in_channels=4,
                        num_classes=1000).config
        return cfg["hidden_size"], cfg["depth"], cfg["num_heads"]
    if size in TINY:
        return TINY[size]
    raise ValueError(f"--sizes: unknown size {size!r} (valid: {', '.join([*PAPER_SIZE_NAMES, *TINY])})")


def build_models(size: str, spec: GridSpec, dev: torch.device, backend: str = "auto"):
    D, depth, heads = size_dims(size)
    common = dict(input_size=spec.grid, in_channels=spec.channels, num_classes=1000,
                  hidden_size=D, depth=depth, num_heads=heads)
    torch.manual_seed(0)
    dit = build({"_target_": "dcgen.models.DiT", "patch_size": list(spec.dit_patch), **common}).to(dev)
    dc = build({"_target_": "dcgen.models.DCDiT", "attn_backend": backend, **common}).to(dev)
    return dit, dc


def set_backend(model, backend: str):
    for blk in model.blocks:
        blk.attn.backend = backend


def kept_fractions(target: float, spread: float, batch: int) -> list[float]:
    """Per-sample kept fractions with mean exactly `target`, spread +-spread*target."""
    if batch == 1:
        return [target]
    return [target * (1 + spread * (2 * i / (batch - 1) - 1)) for i in range(batch)]


def fixed_target_probs(grid, fracs: list[float], seed: int = 0) -> torch.Tensor:
    """(B, L) fp32 target p: exactly round(f_b L) positions (corners included) above 0.5."""
    L = math.prod(grid)
    corners = list(G.corner_indices(grid))
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for f in fracs:
        k = min(L, max(len(corners), round(f * L)))
        rest = torch.tensor([i for i in range(L) if i not in corners])
        pick = rest[torch.randperm(rest.numel(), generator=gen)[:k - len(corners)]]
        u = torch.rand(L, generator=gen) * 0.49 + 0.005  # (0.005, 0.495): strictly below 0.5
        u[pick] += 0.5
        u[corners] = 1.0
        rows.append(u)
    return torch.stack(rows)


class KeptFraction:
    """Force a realistic kept fraction on an untrained DC-DiT (see the module docstring)."""

    def __init__(self, model: DCDiT, mode: str, fracs: list[float], x, t, y):
        self.mode, self.handle = mode, None
        grid = tuple(model.token_grid)
        if mode == "mask":
            target = fixed_target_probs(grid, fracs).to(x.device)

            def hook(module, args, out):
                if out.boundary_prob.shape != target.shape:  # e.g. a CFG batch: repeat the rows
                    reps = out.boundary_prob.shape[0] // target.shape[0]
                    tgt = target.repeat(reps, 1)
                else:
                    tgt = target
                p = out.boundary_prob
                return finish_probs(p + (tgt - p).detach(), grid)
            self.handle = model.router.register_forward_hook(hook)
        elif mode == "bias":
            if not isinstance(model.router, RoutingModule):
                raise ValueError("--kept-mode bias needs the predictability router")
            conv = model.router.residual_scorer[-1]  # the 1x1 conv to one logit
            logits = []
            h = conv.register_forward_hook(lambda m, a, o: logits.append((o - m.bias).flatten()))
            with torch.no_grad():
                model(x, t, y)
            h.remove()
            f = sum(fracs) / len(fracs)
            with torch.no_grad():
                conv.bias.fill_(-float(torch.quantile(logits[0].float().cpu(), 1 - f)))
        else:
            raise ValueError(f"--kept-mode must be 'mask' or 'bias', got {mode!r}")

    def remove(self):
        if self.handle is not None:
            self.handle.remove()


# --------------------------------------------------------------------------------------------
# Per-component timing of a forward (hooks)
# --------------------------------------------------------------------------------------------

DC_COMPONENTS = {"embed": ["x_embedder"], "encoder": ["encoder"], "residual_proj": ["residual_proj"],
                 "router": ["router"], "chunk": ["chunk"], "backbone": ["blocks", "backbone_norm"],
                 "dechunk": ["dechunk"], "decoder": ["decoder"], "final": ["final_layer"]}
DIT_COMPONENTS = {"embed": ["x_embedder"], "backbone": ["blocks"], "final": ["final_layer"]}


def _clock(dev: torch.device):
    """A timestamp: perf_counter on CPU (ops are synchronous), a recorded CUDA event on GPU."""
    if dev.type == "cuda":
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev
    return time.perf_counter()


def _span_seconds(spans, dev: torch.device) -> float:
    if dev.type == "cuda":
        return sum(a.elapsed_time(b) for a, b in spans) / 1e3
    return sum(b - a for a, b in spans)


class AttentionClock:
    """Times the attention kernels themselves by wrapping them while active: torch SDPA (dense DiT,
    the `sdpa` and `loop` backends), torch varlen_attn (`native`) and xformers (`xformers`). The
    wrapped functions are looked up at call time by dcgen, so nothing in dcgen changes."""

    def __init__(self, dev: torch.device):
        self.dev, self.spans, self.saved = dev, [], []
        self.targets = [(F, "scaled_dot_product_attention")]
        for modname, attr in (("torch.nn.attention.varlen", "varlen_attn"),
                              ("xformers.ops", "memory_efficient_attention")):
            try:
                mod = __import__(modname, fromlist=[attr])
                if hasattr(mod, attr):
                    self.targets.append((mod, attr))
            except Exception:
                pass

    def __enter__(self):
        for mod, attr in self.targets:
            fn = getattr(mod, attr)
            self.saved.append((mod, attr, fn))

            def wrapped(*a, _fn=fn, **k):
                t0 = _clock(self.dev)
                out = _fn(*a, **k)
                self.spans.append((t0, _clock(self.dev)))
                return out
            setattr(mod, attr, wrapped)
        return self

    def __exit__(self, *exc):
        for mod, attr, fn in self.saved:
            setattr(mod, attr, fn)
        self.saved = []
        return False

    def take(self) -> list:
        spans, self.spans = self.spans, []
        return spans


class ComponentTimer:
    """Seconds spent inside groups of submodules during each forward (pre/post forward hooks),
    plus the attention kernels (`attn_kernel`, nested inside `backbone`) when given a clock.

    CPU: perf_counter (ops are synchronous). CUDA: events, read after the pass (no extra sync)."""

    def __init__(self, model, groups: dict[str, list[str]], dev: torch.device,
                 attn: AttentionClock | None = None):
        self.dev, self.handles, self.attn = dev, [], attn
        self.groups = list(groups)
        self.current: dict[str, list] = {g: [] for g in groups}
        self.passes: list[dict[str, float]] = []
        self.open: dict[int, object] = {}
        for g, names in groups.items():
            for name in names:
                mod = getattr(model, name)
                mods = list(mod) if isinstance(mod, torch.nn.ModuleList) else [mod]
                for m in mods:
                    self.handles.append(m.register_forward_pre_hook(self._pre(g, m)))
                    self.handles.append(m.register_forward_hook(self._post(g, m)))

    def _now(self):
        return _clock(self.dev)

    def _pre(self, g, m):
        def hook(module, args):
            self.open[id(m)] = self._now()
        return hook

    def _post(self, g, m):
        def hook(module, args, out):
            self.current[g].append((self.open.pop(id(m)), self._now()))
        return hook

    def end_pass(self, keep: bool):
        attn = self.attn.take() if self.attn is not None else []
        if keep:
            sync(self.dev)
            row = {g: _span_seconds(spans, self.dev) for g, spans in self.current.items()}
            if self.attn is not None:
                row["attn_kernel"] = _span_seconds(attn, self.dev)
            self.passes.append(row)
        self.current = {g: [] for g in self.groups}

    def summary(self, totals: list[float]) -> dict:
        """Median seconds and median share of the forward per group, over the kept passes."""
        keys = list(self.passes[0]) if self.passes else []
        fastest = min(range(len(totals)), key=totals.__getitem__) if totals else None
        return {"components_s": {k: statistics.median(p[k] for p in self.passes) for k in keys},
                "components_share": {k: statistics.median(p[k] / t for p, t in zip(self.passes, totals))
                                     for k in keys},
                "components_fastest_pass_s": self.passes[fastest] if fastest is not None else {}}

    def remove(self):
        for h in self.handles:
            h.remove()


class Capture:
    """Grab the chunk and de-chunk inputs/outputs and the first block's (c, PackInfo) in one forward."""

    def __init__(self, model: DCDiT):
        self.data: dict = {}
        self.handles = [
            model.chunk.register_forward_hook(lambda m, a, o: self.data.update(e=a[0], chunk_out=o)),
            model.dechunk.register_forward_hook(lambda m, a, o: self.data.update(dechunk_in=a)),
            model.blocks[0].register_forward_hook(lambda m, a, o: self.data.update(c=a[1], pack=a[2])),
        ]

    def remove(self):
        for h in self.handles:
            h.remove()


def packing_pieces(dc: DCDiT, x, t, y, dev: torch.device, autocast) -> dict[str, float]:
    """Direct timings (seconds per forward) of the packing and de-chunk pieces, same inputs as the
    benchmarked forward. Keys prefixed pack.* sit outside router/chunk/dechunk modules."""
    cap = Capture(dc)
    with autocast():
        dc(x, t, y)
    cap.remove()
    d = cap.data
    e, (z_chunk, idx) = d["e"], d["chunk_out"]
    z, _, p = d["dechunk_in"]  # backbone output, the same ChunkIndex, boundary_prob
    grid, B, L = idx.grid, *idx.kept_mask.shape
    depth = len(dc.blocks)
    blk = dc.blocks[0]
    H = blk.attn.num_heads
    T, D = z_chunk.shape
    out: dict[str, float] = {}
    mins: dict[str, float] = {}

    def put(name, fn, mult=1):
        try:
            med, mn = time_piece(fn, dev)
            out[name], mins[name] = mult * med, mult * mn
        except Exception as exc:  # an API the lead has since changed: report, do not crash
            out[name] = float("nan")
            out.setdefault("_errors", {})[name] = f"{type(exc).__name__}: {exc}"[:200]

    # chunk layer pieces (inside the `chunk` hook)
    put("chunk.from_mask", lambda: ChunkIndex.from_mask(idx.kept_mask, grid))
    put("chunk.gather", lambda: e.reshape(B * L, -1)[idx.flat_idx])
    # packing pieces that run inside the backbone (outside the router/chunk/dechunk hooks)
    put("pack.packinfo", lambda: [idx.padded_rows, idx.key_padding])
    put("pack.pos_embed", lambda: z_chunk + dc.pos_embed[idx.pos_idx].to(z_chunk.dtype))
    with autocast():
        mod = blk.adaLN_modulation(d["c"])
    put("pack.adaln_gather", lambda: mod[d["pack"].batch_idx], depth)
    pack = d["pack"]
    with autocast():
        qkv = blk.attn.qkv(z_chunk)
    q, k, v = qkv.view(T, 3, H, D // H).unbind(1)
    backend = resolve_backend(blk.attn.backend, q, pack)
    M = pack.max_seqlen
    rows = pack.padded_rows

    def padq(tn):
        return tn.new_zeros(B * M, H, D // H).index_copy(0, rows, tn).view(B, M, H, D // H).transpose(1, 2)

    if backend == "sdpa":  # what varlen_attention adds around the kernel: 3 pads, 1 unpad
        qp = padq(q)
        put("pack.sdpa_pad_unpad", lambda: [padq(q), padq(k), padq(v),
                                            qp.transpose(1, 2).reshape(B * M, H, D // H)[rows]], depth)
    # de-chunk pieces (inside the `dechunk` hook), mirroring DeChunkLayer.forward
    sig = G.per_axis(dc.dechunk.sigma, len(grid), "sigma")
    zf = z.float()
    p_hat = p.float().clamp(1e-4, 1 - 1e-4).reshape(-1)[idx.flat_idx]
    src = torch.cat([zf * p_hat[:, None], p_hat[:, None]], dim=1)
    canvas = zf.new_zeros(B * L, D + 1).index_copy(0, idx.flat_idx, src)
    put("dechunk.scatter", lambda: zf.new_zeros(B * L, D + 1).index_copy(
        0, idx.flat_idx, torch.cat([zf * p_hat[:, None], p_hat[:, None]], dim=1)))
    put("dechunk.smooth", lambda: G.separable_gaussian(canvas.view(B, L, D + 1), grid, sig))
    smooth = G.separable_gaussian(canvas.view(B, L, D + 1), grid, sig).reshape(B * L, D + 1)

    def blend():
        s = smooth[idx.flat_idx]
        ht = s[:, :D] / (s[:, D:] + 1e-8)
        return p_hat[:, None] * zf + (1 - p_hat[:, None]) * ht
    put("dechunk.gather_blend", blend)
    put("dechunk.nearest", lambda: G.nearest_kept_source(idx.kept_mask, grid, dc.dechunk.plug_weights))
    put("dechunk.plug_rows_total", lambda: plug_back_rows(idx, dc.dechunk.plug_weights))
    rows_pb = plug_back_rows(idx, dc.dechunk.plug_weights)
    o = blend()
    put("dechunk.plug_gather", lambda: o[rows_pb].view(B, L, D))
    out["_min"] = mins
    out["_meta"] = {"backend": backend, "T": T, "B": B, "M_max": M,
                    "padding_fraction": 1 - T / (B * M) if B * M else 0.0,
                    "attn_pad_waste": 1 - sum(m * m for m in pack.kept_counts_host) / (B * M * M) if M else 0.0}
    return out


# --------------------------------------------------------------------------------------------
# One (size, grid) configuration
# --------------------------------------------------------------------------------------------

class Rates:
    """Seconds per counted MAC seen so far, by kind, to estimate what a measurement will cost."""

    def __init__(self, dev: torch.device):
        self.rate: dict[str, float] = {}
        self.default = self._calibrate(dev)

    @staticmethod
    def _calibrate(dev) -> float:
        a = torch.randn(512, 768, device=dev)
        w = torch.randn(768, 3072, device=dev)
        for _ in range(2):
            a @ w
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(3):
            a @ w
        sync(dev)
        return (time.perf_counter() - t0) / (3 * 512 * 768 * 3072)

    def get(self, kind: str) -> float:
        if kind in self.rate:
            return self.rate[kind]
        if "fwd" in self.rate:
            return self.rate["fwd"]
        return 2.0 * self.default  # models run below matmul peak

    def update(self, kind: str, seconds: float, macs: float):
        if macs > 0:  # the latest config is the best guess for the next (sizes grow)
            self.rate[kind] = seconds / macs


def macs_of(model, aux, batch) -> dict:
    if isinstance(model, DCDiT):
        counts = aux[0].kept_counts
        ref = model_flops(model, kept_counts=counts)
        exe = model_flops(model, kept_counts=counts, dechunk="executed")
        return {"macs": ref["total"], "macs_executed": exe["total"],
                "components": {k: v for k, v in ref.items() if k != "total"},
                "kept": [int(c) for c in counts.tolist()]}
    ref = model_flops(model, batch=batch)
    return {"macs": ref["total"], "macs_executed": ref["total"],
            "components": {k: v for k, v in ref.items() if k != "total"}}


@dataclass
class Setup:
    """Models, inputs and closures of one (size, grid, batch) configuration."""

    size: str
    spec: GridSpec
    batch: int
    dit: DiT
    dc: DCDiT
    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    fracs: list[float]
    use_bf16: bool
    dev: torch.device

    def autocast(self):
        return (torch.autocast(self.dev.type, dtype=torch.bfloat16) if self.use_bf16
                else contextlib.nullcontext())

    def fwd(self, model):
        def run():
            model.train()
            with self.autocast():
                model(self.x, self.t, self.y)
        return run


def make_setup(size: str, spec: GridSpec, batch: int, args, dev: torch.device) -> Setup:
    dit, dc = build_models(size, spec, dev)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, spec.channels, *spec.grid, generator=gen).to(dev)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(dev)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(dev)
    target = args.kept if args.kept is not None else 1.0 / math.prod(spec.dit_patch)
    return Setup(size, spec, batch, dit, dc, x, t, y, kept_fractions(target, args.kept_spread, batch),
                 args.dtype == "bf16", dev)


def timed_forwards(models: dict, fns: dict, dev, plan: Plan, est_s: float, min_repeats: int = 1) -> dict:
    """Interleaved forwards with per-component hooks and the attention-kernel clock."""
    clock = AttentionClock(dev)
    timers = {name: ComponentTimer(m, DC_COMPONENTS if isinstance(m, DCDiT) else DIT_COMPONENTS, dev, clock)
              for name, m in models.items()}
    try:
        with clock:
            g = measure_group(fns, dev, plan, est_s, min_repeats=min_repeats,
                              on_call=lambda name, dt, timed: timers[name].end_pass(timed))
    finally:
        for tm in timers.values():
            tm.remove()
    for name, r in g["results"].items():
        if "median_s" in r and timers[name].passes:
            r.update(timers[name].summary(r["times_s"]))
    return g


def bench_config(size: str, spec: GridSpec, batch: int, args, dev: torch.device, plan: Plan,
                 rates: Rates, log) -> dict:
    res: dict = {"size": size, "grid": spec.name, "grid_shape": list(spec.grid), "kind": spec.kind,
                 "L": spec.L, "batch": batch, "channels": spec.channels, "dit_patch": list(spec.dit_patch),
                 "skipped": {}}
    st = make_setup(size, spec, batch, args, dev)
    dit, dc, x, t, y, autocast = st.dit, st.dc, st.x, st.t, st.y, st.autocast
    # what the forwards will cost, before spending anything on this configuration
    est = {"dit": model_flops(dit, batch=batch)["total"],
           "dcdit": model_flops(dc, kept_counts=[round(f * spec.L) for f in st.fracs])["total"]}
    need = (sum(est.values()) * (plan.warmup + min(3, plan.repeats)) + 2 * est["dcdit"]) * rates.get("fwd")
    if need > plan.budget.remaining():
        res["skipped"]["all"] = f"time budget: estimated {need:.0f} s > {max(plan.budget.remaining(), 0):.0f} s left"
        return res

    kept = KeptFraction(dc, args.kept_mode, st.fracs, x, t, y)
    with torch.no_grad(), autocast():
        _, aux = dc(x, t, y)
        _, aux_half = dc(x, t, y, tail_drop=0.5)
    flops = {"dit": macs_of(dit, [], batch), "dcdit": macs_of(dc, aux, batch),
             "dcdit_rho0.5": macs_of(dc, aux_half, batch)}
    res.update(kept_target=sum(st.fracs) / batch, kept_mode=args.kept_mode, kept_fraction_mean=
               sum(flops["dcdit"]["kept"]) / (batch * spec.L), flops=flops,
               backbone_tokens={"dit": batch * spec.L // math.prod(spec.dit_patch),
                                "dcdit": sum(flops["dcdit"]["kept"]),
                                "dcdit_rho0.5": sum(flops["dcdit_rho0.5"]["kept"])})
    macs = {"dit": flops["dit"]["macs"], "dcdit": flops["dcdit"]["macs"]}
    gen = torch.Generator().manual_seed(2)
    target_out = torch.randn(batch, 2 * spec.channels, *spec.grid, generator=gen).to(dev)
    fwd = st.fwd

    def fwdbwd(model):
        def run():
            model.train()
            model.zero_grad(set_to_none=True)
            with autocast():
                out, _ = model(x, t, y)
                loss = (out.float() - target_out).square().mean()
            loss.backward()
        return run

    diff = GaussianDiffusion().respaced(250)
    t_step = torch.full((batch,), 125, dtype=torch.long, device=dev)

    def step(model, rho):
        def run():
            model.eval()
            with torch.no_grad(), autocast():
                net = model if rho is None else (lambda *a, **k: model(*a, tail_drop=rho, **k))
                diff.p_mean_variance(net, x, t_step, y)
        return run

    # 1. forward (per-component hooks and the attention-kernel clock on both models)
    log("  forward")
    g = timed_forwards({"dit": dit, "dcdit": dc}, {"dit": fwd(dit), "dcdit": fwd(dc)}, dev, plan,
                       sum(macs.values()) * rates.get("fwd"), min_repeats=3)
    res["forward"] = g["results"]
    if g["skipped"]:
        res["skipped"]["forward"] = g["skipped"]
        kept.remove()
        return res
    if "median_s" in g["results"].get("dcdit", {}):
        rates.update("fwd", g["results"]["dcdit"]["median_s"], macs["dcdit"])

    # 2. the packing / de-chunk pieces (direct calls, same inputs)
    log("  pieces")
    dc.train()
    try:
        with torch.enable_grad():
            res["pieces_s"] = packing_pieces(dc, x, t, y, dev, autocast)
    except Exception as e:
        res["pieces_s"] = {"_errors": {"all": f"{type(e).__name__}: {e}"[:300]}}

    # 3. sampling step (eval, no grad), DC-DiT at tail_drop 0 and 0.5
    log("  sampling step")
    step_macs = macs["dit"] + macs["dcdit"] + flops["dcdit_rho0.5"]["macs"]
    g = measure_group({"dit": step(dit, None), "dcdit": step(dc, 0.0), "dcdit_rho0.5": step(dc, 0.5)},
                      dev, plan, step_macs * rates.get("step"), min_repeats=2)
    res["sample_step"] = g["results"]
    if g["skipped"]:
        res["skipped"]["sample_step"] = g["skipped"]
    elif "median_s" in g["results"].get("dcdit", {}):
        rates.update("step", g["results"]["dcdit"]["median_s"], macs["dcdit"])

    # 4. forward + backward
    log("  forward+backward")
    g = measure_group({"dit": fwdbwd(dit), "dcdit": fwdbwd(dc)}, dev, plan,
                      3 * sum(macs.values()) * rates.get("fwdbwd"), min_repeats=2)
    res["fwd_bwd"] = g["results"]
    if g["skipped"]:
        res["skipped"]["fwd_bwd"] = g["skipped"]
    elif "median_s" in g["results"].get("dcdit", {}):
        rates.update("fwdbwd", g["results"]["dcdit"]["median_s"], 3 * macs["dcdit"])
    dit.zero_grad(set_to_none=True)
    dc.zero_grad(set_to_none=True)

    # 5. attention backends (DC-DiT forward)
    backends = available_backends(dev)
    log(f"  backends {backends}")

    def fwd_backend(b):
        def run():
            set_backend(dc, b)
            try:
                fwd(dc)()
            finally:
                set_backend(dc, "auto")
        return run
    clock = AttentionClock(dev)
    attn: dict[str, list[float]] = {b: [] for b in backends}

    def on_call(name, dt, timed):
        spans = clock.take()
        if timed:
            attn[name].append(_span_seconds(spans, dev))
    with clock:
        g = measure_group({b: fwd_backend(b) for b in backends}, dev, plan,
                          len(backends) * macs["dcdit"] * rates.get("fwd"), on_call=on_call)
    for b, r in g["results"].items():
        if "median_s" in r:
            r["attn_kernel_s"] = statistics.median(attn[b])
    res["backends"] = g["results"]
    res["backends_auto"] = resolve_backend("auto", torch.empty(0, device=dev,
                                           dtype=torch.bfloat16 if st.use_bf16 else torch.float32),
                                           PackInfo.from_lengths(flops["dcdit"]["kept"]))
    if g["skipped"]:
        res["skipped"]["backends"] = g["skipped"]

    # 6. optional op-level profile of one DC-DiT forward
    if args.profile and plan.budget.remaining() > 2 * macs["dcdit"] * rates.get("fwd"):
        log("  profile")
        res["profile"] = profile_forward(dc, x, t, y, dev, autocast, args.profile_rows)
    kept.remove()
    del dit, dc
    gc.collect()
    return res


def parse_attn_lengths(text: str) -> list[tuple[GridSpec, list[int]]]:
    """'32x32:387,226;64x64:882,351' -> [(grid, kept counts per sample), ...]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        grid_s, _, counts = part.rpartition(":")
        if not grid_s or not counts:
            raise ValueError(f"--attn-lengths: expected GRID:M1,M2[,...], got {part!r}")
        spec = parse_grid(grid_s)
        lengths = [int(c) for c in counts.split(",")]
        if any(not 2 <= m <= spec.L for m in lengths):
            raise ValueError(f"--attn-lengths: kept counts {lengths} must lie in [2, {spec.L}] for {spec.name}")
        out.append((spec, lengths))
    return out


ATTN_NOISE_FLOOR = 0.03  # the smallest relative difference a CPU timing resolves here


def bench_attention_choice(size: str, spec: GridSpec, lengths: list[int], args, dev: torch.device,
                           plan: Plan, rates: Rates, log) -> dict:
    """DC-DiT forward with exactly `lengths` kept tokens per sample: the path `auto` takes against
    per-sample attention (`loop`) and padded `sdpa` (and the CUDA kernels), interleaved repeats."""
    B = len(lengths)
    res: dict = {"size": size, "grid": spec.name, "L": spec.L, "lengths": list(lengths), "batch": B}
    D, depth, heads = size_dims(size)
    torch.manual_seed(0)
    dc = build({"_target_": "dcgen.models.DCDiT", "input_size": list(spec.grid), "in_channels": spec.channels,
                "num_classes": 1000, "hidden_size": D, "depth": depth, "num_heads": heads}).to(dev)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, spec.channels, *spec.grid, generator=gen).to(dev)
    t = torch.randint(0, 1000, (B,), generator=gen).to(dev)
    y = torch.randint(0, 1000, (B,), generator=gen).to(dev)
    use_bf16 = args.dtype == "bf16"
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    kept = KeptFraction(dc, "mask", [m / spec.L for m in lengths], x, t, y)
    try:
        with torch.no_grad(), autocast():
            _, aux = dc(x, t, y)
        res["kept"] = aux[0].kept_counts.tolist()
        pack = PackInfo.from_lengths(res["kept"], device=dev)
        q = torch.empty(0, device=dev, dtype=torch.bfloat16 if use_bf16 else torch.float32)
        res["auto"] = resolve_backend("auto", q, pack)
        res["pad_waste"] = pack.pad_waste
        names = ["auto", "loop", "sdpa"] + [b for b in available_backends(dev) if b not in ("loop", "sdpa")]
        log(f"[{plan.budget.elapsed():5.0f} s] attention choice DC-DiT-{size} {spec.name} kept {res['kept']}: "
            f"auto -> {res['auto']}")

        def fwd(b):
            def run():
                set_backend(dc, b)
                try:
                    dc.train()
                    with autocast():
                        dc(x, t, y)
                finally:
                    set_backend(dc, "auto")
            return run
        macs = model_flops(dc, kept_counts=res["kept"])["total"]
        sub = Plan(plan.warmup, max(plan.repeats, args.attn_repeats), math.inf, plan.budget)
        g = measure_group({b: fwd(b) for b in names}, dev, sub, len(names) * macs * rates.get("fwd"),
                          min_repeats=args.attn_repeats)
    finally:
        kept.remove()
    res["forward"] = g["results"]
    if g["skipped"]:
        res["skipped"] = g["skipped"]
        return res
    fw = g["results"]
    if all("times_s" in fw.get(b, {}) for b in ("auto", "loop", "sdpa")):
        paired = [a / b for a, b in zip(fw["auto"]["times_s"], fw["loop"]["times_s"])]
        res["auto_vs_loop"] = statistics.median(paired)
        res["auto_vs_loop_min"] = fw["auto"]["min_s"] / fw["loop"]["min_s"]
        # two standard errors of the median (sigma from the MAD): what the median can move by chance
        med = statistics.median(paired)
        mad = statistics.median(abs(r - med) for r in paired)
        res["noise"] = max(ATTN_NOISE_FLOOR, 2 * 1.253 * 1.4826 * mad / math.sqrt(len(paired)))
        res["sdpa_vs_loop"] = statistics.median(a / b for a, b in zip(fw["sdpa"]["times_s"], fw["loop"]["times_s"]))
        res["auto_vs_sdpa"] = statistics.median(a / b for a, b in zip(fw["auto"]["times_s"], fw["sdpa"]["times_s"]))
        res["repeats"] = min(fw[b]["repeats"] for b in ("auto", "loop", "sdpa"))
    del dc
    gc.collect()
    return res


def bench_scale(size: str, specs: list[GridSpec], batch: int, args, dev: torch.device, plan: Plan,
                rates: Rates, log) -> dict:
    """DC-DiT forwards on two grids interleaved in one group (same machine load), with the
    attention kernels timed in the same passes, for the scale target."""
    res: dict = {"size": size, "grids": [s.name for s in specs], "L": [s.L for s in specs], "batch": batch}
    setups = [make_setup(size, spec, batch, args, dev) for spec in specs]
    for st in setups:
        st.dit = None  # only DC-DiT is compared here
    macs = [model_flops(st.dc, kept_counts=[round(f * st.spec.L) for f in st.fracs])["total"] for st in setups]
    kept = [KeptFraction(st.dc, args.kept_mode, st.fracs, st.x, st.t, st.y) for st in setups]
    log(f"[{plan.budget.elapsed():5.0f} s] scale DC-DiT-{size} {' vs '.join(res['grids'])} batch {batch}")
    names = [st.spec.name for st in setups]
    g = timed_forwards({n: st.dc for n, st in zip(names, setups)}, {n: st.fwd(st.dc) for n, st in zip(names, setups)},
                       dev, plan, sum(macs) * rates.get("fwd"), min_repeats=min(5, plan.repeats + 2))
    for k in kept:
        k.remove()
    res["forward"] = g["results"]
    if g["skipped"]:
        res["skipped"] = g["skipped"]
        return res
    a, b = (g["results"].get(n, {}) for n in names)
    if "components_s" in a and "components_s" in b:
        na = a["median_s"] - a["components_s"]["attn_kernel"]
        nb = b["median_s"] - b["components_s"]["attn_kernel"]
        res["ratio_minus_attn"] = nb / na
        res["ratio_total"] = b["median_s"] / a["median_s"]
        res["L_ratio"] = specs[1].L / specs[0].L
        res["normalised"] = res["ratio_minus_attn"] / res["L_ratio"]
        fa, fb = a["components_fastest_pass_s"], b["components_fastest_pass_s"]
        res["normalised_min"] = ((b["min_s"] - fb["attn_kernel"]) / (a["min_s"] - fa["attn_kernel"])
                                 / res["L_ratio"])
    return res


def profile_forward(dc: DCDiT, x, t, y, dev, autocast, rows: int) -> dict:
    """torch.profiler on one train-mode DC-DiT forward; ops by self time and per-module totals."""
    from torch.profiler import ProfilerActivity, profile, record_function
    ranges: dict[int, object] = {}
    handles = []
    for group, names in DC_COMPONENTS.items():
        for name in names:
            mod = getattr(dc, name)
            for m in (list(mod) if isinstance(mod, torch.nn.ModuleList) else [mod]):
                def pre(module, args, g=group):
                    r = record_function(f"dcgen::{g}")
                    r.__enter__()
                    ranges[id(module)] = r

                def post(module, args, out):
                    ranges.pop(id(module)).__exit__(None, None, None)
                handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    dc.train()
    with autocast():
        dc(x, t, y)  # warm
    with profile(activities=acts, record_shapes=True) as prof:
        with autocast():
            dc(x, t, y)
        sync(dev)
    for h in handles:
        h.remove()
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages(group_by_input_shape=True)
    ops = [e for e in events if not e.key.startswith("dcgen::")]
    total = sum(getattr(e, key) for e in ops) or 1.0
    ops.sort(key=lambda e: -getattr(e, key))
    # attribute every op's self time to the dcgen module range that encloses it
    by_module: dict[str, dict[str, float]] = {}
    for ev in prof.events():
        if ev.name.startswith("dcgen::"):
            continue
        group, parent = "other", ev.cpu_parent
        while parent is not None:
            if parent.name.startswith("dcgen::"):
                group = parent.name[len("dcgen::"):]
                break
            parent = parent.cpu_parent
        mod = by_module.setdefault(group, {})
        mod[ev.name] = mod.get(ev.name, 0.0) + getattr(ev, key, 0.0) / 1e6
    modules = {g: {"self_s": sum(v.values()), "share": sum(v.values()) / (total / 1e6),
                   "top_ops": sorted(v.items(), key=lambda kv: -kv[1])[:6]}
               for g, v in by_module.items()}
    return {"time_key": key, "total_self_s": total / 1e6, "modules": modules,
            "top_ops": [{"op": e.key, "shapes": str(e.input_shapes)[:120], "calls": e.count,
                         "self_s": getattr(e, key) / 1e6, "share": getattr(e, key) / total}
                        for e in ops[:rows]]}


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------

def _med(res: dict, group: str, name: str) -> float | None:
    return res.get(group, {}).get(name, {}).get("median_s")


def _min(res: dict, group: str, name: str) -> float | None:
    return res.get(group, {}).get(name, {}).get("min_s")


def _n(res: dict, group: str, names) -> int | None:
    ns = [res.get(group, {}).get(n, {}).get("repeats") for n in names]
    return None if None in ns else min(ns)


def derived(res: dict) -> dict:
    """Per-config ratios from interleaved pairs: time per GFLOP, overhead share, attention share,
    backbone time against DiT's, sampling speed-up."""
    out: dict = {}
    if "flops" not in res:
        return out
    gf = {k: 2 * res["flops"][k]["macs"] / 1e9 for k in ("dit", "dcdit")}
    for group, mult in (("forward", 1), ("fwd_bwd", 3)):
        td, tc = _med(res, group, "dit"), _med(res, group, "dcdit")
        if td and tc:
            a, b = td / (mult * gf["dit"]), tc / (mult * gf["dcdit"])
            out[f"{group}_s_per_gflop"] = {"dit": a, "dcdit": b}
            out[f"{group}_efficiency_ratio"] = b / a
            out[f"{group}_efficiency_ratio_min"] = (_min(res, group, "dcdit") / gf["dcdit"]) / (
                _min(res, group, "dit") / gf["dit"])
            out[f"{group}_repeats"] = _n(res, group, ("dit", "dcdit"))
    tf = _med(res, "forward", "dcdit")
    pieces = {k: v for k, v in res.get("pieces_s", {}).items() if isinstance(v, float) and not math.isnan(v)}
    comps = res.get("forward", {}).get("dcdit", {}).get("components_s")
    dit_comps = res.get("forward", {}).get("dit", {}).get("components_s")
    if tf and comps:
        fm = pieces.get("chunk.from_mask", 0.0)
        extras = sum(v for k, v in pieces.items() if k.startswith("pack."))
        over = {"router": comps["router"], "chunk": max(comps["chunk"] - fm, 0.0),
                "dechunk": comps["dechunk"], "packing": fm + extras}
        out["overhead_s"] = over
        out["overhead_share"] = sum(over.values()) / tf
        fp = res["forward"]["dcdit"].get("components_fastest_pass_s")
        pmin = res.get("pieces_s", {}).get("_min", {})
        if fp:
            fm_min = pmin.get("chunk.from_mask", fm)
            extras_min = sum(v for k, v in pmin.items() if k.startswith("pack."))
            out["overhead_share_min"] = (fp["router"] + max(fp["chunk"] - fm_min, 0.0) + fp["dechunk"]
                                         + fm_min + extras_min) / _min(res, "forward", "dcdit")
        out["forward_repeats"] = _n(res, "forward", ("dcdit",))
        if "attn_kernel" in comps:
            out["attn_share"] = {"dcdit": comps["attn_kernel"] / tf}
            if dit_comps and "attn_kernel" in dit_comps:
                out["attn_share"]["dit"] = dit_comps["attn_kernel"] / _med(res, "forward", "dit")
        if dit_comps:  # same backbone token count: what packing costs inside the blocks
            out["backbone_vs_dit"] = comps["backbone"] / dit_comps["backbone"] * (
                res["backbone_tokens"]["dit"] / max(res["backbone_tokens"]["dcdit"], 1))
    s0, s5 = _med(res, "sample_step", "dcdit"), _med(res, "sample_step", "dcdit_rho0.5")
    if s0 and s5:
        out["sampling_speedup_rho0.5"] = s0 / s5
        out["sampling_speedup_rho0.5_min"] = _min(res, "sample_step", "dcdit") / _min(res, "sample_step", "dcdit_rho0.5")
        out["sampling_repeats"] = _n(res, "sample_step", ("dcdit", "dcdit_rho0.5"))
    return out


def evaluate_targets(run: dict) -> list[dict]:
    """One row per target check. `value` is from medians (decides pass); `value_min` from the fastest
    repeats, the better estimate on a loaded machine (contention only ever adds time); `n` repeats."""
    rows = []
    cpu = run["machine"]["device_type"] == "cpu"

    def row(target, what, value, value_min, n, limit, ok, applies=True):
        rows.append({"target": target, "what": what, "value": value, "value_min": value_min, "n": n,
                     "limit": limit, "pass": None if value is None or not applies else ok(value),
                     "pass_min": None if value_min is None or not applies else ok(value_min)})

    eff = TARGETS["efficiency"]
    for r in run["results"]:
        d = r.get("derived", {})
        for group, label in (("forward", "forward"), ("fwd_bwd", "fwd+bwd")):
            row("efficiency", f"{label}: DC-DiT-{r['size']} / DiT-{r['size']} time per GFLOP, {r['grid']}",
                d.get(f"{group}_efficiency_ratio"), d.get(f"{group}_efficiency_ratio_min"),
                d.get(f"{group}_repeats"), f"<= {eff:.2f}", lambda v: v <= eff)
    for r in run["results"]:
        if r["kind"] == "image" and r["size"] == "B":
            d = r.get("derived", {})
            row("overhead", f"(router + chunk + dechunk + packing) / forward, DC-DiT-B {r['grid']}"
                + ("" if cpu else " (the target is for CPU; shown for information)"),
                d.get("overhead_share"), d.get("overhead_share_min"), d.get("forward_repeats"),
                f"<= {TARGETS['overhead']:.2f}", lambda v: v <= TARGETS["overhead"], applies=cpu)
    for sc in run.get("scale", []):
        n = min((v.get("repeats", 0) for v in sc.get("forward", {}).values()), default=None)
        row("scale", f"DC-DiT-{sc['size']} forward minus attention kernel, {sc['grids'][1]} / {sc['grids'][0]}, "
            "divided by the L ratio (same batch, interleaved)", sc.get("normalised"), sc.get("normalised_min"), n,
            f"<= {TARGETS['scale']:.2f} (1.00 = linear, 5 % noise margin)", lambda v: v <= TARGETS["scale"])
    for ac in run.get("attention_choice", []):
        noise = ac.get("noise", ATTN_NOISE_FLOOR)
        row("attention", f"DC-DiT-{ac['size']} forward, `auto` ({ac.get('auto')}) / per-sample `loop`, {ac['grid']}, "
            f"kept {ac.get('kept', ac['lengths'])} (paired repeats)", ac.get("auto_vs_loop"), ac.get("auto_vs_loop_min"),
            ac.get("repeats"), f"<= {1 + noise:.2f} (1 + noise)", lambda v, lim=1 + noise: v <= lim)
    for r in run["results"]:
        if r["size"] == "B":
            d = r.get("derived", {})
            row("sampling", f"DC-DiT-B step time at tail_drop 0 / at 0.5, {r['grid']}",
                d.get("sampling_speedup_rho0.5"), d.get("sampling_speedup_rho0.5_min"), d.get("sampling_repeats"),
                f">= {TARGETS['sampling']:.1f}", lambda v: v >= TARGETS["sampling"])
    return rows


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------

def _ms(s) -> str:
    return "—" if s is None else (f"{s * 1e3:.0f}" if s >= 0.1 else f"{s * 1e3:.1f}" if s >= 0.001
                                  else f"{s * 1e3:.3f}")


def _mib(b) -> str:
    return "—" if b is None else f"{b / 2**20:.0f}"


def _pct(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f} %"


def _x(v, nd=2) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def render_run(run: dict) -> list[str]:
    m = run["machine"]
    a = run["args"]
    tag = run["args"].get("tag")
    out = [f"## {m['name']} ({m['device_type']}){' — ' + tag if tag else ''}", ""]
    out.append(f"- Machine: **{m['name']}**, {m['cpu_count']} logical CPUs ({m['cpu']}), "
               f"torch {m['torch']}, {m['threads']} intra-op thread(s) — {m['threads_note']}"
               + (f"; CUDA {m.get('cuda')}, {m.get('memory_GiB')} GiB" if m["device_type"] == "cuda" else ""))
    out.append(f"- Run: {m['date']}, dtype {m['dtype']}, load average {_x(m.get('load_average_start'), 1)} at start / "
               f"{_x(run.get('load_average_end'), 1)} at end, {run['elapsed_s']:.0f} s wall; command `{run['command']}`")
    out.append(f"- Settings: warm-up {a['warmup']}, up to {a['repeats']} timed repeats per measurement "
               f"(fewer when one round exceeds the {a['group_budget']:.0f} s group budget, but at least 3 for "
               f"forward and scale, 2 for fwd+bwd and sampling; counts in the JSON and the targets table), "
               f"medians; kept fraction mode `{a['kept_mode']}`, spread ±{a['kept_spread']:.0%}"
               + (f"; attention check: {a.get('attn_repeats')} timed repeats" if run.get("attention_choice") else ""))
    out.append("")
    if run["results"]:  # empty for --attn-only
        out.append("### Time, throughput, memory")
        out.append("")
        out.append("Per batch; `fwd` = train-mode forward, `f+b` = forward+backward, `step` = eval sampling "
                   "step (no grad; DC-DiT at tail_drop 0 / 0.5). Tokens = backbone tokens per sample "
                   "(DiT patches / DC-DiT kept). GFLOP = 2 × counted MACs per sample (dcgen.flops). "
                   "Memory = peak above the live set (MiB, fwd / f+b).")
        out.append("")
        out.append("| size | grid | B | model | tokens | GFLOP | fwd ms | f+b ms | step ms | samples/s | grid tok/s | "
                   "ms/GFLOP fwd | ms/GFLOP f+b | mem MiB |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in run["results"]:
            if "flops" not in r:
                out.append(f"| {r['size']} | {r['grid']} | {r['batch']} | — | — | — | skipped: "
                           f"{'; '.join(r['skipped'].values())} |||||||| ")
                continue
            d = r.get("derived", {})
            B = r["batch"]
            dp = r["dit_patch"]
            dit_label = f"DiT-{r['size']}/" + (str(dp[0]) if len(set(dp)) == 1 else "(" + ",".join(map(str, dp)) + ")")
            for name, label in (("dit", dit_label), ("dcdit", f"DC-DiT-{r['size']}")):
                tok = r["backbone_tokens"][name] / B
                gf = 2 * r["flops"][name]["macs"] / 1e9 / B
                tf, tb = _med(r, "forward", name), _med(r, "fwd_bwd", name)
                ts = _med(r, "sample_step", name)
                step = _ms(ts)
                if name == "dcdit":
                    step += " / " + _ms(_med(r, "sample_step", "dcdit_rho0.5"))
                    tok_s = f"{tok:.0f} ({tok / r['L']:.0%})"
                else:
                    tok_s = f"{tok:.0f}"
                sps = f"{B / tf:.2f}" if tf else "—"
                gts = f"{B * r['L'] / tf:,.0f}" if tf else "—"
                spg_f = d.get("forward_s_per_gflop", {}).get(name)
                spg_b = d.get("fwd_bwd_s_per_gflop", {}).get(name)
                memf = r.get("forward", {}).get(name, {}).get("peak_mem_bytes")
                memb = r.get("fwd_bwd", {}).get(name, {}).get("peak_mem_bytes")
                out.append(f"| {r['size']} | {r['grid']} | {B} | {label} | {tok_s} | {gf:.2f} | {_ms(tf)} | {_ms(tb)} | "
                           f"{step} | {sps} | {gts} | {_x(spg_f and spg_f * 1e3)} | {_x(spg_b and spg_b * 1e3)} | "
                           f"{_mib(memf)} / {_mib(memb)} |")
        skipped = [(r, k, v) for r in run["results"] for k, v in r.get("skipped", {}).items()]
        if skipped:
            out.append("")
            out.append("Skipped: " + "; ".join(f"{r['size']} {r['grid']} {k} ({v})" for r, k, v in skipped) + ".")
        out.append("")
        out.append("### Where a DC-DiT forward spends its time")
        out.append("")
        out.append("Share of the train-mode forward (forward hooks, median over the timed repeats). "
                   "`other` = conditioning, position-embedding add, STE merge, unpatchify: what runs between "
                   "modules. `overhead` = router + chunk (tail drop, selection, gather) + de-chunk + packing, where "
                   "packing = ChunkIndex.from_mask + PackInfo + position-embedding gather + per-block adaLN gather "
                   "+ per-block SDPA pad/unpad (direct timings, same inputs). `attn` = the attention kernels alone "
                   "(inside backbone), DC-DiT / DiT. `bb/DiT` = DC-DiT backbone time over DiT backbone time per "
                   "backbone token (interleaved; > 1 is what packing costs inside the blocks).")
        out.append("")
        comps = list(DC_COMPONENTS)
        out.append("| size | grid | fwd ms | " + " | ".join(comps) + " | other | **overhead** | packing | attn | bb/DiT |")
        out.append("|---|---|---|" + "---|" * (len(comps) + 5))
        for r in run["results"]:
            f = r.get("forward", {}).get("dcdit", {})
            if "components_share" not in f:
                continue
            sh = f["components_share"]
            other = 1 - sum(sh[c] for c in comps)
            d = r.get("derived", {})
            pk = d.get("overhead_s", {}).get("packing")
            tf = f["median_s"]
            att = d.get("attn_share", {})
            out.append(f"| {r['size']} | {r['grid']} | {_ms(tf)} | " + " | ".join(_pct(sh[c]) for c in comps)
                       + f" | {_pct(other)} | **{_pct(d.get('overhead_share'))}** | {_pct(pk / tf if pk else None)} | "
                       f"{_pct(att.get('dcdit'))} / {_pct(att.get('dit'))} | {_x(d.get('backbone_vs_dit'))} |")
        out.append("")
        out.append("Pieces (ms per forward, direct calls on the benchmark's tensors, same grad mode; per-block pieces "
                   "summed over the blocks). `pad waste` = share of the padded B·M² attention scores of the "
                   "`sdpa` backend that belong to padding (0 at batch 1).")
        out.append("")
        tables = (["chunk.from_mask", "chunk.gather", "pack.packinfo", "pack.pos_embed", "pack.adaln_gather",
                   "pack.sdpa_pad_unpad"],
                  ["dechunk.scatter", "dechunk.smooth", "dechunk.gather_blend", "dechunk.nearest",
                   "dechunk.plug_rows_total", "dechunk.plug_gather"])
        for names in tables:
            extra = " pad waste |" if names[0].startswith("chunk") else ""
            out.append("| size | grid | " + " | ".join(names) + " |" + extra)
            out.append("|---|---|" + "---|" * (len(names) + bool(extra)))
            for r in run["results"]:
                p = r.get("pieces_s")
                if not p or "_meta" not in p:
                    continue
                cells = [_ms(p[n]) if isinstance(p.get(n), float) and not math.isnan(p[n]) else "—" for n in names]
                out.append(f"| {r['size']} | {r['grid']} | " + " | ".join(cells) + " |"
                           + (f" {_pct(p['_meta']['attn_pad_waste'])} |" if extra else ""))
            out.append("")
    if run.get("scale"):
        out.append("### Scale (DC-DiT forward on two grids, interleaved, same batch)")
        out.append("")
        out.append("| size | grids | B | fwd ms | attn kernel ms | fwd ratio | ratio minus attn | L ratio | normalised |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for sc in run["scale"]:
            fw = sc.get("forward", {})
            cells = [" / ".join(_ms(fw.get(g, {}).get("median_s")) for g in sc["grids"]),
                     " / ".join(_ms(fw.get(g, {}).get("components_s", {}).get("attn_kernel")) for g in sc["grids"])]
            out.append(f"| {sc['size']} | {' → '.join(sc['grids'])} | {sc['batch']} | {cells[0]} | {cells[1]} | "
                       f"{_x(sc.get('ratio_total'))} | {_x(sc.get('ratio_minus_attn'))} | {_x(sc.get('L_ratio'), 0)} | "
                       f"{_x(sc.get('normalised'), 3)} |" + (f" skipped: {sc['skipped']}" if sc.get("skipped") else ""))
        out.append("")
    if run.get("attention_choice"):
        out.append("### Attention path chosen by `auto` (DC-DiT forward, unequal kept lengths)")
        out.append("")
        out.append("Train-mode forward with exactly these kept tokens per sample (fixed router mask), every "
                   "backend interleaved; ratios are medians of the per-round (paired) ratios. `pad waste` = share "
                   "of the padded B·M² attention scores that belong to padding. The rule is in "
                   "`dcgen/models/attention.py`.")
        out.append("")
        out.append("| size | grid | kept | pad waste | auto → | auto ms | loop ms | sdpa ms | auto / loop | "
                   "sdpa / loop | auto / sdpa |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for ac in run["attention_choice"]:
            fw = ac.get("forward", {})
            out.append(f"| {ac['size']} | {ac['grid']} | {' / '.join(map(str, ac.get('kept', ac['lengths'])))} | "
                       f"{_pct(ac.get('pad_waste'))} | {ac.get('auto', '—')} | "
                       + " | ".join(_ms(fw.get(b, {}).get("median_s")) for b in ("auto", "loop", "sdpa"))
                       + f" | {_x(ac.get('auto_vs_loop'), 3)} | {_x(ac.get('sdpa_vs_loop'), 3)} | "
                       f"{_x(ac.get('auto_vs_sdpa'), 3)} |" + (f" skipped: {ac['skipped']}" if ac.get("skipped") else ""))
        out.append("")
    bnames = sorted({b for r in run["results"] for b in r.get("backends", {})})
    if bnames:
        out.append("### Attention backends (DC-DiT forward ms, in brackets the attention kernels alone)")
        out.append("")
        out.append("| size | grid | auto → | " + " | ".join(bnames) + " |")
        out.append("|---|---|---|" + "---|" * len(bnames))
        for r in run["results"]:
            bk = r.get("backends")
            if not bk:
                continue
            cells = [f"{_ms(bk[b]['median_s'])} ({_ms(bk[b].get('attn_kernel_s'))})" if "median_s" in bk.get(b, {})
                     else ("error" if "error" in bk.get(b, {}) else "—") for b in bnames]
            out.append(f"| {r['size']} | {r['grid']} | {r.get('backends_auto', '')} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("### Targets")
    out.append("")
    out.append("`median` decides the result; `min` is the same ratio from the fastest repeats (on a shared "
               "machine contention only adds time, so a verdict that flips between the two is noise-limited); "
               "`n` = timed repeats behind it.")
    out.append("")
    out.append("| target | measured | median | min | n | limit | result |")
    out.append("|---|---|---|---|---|---|---|")
    for row in run["targets"]:
        res = "n/a" if row["pass"] is None else ("PASS" if row["pass"] else "**FAIL**")
        if row["pass"] is not None and row.get("pass_min") is not None and row["pass_min"] != row["pass"]:
            res += f" (min: {'PASS' if row['pass_min'] else 'FAIL'})"
        out.append(f"| {row['target']} | {row['what']} | {_x(row['value'], 3)} | {_x(row.get('value_min'), 3)} | "
                   f"{row.get('n') if row.get('n') is not None else '—'} | {row['limit']} | {res} |")
    profiled = [r for r in run["results"] if r.get("profile")]
    for r in profiled:
        pr = r["profile"]
        out.append("")
        out.append(f"<details><summary>torch.profiler, DC-DiT-{r['size']} {r['grid']} train-mode forward "
                   f"({pr['total_self_s'] * 1e3:.0f} ms of op self time)</summary>")
        out.append("")
        out.append("| module | self ms | share | biggest ops (ms) |")
        out.append("|---|---|---|---|")
        for g, mod in sorted(pr["modules"].items(), key=lambda kv: -kv[1]["self_s"]):
            tops = ", ".join(f"{n.replace('aten::', '')} {v * 1e3:.1f}" for n, v in mod["top_ops"])
            out.append(f"| {g} | {mod['self_s'] * 1e3:.1f} | {_pct(mod['share'])} | {tops} |")
        out.append("")
        out.append("| op | input shapes | calls | self ms | share |")
        out.append("|---|---|---|---|---|")
        for op in pr["top_ops"]:
            out.append(f"| {op['op']} | `{op['shapes']}` | {op['calls']} | {op['self_s'] * 1e3:.2f} | {_pct(op['share'])} |")
        out.append("")
        out.append("</details>")
    out.append("")
    return out


def render_markdown(runs: list[dict]) -> str:
    lines = ["# dcgen performance: DiT against DC-DiT", "",
             "Generated by `tools/bench.py` (do not edit by hand; rerun the tool). One section per machine "
             "(from `docs/bench/*.json`). Method and definitions: the docstring of `tools/bench.py`. In short: "
             "DiT/2 and DC-DiT at the same width and depth; DC-DiT keeps a fixed random 1/prod(patch) of its "
             "grid tokens (≈ the DiT/2 token count: N = 4 on images and video, 8 on voxels) because an untrained "
             "router keeps ~2; interleaved repeats, medians.", "",
             "Targets: **efficiency** — DC-DiT time per counted FLOP within 10 % of DiT's (ratio ≤ 1.10), "
             "forward and forward+backward; **overhead** — router + chunk + de-chunk + packing ≤ 10 % of a "
             "DC-DiT-B forward at 32×32 and 64×64 on CPU; **scale** — DC-DiT forward minus the attention kernel "
             "grows no faster than L from 32×32 to 64×64 (per sample, normalised by the L ratio 4); "
             "**sampling** — a DC-DiT-B sampling step at tail_drop 0.5 ≥ 1.5× faster than at 0; **attention** — "
             "with unequal kept lengths the path `auto` picks is never slower than per-sample attention by more "
             "than noise (DC-DiT-B forward).", ""]
    for run in runs:
        lines += render_run(run)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    ap.add_argument("--sizes", default=None, help="comma list of S, B, L, XL (default S,B; --quick: T)")
    ap.add_argument("--grids", default=None,
                    help="comma list of [kind:]AxB[xC], kind image|video|voxel|seq "
                         "(default 32x32,64x64,video:8x32x32,voxel:32x32x32)")
    ap.add_argument("--batch", type=int, default=None,
                    help="samples per call (default: CPU 2 up to L=1024 tokens, else 1; CUDA 32/8/2 by L)")
    ap.add_argument("--repeats", type=int, default=None, help="max timed repeats (default CPU 3, CUDA 20)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls (default CPU 1, CUDA 3)")
    ap.add_argument("--quick", action="store_true", help="tiny models and grids; seconds")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help="bf16 = bf16 autocast (default on CUDA), fp32 (default on CPU)")
    ap.add_argument("--out", default="docs", help="writes OUT/bench/<device>.json and OUT/performance.md")
    ap.add_argument("--threads", default="auto", help="CPU intra-op threads (default auto, see above)")
    ap.add_argument("--kept", type=float, default=None, help="DC-DiT kept fraction (default 1/prod(DiT patch))")
    ap.add_argument("--kept-mode", choices=["mask", "bias"], default="mask")
    ap.add_argument("--kept-spread", type=float, default=0.2, help="per-sample kept fraction spread (±)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for the whole run, 0 = unlimited (default 480; --quick 60)")
    ap.add_argument("--group-budget", type=float, default=None,
                    help="seconds one measurement may use for its repeats (default CPU 20, CUDA 10)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of one DC-DiT forward per config")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--attn-lengths", default=None,
                    help="attention-choice check: GRID:M1,M2[;GRID:...] kept tokens per sample "
                         "(default 32x32:387,226;64x64:882,351; --quick 8x8:20,9;16x16:70,30); 'none' skips it")
    ap.add_argument("--attn-size", default=None, help="model size of the attention-choice check (default B; --quick T)")
    ap.add_argument("--attn-repeats", type=int, default=5, help="timed repeats of the attention-choice check")
    ap.add_argument("--attn-only", action="store_true", help="run only the attention-choice check")
    ap.add_argument("--render", action="store_true",
                    help="only re-render OUT/performance.md from the JSON files in OUT/bench/")
    ap.add_argument("--tag", default="", help="suffix of the JSON name, to keep a second run of one machine "
                                               "(e.g. --tag profile -> bench/<device>-profile.json)")
    return ap.parse_args(argv)


def default_batch(L_tokens: int, dev: torch.device) -> int:
    if dev.type == "cuda":
        return 32 if L_tokens <= 1024 else 8 if L_tokens <= 4096 else 2
    return 2 if L_tokens <= 1024 else 1


def write_markdown(out: Path, log) -> None:
    """Render OUT/performance.md from every JSON in OUT/bench/ (default runs before tagged ones)."""
    runs = []
    for p in sorted((out / "bench").glob("*.json")):
        try:
            r = json.loads(p.read_text())
            if r.get("schema") == SCHEMA:
                runs.append(r)
        except (OSError, json.JSONDecodeError):
            log(f"bench: ignoring unreadable {p}")
    runs.sort(key=lambda r: (r["machine"]["device_type"], bool(r["args"].get("tag")), r["args"].get("tag") or ""))
    md = render_markdown(runs)
    # tools/gpu_check.py results (OUT/gpu_check/*.json carry their own rendered section)
    checks = sorted((out / "gpu_check").glob("*.json"))
    if not checks:
        md = md.rstrip() + ("\n\n## GPU check\n\nNo `tools/gpu_check.py` run yet. On a CUDA machine, "
                            "`python tools/gpu_check.py --write-docs` (under 8 minutes on one GPU) adds a section here: the "
                            "gpu-marked tests, chunking against the CPU oracles, every attention backend and "
                            "what `auto` picks, bf16 training steps of DiT-B/2 and DC-DiT-B with and without "
                            "compile, and a 2-GPU DDP run.\n")
    for p in checks:
        try:
            section = json.loads(p.read_text()).get("markdown")
        except (OSError, json.JSONDecodeError):
            log(f"bench: ignoring unreadable {p}")
            continue
        if section:
            md = md.rstrip() + "\n\n" + section.rstrip() + "\n"
    (out / "performance.md").write_text(md)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.render:
        write_markdown(Path(args.out), lambda msg: print(msg, file=sys.stderr))
        return {}
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    if args.dtype is None:
        args.dtype = "bf16" if cuda else "fp32"
    if args.quick:
        args.sizes = args.sizes or "T"
        args.grids = args.grids or "8x8,16x16,video:2x8x8,voxel:8x8x8"
        args.repeats = args.repeats or 2
        args.warmup = args.warmup if args.warmup is not None else 1
        args.batch = args.batch or 2
        args.time_budget = 60 if args.time_budget is None else args.time_budget
        args.group_budget = args.group_budget or 5
        args.attn_lengths = args.attn_lengths or "8x8:20,9;16x16:70,30"
        args.attn_size = args.attn_size or "T"
        args.attn_repeats = min(args.attn_repeats, 3)
    args.sizes = args.sizes or "S,B"
    args.grids = args.grids or "32x32,64x64,video:8x32x32,voxel:32x32x32"
    args.repeats = args.repeats or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.time_budget = 480 if args.time_budget is None else args.time_budget
    args.group_budget = args.group_budget or (10 if cuda else 20)
    args.attn_lengths = args.attn_lengths or "32x32:387,226;64x64:882,351"
    args.attn_size = (args.attn_size or "B").strip().upper()
    attn_checks = [] if args.attn_lengths.strip().lower() == "none" else parse_attn_lengths(args.attn_lengths)
    size_dims(args.attn_size)
    threads, note = choose_threads(args.threads) if not cuda else (torch.get_num_threads(), "torch default")
    torch.set_num_threads(threads)

    sizes = [s.strip().upper() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        size_dims(s)
    specs = [parse_grid(g) for g in args.grids.split(",") if g.strip()]
    info = machine_info(dev, args.dtype, note)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"bench: {info['name']} ({dev}), torch {info['torch']}, {info['threads']} threads ({note}), {args.dtype}")

    budget = Budget(args.time_budget)
    plan = Plan(args.warmup, args.repeats, args.group_budget, budget)
    rates = Rates(dev)
    # phase 1: the target grids (rank 2), cheapest first; phase 2: the scale pairs; phase 3: the
    # other ranks. A budget cut therefore drops the extras, not the targets.
    def cost(c):
        D, depth, _ = size_dims(c[0])
        return D * D * depth * c[1].L

    configs = sorted(((s, spec) for spec in specs for s in sizes), key=cost)
    results, scale = [], []

    def run_config(size, spec):
        batch = args.batch or default_batch(spec.L, dev)
        log(f"[{budget.elapsed():5.0f} s] {size} {spec.name} batch {batch}")
        try:
            res = bench_config(size, spec, batch, args, dev, plan, rates, log)
        except torch.OutOfMemoryError as e:
            res = {"size": size, "grid": spec.name, "grid_shape": list(spec.grid), "kind": spec.kind,
                   "L": spec.L, "batch": batch, "skipped": {"all": f"out of memory: {str(e)[:120]}"}}
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        res["derived"] = derived(res)
        results.append(res)

    attention_choice = []

    def run_attention_checks():
        for spec, lengths in attn_checks:
            try:
                attention_choice.append(bench_attention_choice(args.attn_size, spec, lengths, args, dev, plan,
                                                               rates, log))
            except torch.OutOfMemoryError as e:
                attention_choice.append({"size": args.attn_size, "grid": spec.name, "L": spec.L, "lengths": lengths,
                                         "batch": len(lengths), "skipped": f"out of memory: {str(e)[:120]}"})
            gc.collect()

    if args.attn_only:
        configs = []
    for size, spec in configs:
        if spec.kind == "image":
            run_config(size, spec)
    run_attention_checks()  # a target: right after the target grids, before the extras
    images = [] if args.attn_only else sorted({sp.grid: sp for sp in specs if sp.kind == "image"}.values(), key=lambda sp: sp.L)
    if len(images) >= 2:
        pair = [images[0], images[-1]]
        for size in sorted(sizes, key=lambda s: size_dims(s)[0]):
            batch = args.batch or min(default_batch(sp.L, dev) for sp in pair)
            try:
                scale.append(bench_scale(size, pair, batch, args, dev, plan, rates, log))
            except torch.OutOfMemoryError as e:
                scale.append({"size": size, "grids": [sp.name for sp in pair], "batch": batch,
                              "skipped": f"out of memory: {str(e)[:120]}"})
            gc.collect()
    for size, spec in configs:
        if spec.kind != "image":
            run_config(size, spec)
    order = {(s, sp.name): i for i, (s, sp) in enumerate((s, sp) for sp in specs for s in sizes)}
    results.sort(key=lambda r: order[(r["size"], r["grid"])])

    run = {"schema": SCHEMA, "machine": info, "args": vars(args), "command": " ".join(["tools/bench.py", *(argv if argv is not None else sys.argv[1:])]),
           "elapsed_s": budget.elapsed(), "load_average_end": load_average(), "results": results,
           "scale": scale, "attention_choice": attention_choice}
    run["targets"] = evaluate_targets(run)
    out = Path(args.out)
    (out / "bench").mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^a-z0-9]+", "-", args.tag.lower()).strip("-")
    path = out / "bench" / f"{device_slug(info)}{'-' + tag if tag else ''}.json"
    path.write_text(json.dumps(run, indent=1, default=float) + "\n")
    write_markdown(out, log)
    log(f"bench: wrote {path} and {out / 'performance.md'} in {budget.elapsed():.0f} s")
    return run


if __name__ == "__main__":
    main()
