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
from .train import process_group, run

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


def table(rows: list[dict]) -> str:
    dense = next((r for r in rows if r["method"] == "none"), None)
    pm = "\u00b1"
    lines = ["| method | top-1 (%) | AA (%) | kappa | \u0394 top-1 vs SGD | ratio | MiB/worker |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = f"{100 * (r['final_top1'] - dense['final_top1']):+.2f}" if dense else "n/a"
        lines.append(
            f"| {r['method']} | {100 * r['final_top1']:.2f} {pm} {100 * r['final_top1_std']:.2f} | "
            f"{100 * r['final_aa']:.2f} {pm} {100 * r['final_aa_std']:.2f} | "
            f"{r['final_kappa']:.3f} {pm} {r['final_kappa_std']:.3f} | {delta} | "
            f"{r['compression_ratio']:.1f}x | {r['bytes_per_worker'] / 2**20:.2f} |")
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
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {names() + GOSSIP}")
    try:
        overrides = parse_overrides(rest)
        base = load_config(args.config, overrides)
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [base.run.seed]
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
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
    if process_group(base).rank() != 0:
        return
    rows = aggregate(results)
    text = table(rows)
    out_dir = os.path.join(base.run.out_dir, args.name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(json_safe({"runs": results, "summary": rows}), f, indent=2, allow_nan=False)
    png = plot(rows, os.path.join(out_dir, "accuracy_vs_bytes.png"))
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(f"config: {args.config}, seeds {seeds}, {base.optim.epochs} epochs, "
                f"{process_group(base).size()} workers; mean \u00b1 std over seeds\n\n{text}\n")
    print(text)
    print(f"\nwritten: {os.path.join(out_dir, 'compare.md')}" + (f", {png}" if png else ""))


if __name__ == "__main__":
    main()
