#!/usr/bin/env python
"""Convert a foreign checkpoint into a dcgen export directory (config.json + model.safetensors + dcgen.json).

    python tools/convert_checkpoint.py --format dit --input DiT-XL-2-256x256.pt --output exports/dit-xl2
    python tools/convert_checkpoint.py --format amd-dcdit --input 0400000.pt --output exports/dcdit-b [--use model]

Then `dcgen.load_model("exports/dcdit-b")` or `dcgen sample run_dir=exports/dcdit-b`.
"""
from __future__ import annotations

import argparse
import os
import sys

try:
    import dcgen  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dcgen.compat.convert import convert_amd_dcdit, convert_dit  # noqa: E402
from dcgen.io import export_model  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", required=True, choices=["dit", "amd-dcdit"],
                    help="dit: facebookresearch/DiT; amd-dcdit: AMD-AGI/DynamicChunkingDiT")
    ap.add_argument("--input", required=True, help="checkpoint file (.pt)")
    ap.add_argument("--output", required=True, help="export directory to write (replaced if it is an export)")
    ap.add_argument("--use", choices=["ema", "model"], default=None,
                    help="which weights of a {model, ema} checkpoint (default: ema)")
    ap.add_argument("--num-heads", type=int, default=None,
                    help="attention heads, for widths other than the published sizes")
    ap.add_argument("--input-size", type=int, nargs="+", default=None,
                    help="input size per axis, only needed when the checkpoint has no pos_embed")
    ap.add_argument("--dechunk-sigma", type=float, default=None,
                    help="amd-dcdit: de-chunk sigma (default: the checkpoint's config, else 1.0)")
    ap.add_argument("--cfg-channels", choices=["all", "legacy3"], default=None,
                    help="guided channels written to sample.cfg_channels (default: dit legacy3, amd-dcdit all)")
    args = ap.parse_args(argv)

    try:
        if args.format == "dit":
            model, extra = convert_dit(args.input, use=args.use, num_heads=args.num_heads,
                                       input_size=args.input_size, cfg_channels=args.cfg_channels or "legacy3")
        else:
            model, extra = convert_amd_dcdit(args.input, use=args.use or "ema", num_heads=args.num_heads,
                                             dechunk_sigma=args.dechunk_sigma, input_size=args.input_size,
                                             cfg_channels=args.cfg_channels or "all")
        out = export_model(model, args.output, extra)
    except (ValueError, FileNotFoundError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 1
    n = sum(p.numel() for p in model.parameters())
    cfg = model.config
    print(f"wrote {out}: {type(model).__name__} D={cfg['hidden_size']} depth={cfg['depth']} "
          f"heads={cfg['num_heads']} input={cfg['input_size']} classes={cfg['num_classes']} "
          f"({n / 1e6:.2f}M parameters, weights: {extra['source']['weights']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
