"""The router's kept fraction on 256 training items noised to t, overall and split between
background and detail tokens (dcgen.analysis.routing_profile), for each run dir given, from its
EMA export. One thread is enough (a minute per run on the glyphs).

    python docs/results/compare/glyphs_routing/routing_profile.py OUT.json RUN_DIR [RUN_DIR ...]
"""
import json
import sys

from dcgen.analysis import load_ema, routing_profile

KEYS = ("kept", "background_share", "background_kept", "detail_kept", "constant_image_kept")
res = {}
for run in sys.argv[2:]:
    model, objective, task = load_ema(run)
    prof = routing_profile(model, objective, task, timesteps=(0, 100, 250, 500, 750, 999), n=256)
    res[run] = {t: {k: v for k, v in p.items() if k in KEYS} for t, p in prof.items()}
    print(run, {t: (round(p["kept"], 3), round(p["background_kept"], 3), round(p["detail_kept"], 3))
                for t, p in res[run].items()}, flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
