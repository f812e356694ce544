"""The README's table of reproducible time-to-accuracy runs (seeds 0-4, --deterministic true)
from the seedN_deterministic.json files beside this script:

    python docs/results/tta/int8/deterministic_summary.py 0 1 2 3 4

Per seed: the target (dense fp32's final top-1), then per method the training seconds to the
first epoch at or above it, that epoch, the ratio to dense (and to fp16), the accuracies and
the seconds of every epoch."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def first(epochs, target):
    total = 0.0
    for e in epochs:
        total += e["seconds"]
        if e["top1"] >= target - 1e-9:
            return total, e["epoch"]
    return None, None


for seed in sys.argv[1:]:
    with open(os.path.join(HERE, f"seed{seed}_deterministic.json")) as f:
        runs = json.load(f)["runs"]["100mbit"]
    target = runs["none"]["epochs"][-1]["top1"]
    reached = {m: first(r["epochs"], target) for m, r in runs.items()}
    print(f"seed {seed} target {target:.3f}")
    for m in ("none", "fp16", "rsdgc", "rsdgc-int8"):
        t, ep = reached[m]
        vs = f"{reached['none'][0] / t:.2f}x" if t else "-"
        vs16 = f"{reached['fp16'][0] / t:.2f}x" if t and reached["fp16"][0] else "-"
        accs = " ".join(f"{e['top1']:.3f}" for e in runs[m]["epochs"])
        secs = " ".join(f"{e['seconds']:.1f}" for e in runs[m]["epochs"])
        print(f"  {m}: {'not reached' if t is None else f'{t:.1f} s (epoch {ep})'}, {vs} dense, "
              f"{vs16} fp16 | {accs} | {secs}")
