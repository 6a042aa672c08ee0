"""The check to run the moment a GPU is available: one command, under 8 minutes on one GPU.

    python tools/gpu_check.py --write-docs         # CUDA: docs/gpu_check/<device>.json + a docs/performance.md section
    python tools/gpu_check.py                      # the same into runs/gpu_check/<time>/ (nothing tracked changes)
    python tools/gpu_check.py --smoke              # CPU, seconds: tiny sizes, the same code paths on device cpu
    python tools/gpu_check.py --only chunking,attention

Sections (each records pass / fail / skipped with the reason, and never stops the others):
  pytest     `pytest -m gpu tests/` (the CUDA-marked tests)
  chunking   the chunking core on the device against the CPU / dense oracles (dcgen.chunking.reference) in
             fp32 with TF32 off: identical router masks (strict p > 0.5, forced corners), tail-drop
             masks (ties to the earlier raster index), plug-back indices (ties to the earliest kept
             token), de-chunk smoothing within 1e-5; grids of rank 1, 2 and 3
  attention  every backend available (sdpa, loop, xformers, native) and the compiled path's custom
             op against an fp32 per-sample reference, in fp32 and bf16, for unequal, batch-32-like and
             equal lengths; what `auto` picks; the time of each (to tune PAD_WASTE_MAX on CUDA)
  ddp        `torchrun --nproc_per_node 2 -m dcgen train` on the toy task for a few steps when two
             CUDA devices exist
  training   bf16 training steps (AdamW, hybrid diffusion loss, + ratio loss for DC-DiT) of DiT-B/2 and
             DC-DiT-B at batch 32 on 4x32x32 latents (DC-DiT keeps a fixed 25 +- 5 % of its tokens, as
             tools/bench.py): samples/s, peak memory, host syncs per step (torch.cuda sync debug mode
             "warn", warnings counted), eager and with dcgen.models.compile.compile_backbone

--smoke runs every section that can run on the CPU with tiny sizes (compile with backend aot_eager,
no sync counting) and marks the CUDA-only parts as skipped, saying why.

Output: OUT/gpu_check/<device>.json (with the rendered markdown) and OUT/performance.md re-rendered
by tools/bench.py (its bench runs, then one section per gpu_check JSON). Exit status 1 if a check
failed.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

import dcgen.benchmark as benchmark

ROOT = Path(__file__).resolve().parents[1]

SCHEMA = 1
SECTIONS = ("pytest", "chunking", "attention", "ddp", "training")


def sync(dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@contextlib.contextmanager
def no_tf32():
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def machine(dev: torch.device) -> dict:
    info = {"device_type": dev.type, "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu_count": os.cpu_count()}
    if dev.type == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
        info["device_count"] = torch.cuda.device_count()
        info["memory_GiB"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
    else:
        info["name"] = benchmark.cpu_model()
        info["device_count"] = 0
    return info


# --------------------------------------------------------------------------------------------
# (a) pytest -m gpu
# --------------------------------------------------------------------------------------------

def check_pytest(dev, args) -> dict:
    if dev.type != "cuda":
        return skipped("no CUDA device: every gpu-marked test would be skipped")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
                       capture_output=True, text=True, cwd=ROOT, timeout=args.pytest_timeout)
    tail = (p.stdout + p.stderr)[-3000:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", tail)}
    ok = p.returncode == 0 and counts.get("passed", 0) > 0
    return {"status": "pass" if ok else "fail", "returncode": p.returncode, "counts": counts,
            "seconds": time.time() - t0, "tail": tail[-1500:]}


# --------------------------------------------------------------------------------------------
# (b) chunking on the device against the CPU oracles
# --------------------------------------------------------------------------------------------

def check_chunking(dev, args) -> dict:
    from dcgen.chunking.reference import dense_dechunk, dense_plug_back, random_mask

    from dcgen.chunking import grid as G
    from dcgen.chunking.chunk import ChunkIndex, DeChunkLayer, tail_drop_mask
    from dcgen.chunking.router import finish_probs

    grids = [(24,), (16, 16), (12, 20), (6, 8, 10)] if args.smoke else \
        [(256,), (32, 32), (64, 64), (24, 40), (6, 24, 32), (6, 10, 14)]
    B = 3 if args.smoke else 4
    cases, ok = [], True
    gen = torch.Generator().manual_seed(0)
    with no_tf32():
        for grid in grids:
            L = G.numel(grid)
            for density in (0.02, 0.25, 0.6):
                case = {"grid": list(grid), "density": density}
                # router decision: p on a 1/64 lattice, so exact 0.5 and exact ties occur
                p = (torch.rand(B, L, generator=gen) * 64).floor() / 64
                p = torch.where(torch.rand(B, L, generator=gen) < density, 1 - p * 0.49, p * 0.5)
                p[:, 5 % L] = 0.5  # exactly 0.5 is not a boundary
                r_cpu, r_dev = finish_probs(p, grid), finish_probs(p.to(dev), grid)
                case["router_mask"] = bool(torch.equal(r_dev.boundary_mask.cpu(), r_cpu.boundary_mask))
                # tail dropping: scalar and per-sample rho, forced protected or not ([R] Q6)
                same = True
                for rho in (0.3, torch.tensor([0.0, 0.5, 0.9][:B] + [0.2] * (B - 3))):
                    for protect in (True, False):
                        a = tail_drop_mask(r_cpu.boundary_prob, r_cpu.boundary_mask, rho, grid, protect)
                        rho_d = rho.to(dev) if torch.is_tensor(rho) else rho
                        b = tail_drop_mask(r_dev.boundary_prob, r_dev.boundary_mask, rho_d, grid, protect)
                        same &= bool(torch.equal(a, b.cpu()))
                case["tail_drop"] = same
                # plug-back (exact, ties to the earliest kept token) and smoothing (<= 1e-5)
                mask = random_mask(B, grid, density, gen)
                weights = (2,) + (1,) * (len(grid) - 1) if len(grid) == 3 else None
                src = G.nearest_kept_source(mask.to(dev), grid, weights).cpu()
                case["plug_back"] = bool(torch.equal(src, dense_plug_back(mask, grid, weights)))
                pp = torch.rand(B, L, generator=gen)
                T = int(mask.sum())
                D = 8 if args.smoke else 32
                z = torch.randn(T, D, generator=gen)
                sigma = tuple(max(1.0, g / 32) for g in grid)
                idx = ChunkIndex.from_mask(mask.to(dev), grid)
                out = DeChunkLayer(sigma=sigma, plug_weights=weights)(z.to(dev), idx, pp.to(dev)).cpu()
                ref = dense_dechunk(z, mask, pp, grid, sigma, weights).float()
                err = (out - ref).abs().max().item()
                case["smoothing_max_abs"] = err
                case["smoothing"] = err <= 1e-5
                case["pass"] = all(case[k] for k in ("router_mask", "tail_drop", "plug_back", "smoothing"))
                ok &= case["pass"]
                cases.append(case)
    return {"status": "pass" if ok else "fail", "device": str(dev), "tf32": False, "cases": cases}


# --------------------------------------------------------------------------------------------
# (c) attention backends against an fp32 per-sample reference
# --------------------------------------------------------------------------------------------

def reference_attention(q, k, v, lengths):
    """Plain softmax attention per sequence in fp32 (TF32 off by the caller)."""
    out, s = [], 0
    for M in lengths:
        qs, ks, vs = (t[s:s + M].float().transpose(0, 1) for t in (q, k, v))  # (H, M, d)
        w = torch.softmax(qs @ ks.transpose(1, 2) / qs.shape[-1] ** 0.5, dim=-1)
        out.append((w @ vs).transpose(0, 1))
        s += M
    return torch.cat(out)


def time_call(fn, dev, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_attention(dev, args) -> dict:
    from dcgen.models import attention as A

    gen = torch.Generator().manual_seed(0)
    if args.smoke:
        H, d = 2, 16
        cases = {"unequal": [40, 17], "batch-like": [30, 26, 33, 28], "equal": [24, 24, 24]}
    else:
        H, d = 12, 64
        cases = {"unequal": [882, 351], "unequal-256px": [387, 226],
                 "batch-32": [int(256 * (0.8 + 0.4 * i / 31)) for i in range(32)], "equal": [256] * 8}
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if dev.type == "cuda" else [])
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
    backends = A.available_backends(dev)
    rows, ok = [], True
    with no_tf32():
        for name, lengths in cases.items():
            pack = A.PackInfo.from_lengths(lengths, device=dev)
            T = sum(lengths)
            q32, k32, v32 = (torch.randn(T, H, d, generator=gen).to(dev) for _ in range(3))
            for dtype in dtypes:
                q, k, v = q32.to(dtype), k32.to(dtype), v32.to(dtype)
                ref = reference_attention(q, k, v, lengths)  # the rounded inputs, fp32 arithmetic
                row = {"case": name, "lengths": lengths if len(lengths) <= 8 else f"{len(lengths)} x {min(lengths)}-{max(lengths)}",
                       "dtype": str(dtype).replace("torch.", ""), "pad_waste": pack.pad_waste,
                       "auto": A.resolve_backend("auto", q, pack), "backends": {}}
                for b in ["auto", *backends, "compiled-op"]:
                    entry = {}
                    try:
                        if b == "compiled-op":  # what a compiled block runs (bucketed rows, custom op)
                            bp = A.BucketedPack.from_pack(pack, T + 7)
                            pad = lambda t: torch.cat([t, t.new_zeros(7, H, d)])  # noqa: E731
                            fn = lambda: A.bucketed_attention(pad(q), pad(k), pad(v), bp, "auto")[:T]  # noqa: E731
                        else:
                            fn = lambda b=b: A.varlen_attention(q, k, v, pack, b)  # noqa: E731
                        out = fn()
                        err = (out.float() - ref).abs().max().item()
                        entry = {"max_abs": err, "pass": err <= tol[dtype]}
                        if not args.smoke:
                            entry["ms"] = time_call(fn, dev, args.attn_repeats) * 1e3
                    except Exception as e:
                        expected = b == "native" and dtype == torch.float32  # the flash kernel is half-only
                        entry = {"unsupported" if expected else "error": f"{type(e).__name__}: {e}"[:160]}
                        if not expected:
                            entry["pass"] = False
                    row["backends"][b] = entry
                    ok &= entry.get("pass", True)
                rows.append(row)
    return {"status": "pass" if ok else "fail", "device": str(dev), "heads": H, "head_dim": d,
            "tolerance": {str(k).replace("torch.", ""): v for k, v in tol.items()}, "rows": rows,
            "pad_waste_max": A.PAD_WASTE_MAX}


# --------------------------------------------------------------------------------------------
# (d) bf16 training steps, eager and compiled
# --------------------------------------------------------------------------------------------

class SyncCounter:
    """Counts implicit host syncs (torch.cuda sync debug mode 'warn') while active."""

    def __init__(self, dev):
        self.dev, self.count, self.where = dev, 0, []

    def __enter__(self):
        self.ctx = warnings.catch_warnings(record=True)
        self.rec = self.ctx.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(0)
        self.ctx.__exit__(*exc)
        hits = [w for w in self.rec if "synchroniz" in str(w.message)]
        self.count = len(hits)
        self.where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in hits})
        return False


def training_run(kind: str, dev, args, compiled: bool) -> dict:
    from dcgen.chunking.ratio_loss import ratio_loss
    from dcgen.diffusion import GaussianDiffusion
    from dcgen.models import build
    from dcgen.models.compile import compile_backbone

    if args.smoke:
        grid, B, D, depth, heads, steps, warm = (8, 8), 4, 64, 2, 4, 3, 1
    else:
        grid, B, D, depth, heads, steps, warm = (32, 32), 32, 768, 12, 12, args.steps, 3
    torch.manual_seed(0)
    common = dict(input_size=list(grid), in_channels=4, num_classes=1000, hidden_size=D, depth=depth,
                  num_heads=heads)
    if kind == "dit":
        model = build({"_target_": "dcgen.models.DiT", "patch_size": 2, **common}).to(dev)
    else:
        model = build({"_target_": "dcgen.models.DCDiT", **common,
                       **(dict(encoder_dim=32, norm_groups=8) if args.smoke else {})}).to(dev)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, *grid, generator=gen).to(dev)
    y = torch.randint(0, 1000, (B,), generator=gen).to(dev)
    kept = None
    if kind == "dcdit":  # an untrained router keeps ~2 tokens: force a realistic 25 +- 5 %
        fracs = benchmark.kept_fractions(0.25, 0.2, B)
        kept = benchmark.KeptFraction(model, "mask", fracs, x, torch.zeros(B, dtype=torch.long, device=dev), y)
    if compiled:
        compile_backbone(model, backend="aot_eager" if args.smoke else "inductor")
    diffusion = GaussianDiffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    model.train()

    def step(i):
        g = torch.Generator(device=dev).manual_seed(100 + i)
        t = torch.randint(0, 1000, (B,), device=dev, generator=g)
        noise = torch.randn(x.shape, device=dev, generator=g)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            terms, aux = diffusion.training_losses(model, x, y, t=t, noise=noise)
            loss = terms["loss"].mean()
            if aux:
                loss = loss + 0.03 * ratio_loss(aux[0].boundary_prob, aux[0].boundary_mask, 4.0, 16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if aux:
            kept_counts.append(aux[0].kept_counts.detach())
        return loss

    kept_counts: list[torch.Tensor] = []

    t0 = time.perf_counter()
    for i in range(warm):  # includes the compile
        step(i)
    sync(dev)
    warm_s = time.perf_counter() - t0
    res = {"model": "DiT-B/2" if kind == "dit" and not args.smoke else ("DC-DiT-B" if not args.smoke else f"tiny-{kind}"),
           "batch": B, "grid": list(grid), "compiled": compiled, "warmup_steps": warm, "warmup_s": warm_s}
    syncs = None
    if dev.type == "cuda":
        with SyncCounter(dev) as sc:
            step(warm)
        syncs = {"per_step": sc.count, "where": sc.where[:12]}
        torch.cuda.reset_peak_memory_stats(dev)
    sync(dev)
    t0 = time.perf_counter()
    losses = []
    for i in range(steps):
        losses.append(step(warm + 1 + i).detach())
    sync(dev)
    dt = (time.perf_counter() - t0) / steps
    res.update(steps=steps, step_s=dt, samples_per_s=B / dt, loss_last=float(losses[-1]),
               finite=bool(all(torch.isfinite(v).item() for v in losses)),
               host_syncs=syncs if syncs is not None else "n/a (no CUDA: sync debug mode is CUDA-only)",
               peak_mem_GiB=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None)
    if kept_counts:  # from the training steps (an extra no-grad forward would compile again)
        res["kept_per_sample_mean"] = float(kept_counts[-1].float().mean())
    if kept is not None:
        kept.remove()
    del model, opt
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def check_training(dev, args, budget) -> dict:
    runs, ok = [], True
    for compiled in (False, True):
        if compiled and args.no_compile:
            runs.append({"compiled": True, **skipped("--no-compile")})
            continue
        for kind in ("dit", "dcdit"):
            if budget.remaining() < (60 if compiled else 20):
                runs.append({"kind": kind, "compiled": compiled, **skipped("time budget")})
                continue
            try:
                r = training_run(kind, dev, args, compiled)
                r["pass"] = r["finite"]
            except Exception as e:
                r = {"kind": kind, "compiled": compiled, "pass": False,
                     "error": f"{type(e).__name__}: {e}"[:400], "trace": traceback.format_exc()[-1500:]}
            ok &= r["pass"]
            runs.append(r)
    return {"status": "pass" if ok else "fail", "device": str(dev), "dtype": "bf16 autocast", "runs": runs}


# --------------------------------------------------------------------------------------------
# (e) 2-GPU DDP
# --------------------------------------------------------------------------------------------

TOY = ["task=toy", "task.grid=[8,8]", "task.num_samples=64", "model=dcdit_debug", "train.global_batch_size=8",
       "train.sample_every=0", "train.log_every=1", "dc.ratio_group_size=4", "dc.multi_budget_start_step=2",
       "train.max_steps=5", "train.ckpt_every=5"]


def check_ddp(dev, args) -> dict:
    if dev.type != "cuda":
        return skipped("no CUDA device")
    if torch.cuda.device_count() < 2:
        return skipped(f"{torch.cuda.device_count()} CUDA device(s); the DDP run needs 2")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               "-m", "dcgen", "train", *TOY, f"run_dir={run_dir}"]
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.ddp_timeout,
                           env=dict(os.environ, CUDA_VISIBLE_DEVICES="0,1"))
        world = None
        states = sorted(run_dir.glob("**/state.json"))
        if states:
            world = json.loads(states[-1].read_text()).get("world")
        ok = p.returncode == 0 and world == 2
        return {"status": "pass" if ok else "fail", "returncode": p.returncode, "world": world,
                "seconds": time.time() - t0, "command": " ".join(cmd[2:]), "tail": (p.stdout + p.stderr)[-1500:]}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def _f(v, nd=2):
    return "—" if v is None else f"{v:.{nd}f}"


def render(run: dict) -> str:
    m = run["machine"]
    S = run["sections"]
    out = [f"## GPU check: {m['name']} ({m['device_type']}{', smoke' if run['smoke'] else ''})", "",
           f"- `tools/gpu_check.py{' --smoke' if run['smoke'] else ''}`, {m['date']}, torch {m['torch']}"
           + (f", CUDA {m.get('cuda')}, {m.get('device_count')} device(s), {m.get('memory_GiB')} GiB" if m["device_type"] == "cuda" else "")
           + f", {run['elapsed_s']:.0f} s; overall: **{'PASS' if run['ok'] else 'FAIL'}**", ""]
    out.append("| check | result | notes |")
    out.append("|---|---|---|")
    for name in SECTIONS:
        sec = S.get(name, skipped("not run (--only)"))
        note = sec.get("reason", "")
        if name == "pytest" and "counts" in sec:
            note = ", ".join(f"{v} {k}" for k, v in sec["counts"].items())
        if name == "chunking" and "cases" in sec:
            worst = max(c["smoothing_max_abs"] for c in sec["cases"])
            note = f"{len(sec['cases'])} cases, ranks 1-3; smoothing max abs {worst:.1e}"
        if name == "attention" and "rows" in sec:
            picks = sorted({f"{r['case']}/{r['dtype']}: {r['auto']}" for r in sec["rows"]})
            note = "auto: " + ", ".join(picks)
        if name == "ddp" and "world" in sec:
            note = f"world {sec['world']}, {sec.get('seconds', 0):.0f} s"
        if "error" in sec:
            note = sec["error"]
        out.append(f"| {name} | {sec['status']} | {note} |")
    tr = S.get("training", {})
    if tr.get("runs"):
        out += ["", "Training steps (bf16 autocast, AdamW, hybrid loss; DC-DiT + ratio loss, 25 ± 5 % kept):", "",
                "| model | batch | compiled | step ms | samples/s | peak GiB | host syncs / step | warm-up s |",
                "|---|---|---|---|---|---|---|---|"]
        for r in tr["runs"]:
            if "step_s" not in r:
                out.append(f"| {r.get('kind', '—')} | — | {r.get('compiled')} | {r.get('reason') or r.get('error', '')} |||||")
                continue
            hs = r["host_syncs"]
            hs = hs["per_step"] if isinstance(hs, dict) else "n/a"
            out.append(f"| {r['model']} | {r['batch']} | {r['compiled']} | {r['step_s'] * 1e3:.1f} | "
                       f"{r['samples_per_s']:.1f} | {_f(r.get('peak_mem_GiB'))} | {hs} | {r['warmup_s']:.1f} |")
    at = S.get("attention", {})
    if at.get("rows") and not run["smoke"]:
        names = sorted({b for r in at["rows"] for b in r["backends"]})
        out += ["", f"Attention (H {at['heads']}, d {at['head_dim']}): ms per call (max abs error against the "
                "fp32 per-sample reference)", "",
                "| case | dtype | pad waste | auto → | " + " | ".join(names) + " |",
                "|---|---|---|---|" + "---|" * len(names)]
        for r in at["rows"]:
            cells = []
            for b in names:
                e = r["backends"].get(b, {})
                cells.append("—" if "max_abs" not in e else f"{_f(e.get('ms'))} ({e['max_abs']:.0e})")
            out.append(f"| {r['case']} | {r['dtype']} | {r['pad_waste']:.0%} | {r['auto']} | " + " | ".join(cells) + " |")
    out.append("")
    return "\n".join(out)


class Budget:
    def __init__(self, total):
        self.t0, self.total = time.perf_counter(), total

    def remaining(self):
        return math.inf if self.total <= 0 else self.total - (time.perf_counter() - self.t0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, seconds (CUDA-only parts skipped)")
    ap.add_argument("--device", default=None, help="default: cuda if available (smoke: cpu)")
    ap.add_argument("--out", default=None,
                    help="writes OUT/gpu_check/<device>.json and OUT/performance.md (default: a new "
                         "runs/gpu_check/<time> folder under the current directory)")
    ap.add_argument("--write-docs", action="store_true",
                    help="write into the repository's docs/ (docs/gpu_check/ and docs/performance.md), "
                         "to commit a GPU's report")
    ap.add_argument("--only", default=None, help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per run")
    ap.add_argument("--attn-repeats", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled training runs")
    ap.add_argument("--time-budget", type=float, default=450, help="seconds; later sections are skipped past it")
    ap.add_argument("--pytest-timeout", type=float, default=180)
    ap.add_argument("--ddp-timeout", type=float, default=240)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    dev = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if dev.type == "cpu" and not args.smoke:
        print("gpu_check: no CUDA device; running the CPU smoke check instead (--smoke)", file=sys.stderr)
        args.smoke = True
    only = set(SECTIONS) if not args.only else {s.strip() for s in args.only.split(",") if s.strip()}
    bad = only - set(SECTIONS)
    if bad:
        raise SystemExit(f"gpu_check: unknown section(s) {sorted(bad)} (valid: {', '.join(SECTIONS)})")
    budget = Budget(args.time_budget)
    t0 = time.time()
    info = machine(dev)
    log = lambda msg: print(f"[{time.time() - t0:5.0f} s] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"gpu_check on {info['name']} ({dev}){' (smoke)' if args.smoke else ''}")
    sections: dict[str, dict] = {}
    checks = {"pytest": lambda: check_pytest(dev, args), "chunking": lambda: check_chunking(dev, args),
              "attention": lambda: check_attention(dev, args), "training": lambda: check_training(dev, args, budget),
              "ddp": lambda: check_ddp(dev, args)}
    for name in SECTIONS:
        if name not in only:
            continue
        if budget.remaining() <= 0:
            sections[name] = skipped("time budget")
            continue
        log(name)
        ts = time.time()
        try:
            sections[name] = checks[name]()
        except Exception as e:
            sections[name] = {"status": "fail", "error": f"{type(e).__name__}: {e}"[:400],
                              "trace": traceback.format_exc()[-2000:]}
        sections[name]["seconds"] = time.time() - ts
        log(f"{name}: {sections[name]['status']}" + (f" ({sections[name].get('reason')})"
                                                     if sections[name]["status"] == "skipped" else ""))
    run = {"schema": SCHEMA, "tool": "gpu_check", "smoke": args.smoke, "machine": info,
           "command": " ".join(["tools/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
           "elapsed_s": time.time() - t0, "sections": sections,
           "ok": all(s["status"] != "fail" for s in sections.values())}
    run["markdown"] = render(run)
    if args.write_docs and args.out:
        raise SystemExit("gpu_check: give --out or --write-docs, not both")
    out = ROOT / "docs" if args.write_docs else Path(args.out or Path("runs") / "gpu_check" /
                                                        time.strftime("%Y%m%d-%H%M%S"))
    (out / "gpu_check").mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{dev.type}-{info['name']}{'-smoke' if args.smoke else ''}".lower()).strip("-")
    path = out / "gpu_check" / f"{slug}.json"
    path.write_text(json.dumps(run, indent=1, default=str) + "\n")
    benchmark.write_markdown(out, lambda msg: print(msg, file=sys.stderr))
    log(f"wrote {path} and {out / 'performance.md'}: {'PASS' if run['ok'] else 'FAIL'}")
    return run


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
