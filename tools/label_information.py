#!/usr/bin/env python
"""How much the class label can tell a denoiser, per timestep, for the pixel task's training set:
a driver of dcgen.analysis.label_information_report.

    python tools/label_information.py --out docs/results/label_information
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--task", nargs="*", default=[], help="task overrides, e.g. task.resolution=32")
    ap.add_argument("--schedule", default="linear")
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--every", type=int, default=25)
    a = ap.parse_args(argv)
    from dcgen.analysis import label_information_report
    from dcgen.cli import compose
    from dcgen.trust import build
    cfg = compose("prepare", ["task=pixel", *a.task])
    task = build(cfg.task, "task", "the command line", trusted=True)
    summary = label_information_report(task, a.out, a.schedule, a.queries, a.every)
    print(json.dumps({k: v for k, v in summary.items() if k != "timesteps"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
