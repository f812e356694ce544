"""``python -m hvd_rsgc.bench collective``: bytes received per rank and exchange time versus the
number of ranks P for the dense allreduce, the sparse allgather and the sparse reduce-scatter
(issue #15; docs/COLLECTIVES.md derives the volumes printed beside the measurements).

Each P runs ``horovodrun -np P`` -- one rank per node of the emulated cluster with
``--cluster`` (shaped links, ``--bw``), else P processes on this machine. Every rank owns a
synthetic gradient set of ``--numel`` elements in ``--tensors`` 2-D tensors (fixed per rank, so
every P sees the same per-rank data: weak scaling) and runs ``--steps`` exchanges per method
through the stock ``hvd.DistributedOptimizer`` (backward of ``sum(p * G)`` hands ``G`` to the
hooks; ``opt.synchronize()`` ends the exchange). Reported per P and method: bytes received by
the busiest rank (the byte meter, measured from the collectives' results; the dense row is a
ring allreduce's ``2N(P-1)/P``), the median exchange time (each exchange's slowest rank), its
ratio to the dense exchange of the same round (the methods run round-robin: each round runs
every method once, so a busy machine shifts a whole round alike), and the
weak-scaling efficiency ``c / (c + t(P))`` for a nominal compute time ``c`` per step
(``--compute-ms``, default 100 ms: a ResNet-50 step on one GPU) with no overlap.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from .emucluster import EmuCluster, unavailable
from .launch import ROOT, horovodrun_env, read_rank, spread, write_rank

METHODS = {  # label: (registry name, options)
    "dense fp32 allreduce": ("none", {}),
    "Top-k allgather": ("topk", {"communicator": "allgather"}),
    "Top-k reduce-scatter": ("topk", {"communicator": "reduce_scatter"}),
    "RS-DGC allgather": ("rsdgc", {"communicator": "allgather", "dynamic": False}),
    "RS-DGC reduce-scatter": ("rsdgc", {"communicator": "reduce_scatter", "dynamic": False}),
}


def worker(args) -> None:
    import torch
    import torch.nn as nn

    from .. import make_compression
    from ..horovod import horovod_torch
    hvd = horovod_torch()
    hvd.init()
    torch.set_num_threads(1)
    rows = 1024
    cols = max(1, args.numel // (args.tensors * rows))
    shapes = [(rows, cols)] * args.tensors
    out = {"rank": hvd.rank(), "size": hvd.size(), "numel": rows * cols * args.tensors, "methods": {}}
    gen = torch.Generator().manual_seed(1000 + hvd.rank())
    grads = [torch.randn(s, generator=gen) for s in shapes]
    runs = {}
    for j, label in enumerate(args.methods.split(";")):
        name, opts = METHODS[label]
        model = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in shapes])
        named = [(f"m{j}.w{i}", p) for i, p in enumerate(model)]   # one name per method
        kw = {} if name == "none" else {"density": args.density, **opts}
        comp = make_compression(name, named, **kw)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                       named_parameters=named, compression=comp)
        runs[label] = (name, model, comp, opt, {"times": [], "recv": [], "sent": []})
    # round-robin: every step runs each method once, in turn, so a busy machine (or link)
    # shifts a whole round alike; step 0 is the warm-up
    for step in range(args.steps + 1):
        for name, model, comp, opt, rec in runs.values():
            opt.zero_grad()
            hvd.allreduce(torch.zeros(1), name="bench.barrier")      # start together
            t0 = time.perf_counter()
            sum((p * g).sum() for p, g in zip(model, grads)).backward()
            opt.synchronize()
            dt = time.perf_counter() - t0
            with opt.skip_synchronize():
                opt.step()
            st = comp.stats()
            if step:
                rec["times"].append(dt)
                rec["sent"].append(st["step_bytes"])
                n = hvd.size()
                rec["recv"].append(st["step_received_bytes"] if name != "none"
                                   else 2 * st["step_bytes"] * (n - 1) // n)
    for label, (name, _model, comp, _opt, rec) in runs.items():
        k_units = sum(e.layer.k for e in comp.engine.table.compressed) if name != "none" else None
        out["methods"][label] = {"time_s": statistics.median(rec["times"]), "times_s": rec["times"],
                                 "recv_bytes": max(rec["recv"]), "sent_bytes": max(rec["sent"]),
                                 "k_units": k_units, "collective": comp.stats().get("collective")}
    write_rank(args.out, hvd.rank(), out)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m hvd_rsgc.bench collective", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="2,4,8", help="comma-separated P values")
    ap.add_argument("--numel", type=int, default=4 * 2 ** 20, help="gradient elements per rank")
    ap.add_argument("--tensors", type=int, default=4)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compute-ms", type=float, default=100.0)
    ap.add_argument("--methods", default=";".join(METHODS))
    ap.add_argument("--cluster", action="store_true", help="one rank per emulated node")
    ap.add_argument("--bw", default="1gbit", help="link rate with --cluster")
    ap.add_argument("--out", default="runs/collective")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def formula(label, P, N, k, S):
    """4-byte words received per rank by the derivation of docs/COLLECTIVES.md (values + one
    index per unit; the reduce-scatter's histogram included)."""
    if label.startswith("dense"):
        return 2 * N * (P - 1) / P
    if "allgather" in label:
        return k * (S + 1) * (P - 1)
    # + the region histogram's int32 ring allreduce: 64 bins per rank
    return 2 * k * (S + 1) * (P - 1) / P + 2 * 64 * P * (P - 1) / P


def use_cluster(cluster, nodes: int, bw: str) -> bool:
    """Bring up ``nodes`` nodes, or use the cluster that is up if it is large enough (its links
    shaped to ``bw``; it stays up afterwards). True if this call brought it up (then the bench
    takes it down at the end: one it did not start, it leaves alone)."""
    if cluster.is_up() and cluster.size() >= nodes:
        print(f"[collective] using the {cluster.size()}-node cluster that is up; its links "
              f"are shaped to {bw} and stay so", flush=True)
        cluster.shape("all", bw=bw)
        return False
    if cluster.is_up():
        print(f"[collective] replacing the {cluster.size()}-node cluster that is up", flush=True)
    print(f"[collective] bringing up {nodes} nodes at {bw}", flush=True)
    cluster.up(nodes, bw=bw, extra=("--replace",))
    return True


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    ranks = [int(x) for x in args.ranks.split(",")]
    out = os.path.abspath(args.out)
    py = sys.executable
    hvdrun = os.path.join(os.path.dirname(py), "horovodrun")
    cluster, started = None, False
    if args.cluster:
        why = unavailable()
        if why:
            sys.exit(f"bench collective: {why}")
        cluster = EmuCluster()
        started = use_cluster(cluster, max(ranks), args.bw)
    rows = []
    try:
        for P in ranks:
            run_dir = os.path.join(out, f"P{P}")
            hosts = cluster.hosts(1, P) if cluster else f"localhost:{P}"
            cmd = [hvdrun, "-np", str(P), "-H", hosts, "--gloo", "--start-timeout", "300",
                   "env", f"PYTHONPATH={ROOT}", py, "-m", "hvd_rsgc.app.bench_collective", "--worker",
                   "--out", run_dir, "--numel", str(args.numel), "--tensors", str(args.tensors),
                   "--density", str(args.density), "--steps", str(args.steps), "--methods", args.methods]
            print(f"[collective] P={P}: {' '.join(cmd[:6])} ...", flush=True)
            argv_ = cluster.argv("node1", cmd) if cluster else cmd
            p = subprocess.run(argv_, env=horovodrun_env(cluster.env if cluster else None),
                capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
            if p.returncode != 0:
                sys.exit(f"bench collective: P={P} failed:\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
            per_rank = [read_rank(run_dir, r) for r in range(P)]
            # each exchange's time is its slowest rank's; the methods ran round-robin, so
            # step t of every method is one round, and the ratio to dense is taken per round
            slowest = {label: [max(ts) for ts in zip(*(r["methods"][label]["times_s"]
                                                         for r in per_rank))]
                       for label in per_rank[0]["methods"]}
            dense = next((v for lab, v in slowest.items() if lab.startswith("dense")), None)
            for label in per_rank[0]["methods"]:
                ms = [r["methods"][label] for r in per_rank]
                k = ms[0]["k_units"] or 0
                S = 9 if label.startswith("RS-DGC") else 1
                rows.append({"P": P, "method": label, "numel": per_rank[0]["numel"],
                             "recv_bytes": max(m["recv_bytes"] for m in ms),
                             "formula_bytes": 4 * formula(label, P, per_rank[0]["numel"], k, S),
                             "k_units": k, "time_s": statistics.median(slowest[label]),
                             "x_dense": [a / b for a, b in zip(slowest[label], dense)]
                             if dense else None})
    finally:
        if started:
            cluster.down(check=False)
    c = args.compute_ms / 1000.0
    for r in rows:
        r["efficiency"] = c / (c + r["time_s"])
    where = f"emulated cluster, 1 rank per node, links {args.bw}" if cluster else "one machine"
    lines = [f"# Sparse collectives versus P ({where})", "",
             f"{args.numel:,} gradient elements per rank in {args.tensors} tensors, density "
             f"{args.density}; the methods run round-robin, one exchange each per round, "
             f"{args.steps} rounds; an exchange's time is its slowest rank's; ms: the median, x "
             "dense: median [min-max] of the per-round ratios; efficiency = c/(c+t) for a "
             f"nominal compute time c = {args.compute_ms:g} ms per step.", "",
             "| P | method | MiB received / rank (measured) | by the formula | exchange ms | "
             "x dense | efficiency |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['P']} | {r['method']} | {r['recv_bytes'] / 2**20:.3f} | "
                     f"{r['formula_bytes'] / 2**20:.3f} | {1000 * r['time_s']:.1f} | "
                     f"{spread(r['x_dense'])} | "
                     f"{100 * r['efficiency']:.0f}% |")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "collective.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    with open(os.path.join(out, "collective.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        _plot(rows, out)
    except ImportError:
        pass
    return rows


def _plot(rows, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == label]
        ax[0].plot([r["P"] for r in rs], [r["recv_bytes"] / 2**20 for r in rs], "o-", label=label)
        ax[1].plot([r["P"] for r in rs], [100 * r["efficiency"] for r in rs], "o-", label=label)
    ax[0].set(xlabel="P", ylabel="MiB received per rank per step", yscale="log")
    ax[1].set(xlabel="P", ylabel="weak-scaling efficiency %", ylim=(0, 105))
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "collective.png"), dpi=100)


if __name__ == "__main__":
    main()
