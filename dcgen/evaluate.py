"""`dcgen evaluate`: many samples from the EMA weights, the task's metrics, and the cost of
producing them (FLOPs per image in both conventions, tokens kept, latency, peak memory)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("dcgen.evaluate")


def evaluate_command(cfg: DictConfig) -> Path:
    from .flops import FlopMeter, model_flops
    from .sample import generate, load_run, pick_device
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = pick_device(cfg.device)
    model, objective, task, ecfg = load_run(cfg.run_dir, device)
    cfg_channels = cfg.cfg_channels or ecfg.get("sample", {}).get("cfg_channels", "all")
    out_dir = Path(cfg.out_dir or Path(cfg.run_dir) / "eval" / time.strftime("%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    is_dc = hasattr(model, "router")
    flop_fn = None
    if is_dc:
        from .flops import per_sample_macs
        flop_fn = lambda counts: per_sample_macs(model, counts)["total"]  # noqa: E731
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = generate(model, objective, task, num_samples=cfg.num_samples, steps=cfg.steps,
                      sampler=cfg.sampler, cfg_scale=cfg.cfg_scale, cfg_channels=cfg_channels,
                      tail_drop=cfg.tail_drop, tail_drop_uncond=cfg.tail_drop_uncond, seed=cfg.seed,
                      batch_size=cfg.batch_size, device=device, record=True, map_samples=0,
                      progress=True, flop_fn=flop_fn)
    data = task.decode(result["samples"].to(device)).cpu()
    task.write_samples(data, out_dir, labels=result["labels"])
    metrics = dict(task.evaluate(data, out_dir, **OmegaConf.to_container(cfg.metrics, resolve=True)))
    n = result["samples"].shape[0]
    metrics["num_samples"] = n
    metrics["latency_per_image_s"] = result["seconds"] / n
    metrics["peak_memory_bytes"] = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                    else _peak_rss())
    if is_dc:
        kept = result["kept"]  # (N, K) fractions, conditional rows
        L = int(np.prod(result["grid"]))
        metrics["tokens_kept_mean"] = float(kept.mean() * L)
        metrics["kept_fraction_mean"] = float(kept.mean())
        sf = result["step_flops"]  # (rows, K) MACs per model row per call; CFG rows summed per image
        per_image_macs = sf.reshape(-1, n, sf.shape[1]).sum(0) if sf.shape[0] != n else sf
        metrics["tflops_per_image_dcdit"] = float(2 * per_image_macs.sum(1).mean() / 1e12)
        metrics["gmacs_per_forward_mean"] = float(per_image_macs.mean() / 1e9)
    else:
        macs = model_flops(model, batch=1)["total"]
        branches = 2 if cfg.cfg_scale != 1.0 else 1
        metrics["gmacs_per_forward_mean"] = macs / 1e9
        metrics["tflops_per_image_dcdit"] = 2 * macs * len(result["ts"] or [cfg.steps]) * branches / 1e12
    metrics["protocol"] = {"steps": cfg.steps, "sampler": cfg.sampler, "cfg_scale": cfg.cfg_scale,
                           "cfg_channels": cfg_channels, "tail_drop": cfg.tail_drop,
                           "tail_drop_uncond": cfg.tail_drop_uncond, "seed": cfg.seed}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    log.info("metrics: %s", {k: v for k, v in metrics.items() if k != "protocol"})
    print(out_dir)
    return out_dir


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
