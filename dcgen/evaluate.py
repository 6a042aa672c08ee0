"""`dcgen evaluate`: the FID protocol from the EMA weights on every process of the launch, the
task's metrics, and what the samples cost (METHOD §7.3, §8).

Reads top to bottom in phases:
1. processes (Accelerate's PartialState: one CPU, one GPU, torchrun/accelerate launch), out_dir
2. model, objective and task of the run
3. this rank's share: samples [offset, offset + n_r) of num_samples, seed = seed * world + rank,
   labels uniform over the classes (DiT's sample_ddp protocol); 250 DDPM steps by default, CFG,
   Lite-CFG (tail_drop_uncond) and elastic tail dropping as configured
4. decode and write. A task that declares `numbered_samples` (the image tasks) is fed
   chunk by chunk, every rank writing its own numbered files; otherwise every rank's decoded
   samples are gathered and written once by the main process
5. costs, gathered: FLOPs per image in both conventions (§7.3; measured along the trajectory
   from the kept-token counts of every model call), tokens kept, latency, peak memory
6. main process: `task.evaluate(samples or None, out_dir, **cfg.evaluate)` and `metrics.json`

FLOP conventions written to metrics.json:
  gflops_per_forward   DiT: MACs per forward pass of one image (conditional branch), in G,
                       averaged over images and sampling steps
  tflops_per_image     DC-DiT: sum over the sampling steps of 2 * MACs, every CFG branch at its
                       own budget, in T, averaged over images
  tflops_per_image_reference_counter   the same with [R]'s counter (residual_proj omitted, Q7)
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("dcgen.evaluate")


def rank_share(num_samples: int, world: int, rank: int) -> tuple[int, int]:
    """(offset, count) of this rank's samples: contiguous blocks, the first num % world ranks
    one larger, so the global numbering is independent of batch sizes."""
    base, extra = divmod(int(num_samples), int(world))
    count = base + (1 if rank < extra else 0)
    offset = rank * base + min(rank, extra)
    return offset, count


def rank_seed(seed: int, world: int, rank: int) -> int:
    """METHOD §8 / DiT sample_ddp: per-rank seed = seed * world + rank."""
    return int(seed) * int(world) + int(rank)


def cfg_branches(num_classes: int, cfg_scale: float) -> int:
    """Model rows per image in one sampling step: 2 when classifier-free guidance doubles the batch."""
    return 2 if num_classes > 0 and float(cfg_scale) != 1.0 else 1


# columns of the per-step record of a DC-DiT (see `dc_step_recorder`)
_MACS_ALL, _MACS_COND, _MACS_ALL_REF, _KEPT_COND, _KEPT_UNCOND = range(5)


def dc_step_recorder(model, branches: int):
    """`flop_fn` for `sample.generate`: from the kept counts of every row of one forward (2B rows
    under CFG: conditional then unconditional) -> (B, 5) per image: MACs of all branches, MACs of
    the conditional branch, MACs of all branches with [R]'s counter, kept tokens of the
    conditional and of the unconditional branch (= conditional without CFG)."""
    from .flops import per_sample_macs

    def record(counts: torch.Tensor) -> torch.Tensor:
        counts = counts.detach().to("cpu", torch.float64).reshape(-1)
        if counts.numel() % branches:
            raise ValueError(f"a forward of {counts.numel()} rows does not split into {branches} branches")
        B = counts.numel() // branches
        macs = per_sample_macs(model, counts)["total"].view(branches, B)
        ref = per_sample_macs(model, counts, count_residual_proj=False)["total"].view(branches, B)
        c = counts.view(branches, B)
        return torch.stack([macs.sum(0), macs[0], ref.sum(0), c[0], c[-1]], 1)

    return record


def cost_summary(model, result: dict, branches: int) -> dict:
    """Per-image costs of one rank's `generate` result: (n, 5) rows of
    [MACs all branches, MACs conditional, MACs all with [R]'s counter, mean kept cond, mean kept
    uncond] summed (MACs) or averaged (tokens) over the sampling steps."""
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
    else:  # DiT: every token at every step
        K = len(result.get("ts") or [])
        one = float(per_sample_macs(model, batch=1)["total"][0])
        L = float(math.prod(model.grid))
        per_image = torch.tensor([[branches * K * one, K * one, branches * K * one, L, L]],
                                 dtype=torch.float64).expand(n, 5).clone()
        kept_by_step = torch.full((K,), L * n, dtype=torch.float64)
    return {"per_image": per_image.numpy(), "kept_by_step": kept_by_step.numpy(), "steps": K}


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


def evaluate_command(cfg: DictConfig) -> Path | None:
    """`dcgen evaluate run_dir=... [num_samples steps sampler cfg_scale tail_drop ...]`.
    Returns the output directory on the main process (None on the others)."""
    from accelerate.utils import broadcast_object_list, gather_object

    from .models import DCDiT
    from .sample import generate, load_run, sampling_args

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # 1. processes, device, output directory ---------------------------------------------------
    from .sample import NonFiniteSamplesError, check_memory, check_request, pick_device
    if str(cfg.device) != "auto":
        pick_device(cfg.device)  # a bad or absent device: one line, before any process state
    state = process_state(cfg.device)
    rank, world, is_main = state.process_index, state.num_processes, state.is_main_process
    device = state.device if cfg.device == "auto" else torch.device(cfg.device)
    if device.type == "cuda" and cfg.get("tf32", True):  # FID sampling: fp32 + TF32 (D22)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if int(cfg.num_samples) < 1:
        raise ValueError(f"num_samples must be positive, got {cfg.num_samples}")
    out_dir = [str(cfg.out_dir or Path(cfg.run_dir) / "eval" / time.strftime("%Y%m%d-%H%M%S"))]
    if world > 1:
        broadcast_object_list(out_dir)  # every rank writes where rank 0 decided
    out_dir = Path(out_dir[0])
    # every rank sees the same directory, so every rank refuses alike (no rank left at a barrier)
    if (out_dir / "images").is_dir() and any((out_dir / "images").iterdir()):
        raise ValueError(f"out_dir={out_dir} already holds samples (images/); choose a new out_dir")

    # 2. model, objective, task; every setting checked before anything is written --------------------
    model, objective, task, ecfg = load_run(cfg.run_dir, device)
    from .pipeline import with_diffusers_samplers
    objective = with_diffusers_samplers(objective)  # sampler=dpm++ | unipc through diffusers
    args = sampling_args(cfg, ecfg)
    check_request(objective, task, num_samples=int(cfg.num_samples), steps=args["steps"],
                  sampler=args["sampler"], seed=rank_seed(cfg.seed, world, world - 1))
    is_dc = isinstance(model, DCDiT)
    branches = cfg_branches(task.num_classes, cfg.cfg_scale)

    # 3. this rank's samples ----------------------------------------------------------------------
    offset, n = rank_share(cfg.num_samples, world, rank)
    check_memory(n, task, "num_samples" if world == 1 else f"num_samples/{world} processes")
    seed = rank_seed(cfg.seed, world, rank)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    failure = None
    try:
        if n:
            result = generate(model, objective, task, **sampling_args(cfg, ecfg, num_samples=n),
                              seed=seed, device=device, record=True, map_samples=0, progress=is_main,
                              flop_fn=dc_step_recorder(model, branches) if is_dc else None)
        else:
            result = {"samples": torch.zeros(0, task.channels, *task.grid), "labels": None,
                      "seconds": 0.0, "ts": []}
    except NonFiniteSamplesError as e:
        failure = str(e)
    if world > 1:  # every rank stops alike, before anything is written
        failure = next((f for f in gather_object([failure]) if f), None)
    if failure:
        raise NonFiniteSamplesError(failure)
    labels = result["labels"]
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, out_dir / "evaluate_config.yaml")
    state.wait_for_everyone()

    # 4. decode and write ---------------------------------------------------------------------------
    t0 = time.time()
    streamed = bool(getattr(task, "numbered_samples", False))  # declared by the Task contract
    kept_data = []
    chunk = int(cfg.get("decode_batch_size") or cfg.batch_size)
    for i in range(0, n, chunk):
        data = task.decode(result["samples"][i:i + chunk].to(device)).cpu()
        lab = labels[i:i + chunk] if labels is not None else None
        if streamed:
            task.write_samples(data, out_dir, labels=lab, start_index=offset + i)
        else:
            kept_data.append(data)
    decode_seconds = time.time() - t0
    peak, peak_kind = _peak_memory(device)

    # 5. costs and labels to the main process ------------------------------------------------------
    costs = cost_summary(model, result, branches)
    mine = {"rank": rank, "offset": offset, "n": n, "seconds": float(result["seconds"]),
            "decode_seconds": decode_seconds, "peak": peak, "per_image": costs["per_image"],
            "kept_by_step": costs["kept_by_step"], "ts": list(result.get("ts") or []),
            "labels": labels.numpy() if labels is not None else None,
            "data": torch.cat(kept_data) if kept_data else None}
    parts = gather_object([mine]) if world > 1 else [mine]
    if not is_main:
        return None
    parts.sort(key=lambda p: p["rank"])

    # 6. metrics on the main process ----------------------------------------------------------------
    eval_kwargs = OmegaConf.to_container(cfg.get("evaluate") or {}, resolve=True)
    if labels is not None or any(p["labels"] is not None for p in parts):
        np.save(out_dir / "labels.npy", np.concatenate([p["labels"] for p in parts if p["n"]]))
    if streamed:
        samples = None
    else:
        samples = torch.cat([p["data"] for p in parts if p["data"] is not None])
        task.write_samples(samples, out_dir, labels=torch.from_numpy(np.load(out_dir / "labels.npy"))
                           if (out_dir / "labels.npy").exists() else None)
    metrics = dict(task.evaluate(samples, out_dir, device=device, **eval_kwargs) or {})

    N = sum(p["n"] for p in parts)
    per_image = np.concatenate([p["per_image"] for p in parts if p["n"]])  # (N, 5)
    L = int(math.prod(getattr(model, "grid", task.grid)))
    K = max(len(p["ts"]) for p in parts)
    metrics.update({
        "num_samples": N,
        "gflops_per_forward": float(per_image[:, _MACS_COND].mean() / max(K, 1) / 1e9),
        "tflops_per_image": float(2 * per_image[:, _MACS_ALL].mean() / 1e12),
        "tflops_per_image_reference_counter": float(2 * per_image[:, _MACS_ALL_REF].mean() / 1e12),
        "tokens_kept_mean": float(per_image[:, _KEPT_COND].mean()),
        "tokens_grid": L,
        "kept_fraction_mean": float(per_image[:, _KEPT_COND].mean() / L),
        "latency_per_image_s": float(np.mean([p["seconds"] / p["n"] for p in parts if p["n"]])),
        "images_per_s": float(N / max(max(p["seconds"] for p in parts), 1e-9)),
        "decode_seconds": float(max(p["decode_seconds"] for p in parts)),
        "peak_memory_bytes": int(max(p["peak"] for p in parts)),
        "peak_memory_kind": peak_kind,
        "processes": world,
    })
    if branches == 2:
        metrics["tokens_kept_mean_uncond"] = float(per_image[:, _KEPT_UNCOND].mean())
    kept_steps = [p["kept_by_step"] for p in parts if p["n"] and p["kept_by_step"] is not None]
    if kept_steps and K:
        metrics["per_step"] = {"t": parts[0]["ts"] or next(p["ts"] for p in parts if p["ts"]),
                               "tokens_kept_mean": (np.sum(kept_steps, 0) / N).tolist()}
    protocol = sampling_args(cfg, ecfg)
    metrics["protocol"] = {
        **{k: protocol[k] for k in ("steps", "sampler", "cfg_scale", "cfg_channels", "tail_drop",
                                    "tail_drop_uncond")},
        "seed": cfg.seed, "rank_seeds": [rank_seed(cfg.seed, world, r) for r in range(world)],
        "cfg_branches": branches, "model": type(model).__name__, "run_dir": str(cfg.run_dir),
        "flop_conventions": {"gflops_per_forward": "DiT: MACs per forward of one image (G)",
                             "tflops_per_image": "DC-DiT: sum over steps of 2*MACs, all branches (T)"}}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    log.info("metrics: %s", {k: v for k, v in metrics.items() if k not in ("protocol", "per_step")})
    print(out_dir)
    return out_dir


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    return str(o)
