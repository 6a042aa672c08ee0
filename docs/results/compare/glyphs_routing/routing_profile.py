import json, sys
from dcgen.analysis import load_ema, routing_profile
res = {}
for name in sys.argv[2:]:
    run = f"/work/main/runs/evidence/{name}/run"
    model, objective, task = load_ema(run)
    prof = routing_profile(model, objective, task, timesteps=(0, 100, 250, 500, 750, 999), n=256)
    res[name] = {t: {k: v for k, v in p.items() if k in ("kept", "background_share", "background_kept", "detail_kept", "constant_image_kept")} for t, p in prof.items()}
    print(name, {t: (round(p["kept"], 3), round(p["background_kept"], 3), round(p["detail_kept"], 3)) for t, p in res[name].items()}, flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
