"""Training seconds per step of a comparison's models on an equal footing (issue 21's "equal
wall-clock"): `dcgen compare` times each run while it shares the machine with whatever else runs
then, so its "train s" columns cannot be compared across runs. This driver copies every trained
run of one seed of a comparison (OUT/E/seedS/run), resumes each copy for --steps more steps in
this process with the same thread count, round-robin over --rounds rounds (E1, E2, ..., E1, E2,
...), so that every model sees the same machine; the DC-DiTs run at their trained kept fraction.
It reports, per experiment, the median over rounds of the seconds per step (the training loop's
own samples/s records, first window of each round dropped) and the ratio to the first experiment;
with OUT/compare.json (the last `dcgen compare` call's report), also each DC-DiT's quality at the
wall-clock its DiT baselines spent, on these s/step, for every seed of the report
(dcgen.compare.equal_cost).
The copies are deleted; the comparison's runs are not touched. `--speeds` reads the s/step of an
earlier run's --json instead of timing, and `--report` names the report to read them against
(a folder holding a compare.json, e.g. one merged from several seeds' folders).

    python tools/bench_train_speed.py --out runs/evidence/glyphs_n4 --seed 0 [--steps 40 --rounds 3]
    python tools/bench_train_speed.py --speeds n16_seed0.json --report docs/results/compare/glyphs_n16

A pure driver: training is `dcgen train`'s loop (dcgen.compare.resume_copy), the timing its
metrics records (dcgen.compare.seconds_per_step).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="a dcgen compare output folder (OUT of out=OUT)")
    ap.add_argument("--speeds", help="an earlier --json: its s/step, no timing")
    ap.add_argument("--report", help="the report read with the s/step (default: OUT)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experiments", nargs="*", help="default: every experiment with a trained run of --seed")
    ap.add_argument("--steps", type=int, default=40, help="training steps per round per experiment")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--json", help="write the result here as JSON")
    args = ap.parse_args(argv)
    if args.speeds:
        earlier = json.loads(Path(args.speeds).read_text())
        med = {str(e): float(v) for e, v in earlier["median"].items()}
        if not (args.report or earlier.get("out")):
            ap.error(f"--report is required: {args.speeds} names no comparison folder")
        return report_equal_cost(Path(args.report or earlier["out"]), med, dict(earlier), args.json)
    if not args.out:
        ap.error("--out is required (or --speeds)")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from dcgen.compare import copy_run, resume_copy, seconds_per_step, trained_runs

    runs = trained_runs(Path(args.out), args.seed, args.experiments)
    if not runs:
        raise SystemExit(f"bench_train_speed: no trained run of seed {args.seed} under {args.out}")
    times: dict[str, list[float]] = {e: [] for e in runs}
    with tempfile.TemporaryDirectory(prefix="dcgen-speed-") as tmp:
        copies = {e: copy_run(src, Path(tmp) / e.replace("/", "_")) for e, src in runs.items()}
        for r in range(args.rounds):
            for e, run_dir in copies.items():
                t0 = time.time()
                start = resume_copy(run_dir, args.steps, args.threads, args.log_every)
                s = seconds_per_step(run_dir, after_step=start + args.log_every)
                times[e].append(s)
                print(f"round {r + 1}/{args.rounds} {e}: {s:.3f} s/step ({time.time() - t0:.0f} s with start-up)",
                      file=sys.stderr, flush=True)
    first = next(iter(times))
    med = {e: statistics.median(v) for e, v in times.items()}
    result = {"out": str(args.out), "seed": args.seed, "steps": args.steps, "rounds": args.rounds,
              "threads": args.threads, "seconds_per_step": times, "median": med,
              "ratio_to": first, "ratio": {e: med[e] / med[first] for e in med}}
    print(f"| experiment | s/step (median of {args.rounds} rounds, {args.threads} thread(s)) | rounds | vs {first} |")
    print("|---|---|---|---|")
    for e in times:
        print(f"| {e} | {med[e]:.3f} | {', '.join(f'{v:.3f}' for v in times[e])} | {result['ratio'][e]:.2f}x |")
    return report_equal_cost(Path(args.report or args.out), med, result, args.json)


def report_equal_cost(report: Path, med: dict, result: dict, json_path: str | None) -> dict:
    """With REPORT/compare.json: the DC-DiTs' quality at each DiT's wall-clock on the s/step `med`
    (a property of the model, not of the seed: every seed of the report is read with them)."""
    from dcgen.compare import equal_cost, equal_cost_summary, report_file
    summary = report_file(report)
    if summary.is_file():
        results = {e: r for e, r in json.loads(summary.read_text())["results"].items() if e in med}
        result["equal_cost"] = equal_cost(results, med)
        print(equal_cost_summary(results, med))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
