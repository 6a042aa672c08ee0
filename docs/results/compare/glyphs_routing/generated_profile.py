"""The router's kept fraction on the model's own samples against the training images: for each run
dir, 256 samples (DDPM, 50 steps, guidance 3, labels i mod classes, seed 0) are drawn with the
sampler's record of the kept fraction at every call (the conditional half, as `dcgen compare`'s
kept-fraction-vs-t curve), then the clamped samples and the first 256 training images are each
noised to t and routed (dcgen.analysis.routing_profile). One thread, a few minutes per run.

    python docs/results/compare/glyphs_routing/generated_profile.py OUT.json RUN_DIR [RUN_DIR ...]
"""
import json
import sys

import torch

from dcgen.analysis import load_ema, routing_profile
from dcgen.sample import generate

TS = (0, 100, 250, 500, 750, 999)
KEYS = ("kept", "background_share", "background_kept", "detail_kept")
res = {}
for run in sys.argv[2:]:
    model, objective, task = load_ema(run)
    labels = [i % task.num_classes for i in range(256)]
    g = generate(model, objective, task, num_samples=256, steps=50, sampler="ddpm", labels=labels, seed=0,
                 cfg_scale=3.0, batch_size=128, record=True)
    kept = g["kept"].double().mean(0)  # per sampler call, over the samples
    x0 = g["samples"].clamp(-1, 1)
    gen = routing_profile(model, objective, task, timesteps=TS, x0=x0, labels=torch.as_tensor(labels))
    train = routing_profile(model, objective, task, timesteps=TS, n=256)
    res[run] = {"sampler": {"t": [float(t) for t in g["ts"]], "kept": kept.tolist()},
                "generated": {t: {k: p[k] for k in KEYS} for t, p in gen.items()},
                "training": {t: {k: p[k] for k in KEYS} for t, p in train.items()}}
    print(run, "sampler first/last call", round(float(kept[0]), 3), round(float(kept[-1]), 3),
          "| t: generated / training", {t: (round(gen[t]["kept"], 3), round(train[t]["kept"], 3)) for t in TS},
          flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
