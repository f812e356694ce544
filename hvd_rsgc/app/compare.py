"""Several compressors on one config and seed, in one Horovod job; prints the paper's Table II
shape (method, top-1, delta vs dense SGD, compression ratio) and writes compare.json/.md.

    horovodrun -np 4 python -m hvd_rsgc.compare --config examples/configs/demo.yaml \\
        --methods none,topk,dgc,qsgd,rsdgc [--key value ...]
"""
from __future__ import annotations

import argparse
import json
import os

from ..registry import names
from .config import help_text, load_config, parse_overrides
from .train import run


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hvd_rsgc.compare", description=__doc__,
                                 epilog=help_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--methods", default="none,topk,dgc,qsgd,rsdgc")
    ap.add_argument("--name", default="compare")
    args, rest = ap.parse_known_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in names()]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; choose from {names()}")
    try:
        overrides = parse_overrides(rest)
        base = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    results = []
    for m in methods:
        cfg = load_config(args.config, overrides)
        cfg.compression.compression = m
        cfg.run.run_name, cfg.run.progress = f"{args.name}/{m}", False
        results.append(run(cfg, quiet=True))
    from ..horovod import horovod_torch
    hvd = horovod_torch()
    if hvd.rank() != 0:
        return
    dense = next((r for r in results if r["compression"] == "none"), None)
    lines = ["| method | top-1 | Δ vs SGD | compression ratio | MiB/worker |",
             "|---|---|---|---|---|"]
    for r in results:
        delta = f"{100 * (r['final_top1'] - dense['final_top1']):+.2f}" if dense else "n/a"
        lines.append(f"| {r['compression']} | {100 * r['final_top1']:.2f} | {delta} | "
                     f"{r['compression_ratio']:.1f}x | {r['bytes_per_worker'] / 2**20:.2f} |")
    table = "\n".join(lines)
    out_dir = os.path.join(base.run.out_dir, args.name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(f"config: {args.config}, seed {base.run.seed}, {base.optim.epochs} epochs, "
                f"{hvd.size()} workers\n\n{table}\n")
    print(table)
    print(f"\nwritten: {os.path.join(out_dir, 'compare.md')}")


if __name__ == "__main__":
    main()
