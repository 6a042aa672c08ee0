"""`dcgen elastic`: quality against FLOPs across tail-drop budgets. One `dcgen evaluate` per budget
ρ (and, with `lite_cfg`, each budget again under Lite-CFG 1.25 with ρ_u 0.9), then one table
(markdown + JSON) of TFLOPs/img, tokens kept, FID/IS/KID/precision/recall, latency and memory: the
elastic-inference curve of [P2] Fig. 1/7 and the ρ columns of Table 1.

    dcgen elastic run_dir=runs/dcdit_b budgets=[0,0.2,0.4,0.6] out_dir=runs/dcdit_b/elastic \\
        "evaluate_overrides=['num_samples=50000','evaluate.reference=VIRTUAL_imagenet256_labeled.npz']"
    torchrun --nproc_per_node 8 -m dcgen elastic ...     # every rank samples its share
    dcgen elastic tabulate=[DIR,DIR] out_dir=DIR          # only tabulate finished evaluations

A budget whose output folder already holds metrics.json is not sampled again (delete it to redo),
so an interrupted sweep resumes. Keys: dcgen/schema.py (ElasticConfig).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger("dcgen.elastic")

COLUMNS = [  # (key in metrics.json, header, format)
    ("tail_drop", "ρ", "{:.2f}"),
    ("guidance", "guidance", "{}"),
    ("tflops_per_image", "TFLOPs/img", "{:.4g}"),
    ("tflops_change", "Δ TFLOPs", "{:+.1%}"),
    ("gflops_per_forward", "GFLOPs/fwd", "{:.4g}"),
    ("tokens_kept_mean", "tokens kept", "{:.1f}"),
    ("fid", "FID", "{:.2f}"),
    ("is", "IS", "{:.2f}"),
    ("kid", "KID", "{:.4f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("latency_per_image_s", "s/img", "{:.3g}"),
    ("peak_memory_gb", "peak mem (GB)", "{:.2f}"),
]
LITE_CFG = ["cfg_scale=1.25", "tail_drop_uncond=0.9"]


def row_from_metrics(m: dict) -> dict:
    """One table row from an evaluation's metrics.json."""
    p = m.get("protocol", {})
    lite = p.get("tail_drop_uncond") is not None and p.get("cfg_scale", 1.0) != 1.0
    guidance = "none" if p.get("cfg_scale", 1.0) == 1.0 else \
        (f"Lite-CFG {p['cfg_scale']} (ρ_u {p['tail_drop_uncond']})" if lite else f"CFG {p['cfg_scale']}")
    row = {k: m.get(k) for k, _, _ in COLUMNS if k in m}
    row.update(tail_drop=p.get("tail_drop", 0.0), guidance=guidance, num_samples=m.get("num_samples"),
               peak_memory_gb=m.get("peak_memory_bytes", 0) / 2 ** 30,
               tflops_per_image_reference_counter=m.get("tflops_per_image_reference_counter"),
               kid_std=m.get("kid_std"), is_std=m.get("is_std"))
    return row


def tabulate(rows: list[dict], out_dir: Path, title: str) -> tuple[Path, Path]:
    """Write elastic_table.md and elastic_table.json; ΔTFLOPs is against the ρ = 0 row of the
    same guidance."""
    rows = sorted(rows, key=lambda r: (r["guidance"], r["tail_drop"]))
    base = {r["guidance"]: r["tflops_per_image"] for r in rows if r["tail_drop"] == 0}
    for r in rows:
        b = base.get(r["guidance"])
        r["tflops_change"] = (r["tflops_per_image"] / b - 1) if b else None
    lines = [f"# {title}", "", "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join("–" if r.get(k) is None else fmt.format(r.get(k))
                                       for k, _, fmt in COLUMNS) + " |")
    n = {r.get("num_samples") for r in rows}
    lines += ["", f"Samples per row: {', '.join(str(x) for x in sorted(n, key=str))}. TFLOPs/img: sum over "
              "the sampling steps of 2·MACs, every guidance branch at its own budget (DC-DiT "
              "convention, METHOD §7.3); GFLOPs/fwd: MACs of one conditional forward (DiT convention)."]
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "elastic_table.md", out_dir / "elastic_table.json"
    md.write_text("\n".join(lines) + "\n")
    js.write_text(json.dumps({"title": title, "rows": rows}, indent=2))
    return md, js


def elastic_command(cfg: DictConfig) -> Path | None:
    """`dcgen elastic ...` (see the module docstring); returns the table's folder (None on the
    processes other than the main one)."""
    from .config import compose
    from .evaluate import evaluate_command, process_state
    from .run import Run
    from .validate import ConfigError
    if cfg.tabulate:
        out = Path(cfg.out_dir or ".")
        rows = []
        for d in cfg.tabulate:
            f = Path(d) / "metrics.json"
            if not f.is_file():
                raise ConfigError(f"tabulate: {f}: no metrics.json")
            rows.append(row_from_metrics(json.loads(f.read_text())))
        md, _ = tabulate(rows, out, "Quality against FLOPs")
        print(md.read_text())
        return out
    if cfg.run_dir is None:
        raise ConfigError("run_dir is required: give run_dir=<the run or export directory> (or tabulate=[...])")
    out = Path(cfg.out_dir) if cfg.out_dir else Run(cfg.run_dir).eval_dir("elastic")
    settings = [("none", [])] + ([("lite", LITE_CFG)] if cfg.lite_cfg else [])
    rows = []
    for name, extra in settings:
        for rho in cfg.budgets:
            d = out / f"{name}_rho{rho:.2f}"
            if not (d / "metrics.json").is_file():
                evaluate_command(compose("evaluate", [*cfg.evaluate_overrides, *extra, f"run_dir={cfg.run_dir}",
                                                      f"tail_drop={rho}", f"out_dir={d}"]))
            process_state().wait_for_everyone()
            if process_state().is_main_process:
                rows.append(row_from_metrics(json.loads((d / "metrics.json").read_text())))
    if not process_state().is_main_process:
        return None
    md, _ = tabulate(rows, out, f"Quality against FLOPs: {cfg.run_dir}")
    flops = [r["tflops_per_image"] for r in rows if r["guidance"] == "none"]
    if any(b > a * (1 + 1e-9) for a, b in zip(flops, flops[1:])):
        log.warning("FLOPs per image do not fall monotonically with rho")
    print(md.read_text())
    return out
