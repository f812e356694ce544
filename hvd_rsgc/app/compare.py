"""Several compressors on one config, over one or more seeds, in one job; prints the paper's
Table II shape (method, top-1, delta vs dense SGD, compression ratio) with mean +/- std over
the seeds, and writes compare.json / compare.md / accuracy_vs_bytes.png.

    horovodrun -np 4 python -m hvd_rsgc.compare --config examples/configs/demo.yaml \\
        --methods none,topk,dgc,qsgd,rsdgc --seeds 0,1,2 [--key value ...]

A method is a registered compressor (allreduce through Horovod) or one of the decentralized
algorithms rdpsgd / dpsgd (gossip over MPI: launch with horovodrun --mpi or mpirun).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

from ..registry import names
from .config import help_text, load_config, parse_overrides
from .report import json_safe
from .train import run

GOSSIP = ("rdpsgd", "dpsgd")     # decentralized algorithms, no compressor

METRICS = (("final_top1", "top-1"), ("final_aa", "AA"), ("final_kappa", "kappa"))


def _mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(results: list[dict]) -> list[dict]:
    """Per method: mean and std over seeds of top-1 / AA / kappa, bytes and ratio."""
    out = []
    for m in dict.fromkeys(r["compression"] for r in results):
        runs = [r for r in results if r["compression"] == m]
        row = {"method": m, "seeds": [r["seed"] for r in runs]}
        for key in [k for k, _ in METRICS] + ["bytes_per_worker", "compression_ratio"]:
            row[key], row[key + "_std"] = _mean_std([r.get(key) for r in runs])
        out.append(row)
    return out


def _fmt(x, spec: str, scale: float = 1.0) -> str:
    """A number formatted, or "n/a" (a metric that is missing, e.g. no ratio for a run that
    sent nothing, or NaN)."""
    if x is None or x != x:
        return "n/a"
    return format(scale * x, spec)


def table(rows: list[dict]) -> str:
    dense = next((r for r in rows if r["method"] == "none"), None)
    pm = "\u00b1"
    lines = ["| method | top-1 (%) | AA (%) | kappa | \u0394 top-1 vs SGD | ratio | MiB/worker |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "n/a"
        if dense and r["final_top1"] is not None and dense["final_top1"] is not None:
            delta = _fmt(r["final_top1"] - dense["final_top1"], "+.2f", 100)
        ratio = _fmt(r["compression_ratio"], ".1f")
        lines.append(
            f"| {r['method']} | {_fmt(r['final_top1'], '.2f', 100)} {pm} {_fmt(r['final_top1_std'], '.2f', 100)} | "
            f"{_fmt(r['final_aa'], '.2f', 100)} {pm} {_fmt(r['final_aa_std'], '.2f', 100)} | "
            f"{_fmt(r['final_kappa'], '.3f')} {pm} {_fmt(r['final_kappa_std'], '.3f')} | {delta} | "
            f"{ratio}{'x' if ratio != 'n/a' else ''} | {_fmt(r['bytes_per_worker'], '.2f', 2**-20)} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.errorbar(r["bytes_per_worker"] / 2**20, 100 * r["final_top1"],
                    yerr=100 * r["final_top1_std"], fmt="o", capsize=3, label=r["method"])
    ax.set_xscale("log")
    ax.set_xlabel("MiB sent per worker (log)")
    ax.set_ylabel("top-1 (%), mean \u00b1 std over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hvd_rsgc.compare", description=__doc__,
                                 epilog=help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--methods", default="none,topk,dgc,qsgd,rsdgc")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's seed)")
    ap.add_argument("--name", default="compare")
    args, rest = ap.parse_known_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in names() + GOSSIP]
    if not methods:
        raise SystemExit("--methods: give at least one method")
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {names() + GOSSIP}")
    try:
        overrides = parse_overrides(rest)
        base = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [base.run.seed]
    except ValueError:
        raise SystemExit(f"error: --seeds: expected comma-separated integers, got {args.seeds!r}") from None
    if any(not 0 <= s < 2 ** 63 for s in seeds) or len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: --seeds: distinct integers in [0, 2^63) expected, got {args.seeds!r}")
    results = []
    for m in methods:
        for seed in seeds:
            cfg = load_config(args.config, overrides)
            if m in GOSSIP:
                cfg.decentral.algorithm, cfg.compression.compression = m, "none"
            else:
                cfg.compression.compression = m
            cfg.run.seed = seed
            tag = f"{m}/seed{seed}" if len(seeds) > 1 else m
            cfg.run.run_name, cfg.run.progress = f"{args.name}/{tag}", False
            results.append({**run(cfg, quiet=True), "compression": m, "seed": seed})
    # this process's rank in the runs (asking a group here failed: Horovod in a compare of
    # gossip methods only never started, and MPI may be finalised by then)
    if results[-1]["rank"] != 0:
        return
    rows = aggregate(results)
    out_dir = os.path.join(base.run.out_dir, args.name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "compare.json"), "w") as f:      # first: the runs are kept
        json.dump(json_safe({"runs": results, "summary": rows}), f, indent=2, allow_nan=False)
    text = table(rows)
    png = plot(rows, os.path.join(out_dir, "accuracy_vs_bytes.png"))
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(f"config: {args.config}, seeds {seeds}, {base.optim.epochs} epochs, "
                f"{results[-1]['world_size']} workers; mean \u00b1 std over seeds\n\n{text}\n")
    print(text)
    print(f"\nwritten: {os.path.join(out_dir, 'compare.md')}" + (f", {png}" if png else ""))


if __name__ == "__main__":
    main()
