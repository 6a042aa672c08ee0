#!/usr/bin/env python
"""Quality against FLOPs across tail-drop budgets: one `dcgen evaluate` per budget rho, then one
table (markdown + JSON) of TFLOPs/img, tokens kept, FID/IS/KID/precision/recall, latency and memory
(the elastic-inference curve of [P2] Fig. 1/7 and the rho columns of Table 1).

    python tools/elastic_table.py --run-dir runs/dcdit_b --budgets 0 0.2 0.4 0.6 \\
        --out runs/dcdit_b/elastic num_samples=50000 evaluate.reference=VIRTUAL_imagenet256_labeled.npz
    torchrun --nproc_per_node 8 tools/elastic_table.py --run-dir ... (every rank samples its share)
    python tools/elastic_table.py --lite-cfg ...          # each budget also under Lite-CFG 1.25 (rho_u 0.9)
    python tools/elastic_table.py --tabulate DIR [DIR ...] --out DIR   # only tabulate finished runs

Arguments after the options are `dcgen evaluate` overrides (key=value). A budget whose output
directory already holds metrics.json is not sampled again (delete it to redo), so an interrupted
sweep resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

try:
    import dcgen  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def row_from_metrics(m: dict) -> dict:
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
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            cells.append("–" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    n = {r.get("num_samples") for r in rows}
    lines += ["", f"Samples per row: {', '.join(str(x) for x in sorted(n, key=str))}. TFLOPs/img: sum over "
              "the sampling steps of 2·MACs, every guidance branch at its own budget (DC-DiT "
              "convention, METHOD §7.3); GFLOPs/fwd: MACs of one conditional forward (DiT convention)."]
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "elastic_table.md", out_dir / "elastic_table.json"
    md.write_text("\n".join(lines) + "\n")
    js.write_text(json.dumps({"title": title, "rows": rows}, indent=2))
    return md, js


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", help="run or export directory to evaluate")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    ap.add_argument("--out", help="output directory (default: <run-dir>/elastic)")
    ap.add_argument("--lite-cfg", action="store_true",
                    help="also evaluate every budget under Lite-CFG (cfg_scale 1.25, rho_u 0.9)")
    ap.add_argument("--tabulate", nargs="+", metavar="EVAL_DIR",
                    help="only tabulate these finished evaluate directories")
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        ap.error(f"unrecognised arguments {bad} (evaluate overrides are key=value)")

    if args.tabulate:
        out = Path(args.out or ".")
        rows = []
        for d in args.tabulate:
            f = Path(d) / "metrics.json"
            if not f.is_file():
                print(f"elastic_table: error: {f}: no metrics.json", file=sys.stderr)
                return 1
            rows.append(row_from_metrics(json.loads(f.read_text())))
        md, _ = tabulate(rows, out, "Quality against FLOPs")
        print(md.read_text())
        return 0
    if not args.run_dir:
        ap.error("--run-dir is required (or --tabulate)")

    from dcgen.cli import ConfigError, compose
    from dcgen.evaluate import evaluate_command, process_state

    out = Path(args.out or Path(args.run_dir) / "elastic")
    settings = [("none", [])]
    if args.lite_cfg:
        settings.append(("lite", ["cfg_scale=1.25", "tail_drop_uncond=0.9"]))
    rows = []
    try:
        for name, extra in settings:
            for rho in args.budgets:
                d = out / f"{name}_rho{rho:.2f}"
                if not (d / "metrics.json").is_file():
                    cfg = compose("evaluate", [*overrides, *extra, f"run_dir={args.run_dir}",
                                               f"tail_drop={rho}", f"out_dir={d}"])
                    evaluate_command(cfg)
                process_state().wait_for_everyone()
                if process_state().is_main_process:
                    rows.append(row_from_metrics(json.loads((d / "metrics.json").read_text())))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"elastic_table: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    if not process_state().is_main_process:
        return 0
    md, _ = tabulate(rows, out, f"Quality against FLOPs: {args.run_dir}")
    flops = [r["tflops_per_image"] for r in rows if r["guidance"] == "none"]
    if any(b > a * (1 + 1e-9) for a, b in zip(flops, flops[1:])):
        print("elastic_table: warning: FLOPs per image do not fall monotonically with rho",
              file=sys.stderr)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
