"""The README's table of reproducible time-to-accuracy runs (seeds 0-4, --deterministic true)
from the seedN_deterministic.json files beside this script, analysed by ``bench tta``'s own
``analyse`` (target: the dense run's final top-1):

    python docs/results/tta/int8/deterministic_summary.py 0 1 2 3 4

Per seed: the target, then per method the training seconds to the first epoch at or above it,
that epoch, the ratio to dense (and to fp16), the accuracies and the seconds of every epoch."""
import json
import os
import sys

from hvd_rsgc.app.bench_tta import analyse

HERE = os.path.dirname(os.path.abspath(__file__))

for seed in sys.argv[1:]:
    with open(os.path.join(HERE, f"seed{seed}_deterministic.json")) as f:
        runs = json.load(f)["runs"]["100mbit"]
    rep = analyse({"100mbit": runs}, "dense-final")["100mbit"]
    target = rep["target"]
    print(f"seed {seed} target {target:.3f}")
    for m in ("none", "fp16", "rsdgc", "rsdgc-int8"):
        row, epochs = rep["rows"][m], runs[m]["epochs"]
        t = row["tta_train_s"]
        ep = next((e["epoch"] for e in epochs if e["top1"] >= target - 1e-9), None)
        vs, vs16 = row["speedup_train_vs_none"], row["speedup_train_vs_fp16"]
        accs = " ".join(f"{e['top1']:.3f}" for e in epochs)
        secs = " ".join(f"{e['seconds']:.1f}" for e in epochs)
        print(f"  {m}: {'not reached' if t is None else f'{t:.1f} s (epoch {ep})'}, "
              f"{f'{vs:.2f}x' if vs else '-'} dense, {f'{vs16:.2f}x' if vs16 else '-'} fp16 | {accs} | {secs}")
