#!/bin/bash
# The schedule-length ablation of docs/TTA.md (2026-12-07): RS-DGC with int8 values, seeds 0-4,
# 100 Mbit/s, each seed's reproducible dense target (docs/results/tta/int8/seedN_deterministic.*),
# cosine over 5 epochs (es5, trained to the end) and over 20 epochs (es20, stopped at the target or
# after 8 epochs). The 10-epoch schedule is the benchmark's default (the README's table).
declare -A T=([0]=0.965 [1]=0.940 [2]=0.920 [3]=0.975 [4]=0.625)
for s in 0 1 2 3 4; do
  python -m hvd_rsgc.bench tta --links 100mbit --methods rsdgc-int8 --epochs_sparse 5 \
     --target "${T[$s]}" --no_stop --extra "--seed $s" --out "runs/es5/seed$s"
  python -m hvd_rsgc.bench tta --links 100mbit --methods rsdgc-int8 --epochs_sparse 20 \
     --target "${T[$s]}" --extra "--seed $s --stop_after 8" --out "runs/es20/seed$s"
done
