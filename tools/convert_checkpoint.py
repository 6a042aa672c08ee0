#!/usr/bin/env python
"""Convert a foreign checkpoint into a dcgen export: a driver of `dcgen convert` (dcgen.compat.convert),
kept for the old spelling; its options map to the command's keys.

    python tools/convert_checkpoint.py --format dit --input DiT-XL-2-256x256.pt --output exports/dit-xl2
    dcgen convert format=dit input=DiT-XL-2-256x256.pt out_dir=exports/dit-xl2      # the same
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", required=True)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    for opt in ("--use", "--num-heads", "--dechunk-sigma", "--cfg-channels"):
        ap.add_argument(opt, default=None)
    ap.add_argument("--input-size", nargs="+", default=None)
    a = ap.parse_args(argv)
    keys = [f"format={a.format}", f"input={a.input}", f"out_dir={a.output}"]
    for name in ("use", "num_heads", "dechunk_sigma", "cfg_channels"):
        if getattr(a, name) is not None:
            keys.append(f"{name}={getattr(a, name)}")
    if a.input_size:
        keys.append(f"input_size=[{','.join(a.input_size)}]")
    from dcgen.cli import main as dcgen
    return dcgen(["convert", *keys])


if __name__ == "__main__":
    sys.exit(main())
