"""``python -m hvd_rsgc.bench step``: training step time per compressor under a real
``horovodrun -np N`` on this machine, as a ratio to the dense fp32 Horovod step measured in the
same rounds (issue #11's overhead bound: a compressed step <= 1.3x the dense one).

Every method gets its own copy of the model (same initial weights) and its own stock
``hvd.DistributedOptimizer``; the methods are interleaved round-robin -- each round runs one
step of every method, starting together after a barrier -- and the table gives, per method,
the median over rounds of (its step time / that round's dense step time) with the min-max
spread, taken on the slowest rank. A step is forward + backward (compression and collectives
start in the backward hooks) + ``opt.step()``. Also bytes sent per rank per step and the
compressor state in fp32 words per parameter.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from .launch import horovodrun_env, read_rank, spread, write_rank

METHODS = {  # label: (registry name, options); plain sparse labels: the default (buckets,
    # kernels="auto": native on a CPU with a C compiler); "per tensor, eager": the reference path
    "dense fp32": ("none", {}),
    "fp16": ("fp16", {}),
    "Top-k": ("topk", {}),
    "Top-k per tensor, eager": ("topk", {"fused": False, "kernels": "eager"}),
    "Random-k": ("randomk", {}),
    "DGC": ("dgc", {}),
    "DGC per tensor, eager": ("dgc", {"fused": False, "kernels": "eager"}),
    "RS-DGC": ("rsdgc", {}),
    "RS-DGC per tensor, eager": ("rsdgc", {"fused": False, "kernels": "eager"}),
    "RS-DGC buckets + compiled": ("rsdgc", {"kernels": "compiled"}),
    "QSGD 1-bit": ("qsgd", {}),
}


def worker(args) -> None:
    import torch
    import torch.nn.functional as F

    from .. import make_compression, make_optimizer
    from ..horovod import horovod_torch
    from .models import build_model
    hvd = horovod_torch()
    hvd.init()
    torch.set_num_threads(args.threads)
    labels = args.methods.split(";")
    runs = {}
    for label in labels:
        name, opts = METHODS[label]
        torch.manual_seed(0)
        model = build_model(args.model, 10, args.image_size)
        named = [(f"{name}{len(runs)}.{n}", p) for n, p in model.named_parameters()]
        kw = dict(opts)
        if name not in ("none", "fp16", "qsgd"):
            kw["density"] = args.density
        comp = make_compression(name, named, **kw)
        opt = hvd.DistributedOptimizer(make_optimizer(comp, model.parameters(), lr=0.01),
                                       named_parameters=named, compression=comp)
        runs[label] = (model, comp, opt)
    g = torch.Generator().manual_seed(hvd.rank())
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    times = {label: [] for label in labels}
    for rnd in range(args.rounds + args.warmup):
        for label in labels:
            model, comp, opt = runs[label]
            hvd.allreduce(torch.zeros(1), name="bench.barrier")
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            dt = time.perf_counter() - t0
            if rnd >= args.warmup:
                times[label].append(dt)
    # the slowest rank's time per round and method
    mat = torch.tensor([times[label] for label in labels], dtype=torch.float64)
    slow = hvd.allreduce(mat, op=hvd.Max, name="bench.times")
    out = {"size": hvd.size(), "rank": hvd.rank(), "params": sum(p.numel() for p in runs[labels[0]][0].parameters()),
           "times": {label: slow[i].tolist() for i, label in enumerate(labels)},
           "bytes": {label: runs[label][1].stats()["step_bytes"] for label in labels},
           "words": {label: runs[label][1].engine.memory_bytes()["words_per_parameter"] for label in labels}}
    write_rank(args.out, hvd.rank(), out)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m hvd_rsgc.bench step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--np", type=int, default=4)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32, help="per rank")
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--methods", default=";".join(METHODS))
    ap.add_argument("--out", default="runs/step")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("np", "rounds", "batch", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    unknown = [m for m in args.methods.split(";") if m not in METHODS]
    if unknown:                 # checked here, not as a KeyError inside every rank
        ap.error(f"--methods: unknown {unknown}; choose from {list(METHODS)} (';'-separated)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    out = os.path.abspath(args.out)
    py = sys.executable
    cmd = [os.path.join(os.path.dirname(py), "horovodrun"), "-np", str(args.np), "--gloo",
           py, "-m", "hvd_rsgc.app.bench_step", "--worker", "--out", out, "--model", args.model,
           "--image-size", str(args.image_size), "--batch", str(args.batch),
           "--density", str(args.density), "--rounds", str(args.rounds), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--methods", args.methods]
    p = subprocess.run(cmd, env=horovodrun_env(), capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        sys.exit(f"bench step failed:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
    r0 = read_rank(out, 0)
    dense = r0["times"]["dense fp32"] if "dense fp32" in r0["times"] else None
    lines = [f"# Step time under horovodrun -np {args.np} on one machine", "",
             f"{args.model} ({r0['params']:,} parameters) at {args.image_size} px, batch {args.batch} per rank, "
             f"density {args.density}, {args.rounds} round-robin rounds after {args.warmup} warm-up, "
             f"{args.threads} torch thread(s) per rank; slowest rank.", "",
             "| method | step ms (median) | x dense step: median [min-max] | bytes sent / rank / step | state words / param |",
             "|---|---|---|---|---|"]
    rows = []
    for label, ts in r0["times"].items():
        ratio = [t / d for t, d in zip(ts, dense)] if dense else None
        rows.append({"method": label, "ms": 1000 * statistics.median(ts),
                     "x_dense": statistics.median(ratio) if ratio else None,
                     "bytes": r0["bytes"][label], "words": r0["words"][label]})
        lines.append(f"| {label} | {1000 * statistics.median(ts):.1f} | {spread(ratio, '-')} | "
                     f"{r0['bytes'][label]:,} | {r0['words'][label]:.2f} |")
    with open(os.path.join(out, "step.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "step.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
