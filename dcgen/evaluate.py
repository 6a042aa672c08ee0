"""`dcgen evaluate`: the FID protocol from the EMA weights on every process of the launch, the
task's metrics, and what the samples cost (METHOD §7.3, §8).

The samples are cut into chunks of `batch_size`: chunk c holds samples [c·B, (c+1)·B), is
sampled as one batch from a generator seeded by (seed, c), with the labels the evaluation drew for
those positions (uniform over the classes, or exactly N/num_classes each with
`class_balanced=true`, from (seed) alone). So every sample is a function of its global index and
the settings, never of the number of processes: process r takes chunks r, r + W, r + 2W, ...

Reads top to bottom in phases:
1. processes (Accelerate's PartialState: one CPU, one GPU, torchrun/accelerate launch), device
2. model, objective and task of the run; every setting checked before anything is written
3. the plan: labels, chunks, and which chunks an earlier run of the same command finished
4. this process's chunks: sample, check finite, decode, write the chunk's files (numbered PNGs
   for the image tasks, `chunks/data_c.npy` for the others), then its marker
   `chunks/chunk_c.json` (costs) last: a killed evaluation reruns with the identical command and
   skips every chunk with a marker. Nothing is gathered between processes.
5. the main process: reads the markers (and the non-image data) from disk, runs
   `task.evaluate(samples or None, out_dir, **cfg.evaluate)` and writes `metrics.json`

FLOP conventions written to metrics.json:
  gflops_per_forward   DiT: MACs per forward pass of one image (conditional branch), in G,
                       averaged over images and sampling steps
  tflops_per_image     DC-DiT: sum over the sampling steps of 2 * MACs, every CFG branch at its
                       own budget, in T, averaged over images
  tflops_per_image_reference_counter   the same with [R]'s counter (residual_proj omitted, Q7)
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .diffusion.guidance import cfg_branches
from .run import EVAL_CONFIG_FILE, Run

log = logging.getLogger("dcgen.evaluate")


# columns of the per-step record of a DC-DiT (see `dc_step_recorder`)
_MACS_ALL, _MACS_COND, _MACS_ALL_REF, _KEPT_COND, _KEPT_UNCOND = range(5)


def dc_step_recorder(model, branches: int):
    """`flop_fn` for `sample.generate`: from the kept counts of every row of one forward (2B rows
    under CFG: conditional then unconditional) -> (B, 5) per image: MACs of all branches, MACs of
    the conditional branch, MACs of all branches with [R]'s counter, kept tokens of the
    conditional and of the unconditional branch (= conditional without CFG)."""
    from .flops import per_sample_macs

    def record(counts: torch.Tensor, rows: int | None = None, backbone: bool = True) -> torch.Tensor:
        counts = counts.detach().to("cpu", torch.float64).reshape(-1)
        # `rows` images: a call outside a guidance interval ran one branch, not `branches`
        k = branches if rows is None else counts.numel() // rows
        if counts.numel() % k or (rows is not None and counts.numel() != k * rows) or k > branches:
            raise ValueError(f"a forward of {counts.numel()} rows does not split into {branches} branches")
        B = counts.numel() // k
        branches_run = k
        # a step cache's reused call: the encoder, router and decoder ran, the backbone and the
        # de-chunk did not, which costs what a forward keeping no token costs
        ran = counts if backbone else torch.zeros_like(counts)
        macs = per_sample_macs(model, ran)["total"].view(branches_run, B)
        ref = per_sample_macs(model, ran, count_residual_proj=False)["total"].view(branches_run, B)
        c = counts.view(branches_run, B)
        return torch.stack([macs.sum(0), macs[0], ref.sum(0), c[0], c[-1]], 1)

    return record


def cost_summary(model, result: dict, branches: int) -> dict:
    """Per-image costs of one rank's `generate` result: (n, 5) rows of
    [MACs all branches, MACs conditional, MACs all with [R]'s counter, mean kept cond, mean kept
    uncond] summed (MACs) or averaged (tokens) over the sampling steps. Calls whose backbone a
    step cache reused (`result["reused"]`) pay for no backbone."""
    from .flops import per_sample_macs
    n = int(result["samples"].shape[0])
    if n == 0:
        return {"per_image": np.zeros((0, 5)), "kept_by_step": None, "steps": 0}
    if "step_flops" in result:  # DC-DiT: measured along the trajectory
        sf = result["step_flops"].double()  # (n, K, 5)
        per_image = torch.stack([sf[..., _MACS_ALL].sum(1), sf[..., _MACS_COND].sum(1),
                                 sf[..., _MACS_ALL_REF].sum(1), sf[..., _KEPT_COND].mean(1),
                                 sf[..., _KEPT_UNCOND].mean(1)], 1)
        kept_by_step = sf[..., _KEPT_COND].sum(0)  # (K,) summed over this rank's images
        K = sf.shape[1]
    else:  # DiT: every token at every step, less the backbone of the steps a step cache reused
        K = len(result.get("ts") or [])
        comp = per_sample_macs(model, batch=1)
        one, backbone = float(comp["total"][0]), float(comp["backbone"][0])
        L = float(math.prod(model.token_grid))
        # calls outside a guidance interval ran one branch
        runs = K if branches == 1 else K + int(result["guided_calls"].sum()) if "guided_calls" in result \
            else branches * K
        per_image = torch.tensor([[runs * one, K * one, runs * one, L, L]],
                                 dtype=torch.float64).expand(n, 5).clone()
        if "reused" in result:
            width = torch.full((K,), float(branches), dtype=torch.float64)  # branches per call
            if branches > 1 and "guided_calls" in result:
                width = 1.0 + result["guided_calls"].double()
            reused = result["reused"].double()  # (n, K)
            per_image[:, [_MACS_ALL, _MACS_ALL_REF]] -= ((reused * width).sum(1) * backbone)[:, None]
            per_image[:, _MACS_COND] -= reused.sum(1) * backbone
        kept_by_step = torch.full((K,), L * n, dtype=torch.float64)
    return {"per_image": per_image.numpy(), "kept_by_step": kept_by_step.numpy(), "steps": K}


def cost_metrics(per_image: np.ndarray, steps: int, tokens: int, branches: int = 1) -> dict:
    """The named cost metrics of per-image cost rows (`cost_summary`'s columns): GFLOPs per
    forward (DiT convention: MACs of the conditional branch per model call), TFLOPs per image
    (DC-DiT convention: 2 * MACs over all steps and branches, and with [R]'s counter), tokens
    kept, the kept fraction of the `tokens` of the grid."""
    per_image = np.asarray(per_image, dtype=np.float64).reshape(-1, 5)
    out = {"gflops_per_forward": float(per_image[:, _MACS_COND].mean() / max(steps, 1) / 1e9),
           "tflops_per_image": float(2 * per_image[:, _MACS_ALL].mean() / 1e12),
           "tflops_per_image_reference_counter": float(2 * per_image[:, _MACS_ALL_REF].mean() / 1e12),
           "tokens_kept_mean": float(per_image[:, _KEPT_COND].mean()),
           "tokens_grid": int(tokens),
           "kept_fraction_mean": float(per_image[:, _KEPT_COND].mean() / tokens)}
    if branches == 2:
        out["tokens_kept_mean_uncond"] = float(per_image[:, _KEPT_UNCOND].mean())
    return out


def process_state(device: str = "auto"):
    """Accelerate's PartialState for this launch. Without a GPU it must be told `cpu=True`, or a
    torchrun/accelerate launch on CPUs is not recognised as distributed (every process would
    think it is rank 0 of 1); gloo is then the backend."""
    from accelerate import PartialState
    return PartialState(cpu=str(device) == "cpu" or not torch.cuda.is_available())


def _peak_memory(device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), "cpu_max_rss"


PROTOCOL_KEYS = ("num_samples", "batch_size", "steps", "sampler", "cfg_scale", "cfg_channels",
                 "tail_drop", "tail_drop_uncond", "seed", "class_balanced", "precision")


def eval_labels(seed: int, num_samples: int, num_classes: int, balanced: bool) -> torch.Tensor | None:
    """The labels of samples 0..N-1, a function of (seed, N) only: uniform over the classes, or
    (balanced) exactly N / num_classes of each class in a seeded random order (the ADM / REPA
    protocol). None for an unconditional model."""
    from .rng import item_generator
    if num_classes == 0:
        return None
    g = item_generator(seed, "eval-labels", 0)
    if not balanced:
        return torch.randint(0, num_classes, (num_samples,), generator=g)
    if num_samples % num_classes:
        raise ValueError(f"class_balanced=true needs num_samples divisible by the {num_classes} classes, "
                         f"got {num_samples}")
    labels = torch.arange(num_classes).repeat_interleave(num_samples // num_classes)
    return labels[torch.randperm(num_samples, generator=g)]


def chunk_seed(seed: int, chunk: int) -> int:
    """The generator seed of chunk `chunk` (its initial noise and the sampler's per-step noise)."""
    from .rng import draw_seed
    return draw_seed(seed, "eval-chunk", chunk)


def _protocol(cfg, args: dict, ecfg: dict, export_dir: Path) -> dict:
    from .io import WEIGHTS_FILE
    w = export_dir / WEIGHTS_FILE
    return {**{k: args.get(k, cfg.get(k)) for k in PROTOCOL_KEYS},
            "export_step": ecfg.get("step"), "weights_bytes": w.stat().st_size}


def evaluate_command(cfg: DictConfig) -> Path | None:
    """`dcgen evaluate run_dir=... [num_samples steps sampler cfg_scale tail_drop ...]`.
    Returns the output directory on the main process (None on the others)."""
    from accelerate.utils import broadcast_object_list

    from .sample import (NonFiniteSamplesError, check_memory, check_request, generate, load_run,
                         pick_device, sampling_args)

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # 1. processes, device -----------------------------------------------------------------------
    if str(cfg.device) != "auto":
        pick_device(cfg.device)  # a bad or absent device: one line, before any process state
    state = process_state(cfg.device)
    rank, world, is_main = state.process_index, state.num_processes, state.is_main_process
    device = state.device if cfg.device == "auto" else torch.device(cfg.device)
    if device.type == "cuda" and cfg.get("tf32", True):  # FID sampling: fp32 + TF32 (D22)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = str(cfg.get("precision") or "fp32")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision={precision}: expected fp32 or bf16")
    N, B = int(cfg.num_samples), int(cfg.batch_size)

    # 2. model, objective, task; every setting checked before anything is written ----------------
    from .checkpoint import ranks_agree
    from .io import resolve_export_dir
    from .viz import write_stats_json
    export_dir = resolve_export_dir(cfg.run_dir)  # checks the run dir's files once
    model, objective, task, ecfg = load_run(export_dir, device)
    from .pipeline import with_diffusers_samplers
    objective = with_diffusers_samplers(objective)  # sampler=dpm++ | unipc through diffusers
    args = sampling_args(cfg, ecfg)
    check_request(objective, task, num_samples=N, steps=args["steps"], sampler=args["sampler"],
                  seed=chunk_seed(cfg.seed, 0))
    numbered = bool(getattr(task, "numbered_samples", False))  # declared by the Task contract
    check_memory(min(B, N), task, "batch_size")
    if not numbered:  # the main process reads every sample back for the task's metrics
        check_memory(N, task)
    elif N > 2 ** 31:  # the label list (8 bytes a sample) and the file numbering
        raise ValueError(f"num_samples={N}: expected at most 2**31")
    is_dc = model.drops_tokens
    branches = cfg_branches(task.num_classes, cfg.cfg_scale)
    labels = eval_labels(cfg.seed, N, task.num_classes, bool(cfg.get("class_balanced", False)))
    protocol = _protocol(cfg, {**args, "num_samples": N, "batch_size": B, "precision": precision,
                               "class_balanced": bool(cfg.get("class_balanced", False))}, ecfg, export_dir)

    # 3. the plan, and what an earlier run of this command finished -------------------------------
    out_dir = [str(cfg.out_dir or Run(cfg.run_dir).eval_dir())]
    if world > 1:
        broadcast_object_list(out_dir)  # every rank writes where rank 0 decided
    out_dir = Path(out_dir[0])
    chunks_dir = out_dir / "chunks"
    n_chunks = -(-N // B)
    done = set()
    if chunks_dir.is_dir():
        for f in chunks_dir.glob("chunk_*.json"):
            try:
                marker = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if marker.get("protocol") != protocol:
                raise ValueError(f"out_dir={out_dir} holds an evaluation with other settings "
                                 f"({f.name}); rerun its command to finish it, or choose a new out_dir")
            done.add(int(marker["chunk"]))
    elif (out_dir / "images").is_dir() and any((out_dir / "images").iterdir()):
        raise ValueError(f"out_dir={out_dir} already holds samples (images/) of another evaluation; "
                         "choose a new out_dir")
    mine = [c for c in range(rank, n_chunks, world) if c not in done]
    if is_main and done:
        log.info("resuming %s: %d of %d chunks already done", out_dir, len(done), n_chunks)

    # 4. this process's chunks -------------------------------------------------------------------
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    flop_fn = dc_step_recorder(model, branches) if is_dc else None
    failure = None
    for i, c in enumerate(mine):
        lo, hi = c * B, min(N, (c + 1) * B)
        lab = labels[lo:hi] if labels is not None else None
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        try:
            with ctx:
                result = generate(model, objective, task, **{**args, "num_samples": hi - lo, "batch_size": hi - lo},
                                  labels=lab, seed=chunk_seed(cfg.seed, c), device=device, record=True,
                                  map_samples=0, progress=False, flop_fn=flop_fn)
        except NonFiniteSamplesError as e:
            failure = f"chunk {c}: {e}"
            break
        t0 = time.time()
        data = torch.cat([task.decode(part.to(device)).cpu()
                          for part in result["samples"].split(int(cfg.get("decode_batch_size") or B))])
        chunks_dir.mkdir(parents=True, exist_ok=True)
        if numbered:
            task.write_samples(data, out_dir, labels=lab, start_index=lo)
        else:
            np.save(chunks_dir / f"data_{c:06d}.npy", data.numpy())
        costs = cost_summary(model, result, branches)
        peak, peak_kind = _peak_memory(device)
        write_stats_json({
            "chunk": c, "protocol": protocol, "lo": lo, "hi": hi, "rank": rank,
            "seconds": float(result["seconds"]), "decode_seconds": time.time() - t0, "peak": peak,
            "peak_kind": peak_kind, "per_image": costs["per_image"], "kept_by_step": costs["kept_by_step"],
            "ts": list(result.get("ts") or [])}, chunks_dir / f"chunk_{c:06d}.json")  # atomic
        if is_main:
            log.info("chunk %d (%d of this process's %d) written", c, i + 1, len(mine))
        _fault_after_chunk(c)
    if not ranks_agree(state, failure is None):  # every rank stops alike
        raise NonFiniteSamplesError(failure or "sampling produced non-finite values on another process; "
                                    "the chunks before it are kept")
    state.wait_for_everyone()
    if not is_main:
        return None

    # 5. metrics on the main process, from disk ----------------------------------------------------
    markers = [json.loads((chunks_dir / f"chunk_{c:06d}.json").read_text()) for c in range(n_chunks)]
    OmegaConf.save(cfg, out_dir / EVAL_CONFIG_FILE)
    if labels is not None:
        np.save(out_dir / "labels.npy", labels.numpy())
    if numbered:
        samples = None
    else:
        samples = torch.from_numpy(np.concatenate([np.load(chunks_dir / f"data_{c:06d}.npy")
                                                   for c in range(n_chunks)]))
        task.write_samples(samples, out_dir, labels=labels)
    eval_kwargs = OmegaConf.to_container(cfg.get("evaluate") or {}, resolve=True)
    metrics = dict(task.evaluate(samples, out_dir, device=device, **eval_kwargs) or {})

    per_image = np.concatenate([np.asarray(m["per_image"], dtype=np.float64).reshape(-1, 5) for m in markers])
    L = int(math.prod(model.token_grid))
    K = max(len(m["ts"]) for m in markers)
    metrics.update({
        "num_samples": N,
        **cost_metrics(per_image, K, L, branches),
        "latency_per_image_s": float(sum(m["seconds"] for m in markers) / N),
        "images_per_s": float(N / max(sum(m["seconds"] for m in markers) / world, 1e-9)),
        "decode_seconds": float(sum(m["decode_seconds"] for m in markers)),
        "peak_memory_bytes": int(max(m["peak"] for m in markers)),
        "peak_memory_kind": markers[0]["peak_kind"],
        "processes": world,
    })
    kept_steps = [np.asarray(m["kept_by_step"]) for m in markers if m["kept_by_step"] is not None]
    if kept_steps and K:
        metrics["per_step"] = {"t": next(m["ts"] for m in markers if m["ts"]),
                               "tokens_kept_mean": (np.sum(kept_steps, 0) / N).tolist()}
    if labels is not None:
        counts = np.bincount(labels.numpy(), minlength=task.num_classes)
        metrics["labels"] = {"class_balanced": protocol["class_balanced"],
                             "per_class_min": int(counts.min()), "per_class_max": int(counts.max())}
    metrics["protocol"] = {
        **{k: protocol[k] for k in PROTOCOL_KEYS}, "chunks": n_chunks,
        "chunk_seeds": "dcgen.evaluate.chunk_seed(seed, chunk)", "cfg_branches": branches,
        "model": type(model).__name__, "run_dir": str(cfg.run_dir), "export_step": protocol["export_step"],
        "flop_conventions": {"gflops_per_forward": "DiT: MACs per forward of one image (G)",
                             "tflops_per_image": "DC-DiT: sum over steps of 2*MACs, all branches (T)"}}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    log.info("metrics: %s", {k: v for k, v in metrics.items() if k not in ("protocol", "per_step")})
    print(out_dir)
    return out_dir


def _fault_after_chunk(chunk: int):
    """Test hook: DCGEN_FAULT_KILL_AFTER_CHUNK=<c> SIGKILLs the process right after chunk c's marker."""
    import os
    if os.environ.get("DCGEN_FAULT_KILL_AFTER_CHUNK") == str(chunk):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    return str(o)
