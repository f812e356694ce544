"""Benchmarks that print ratios measured side by side in one run (no assertions).

    python -m hvd_rsgc.bench compress [--density 0.001] [--repeats 5] [--device cpu|cuda]

For each method: compress (accumulate + select + pack) + decompress (unpack + scatter) of one
step over a gradient set with ResNet-50's parameter shapes (25.6M elements), as one rank
(decode of its own message), next to exact ``torch.topk`` per tensor and a single ``abs()``
pass over the same data (the memory-bound floor). Also bytes on the wire per rank per step
and the compression ratio (1-D tensors sent dense, as in training).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from .algorithms.base import LayerState
from .algorithms.dgc import DGC
from .algorithms.memory import ErrorFeedback, MomentumCorrection, NoMemory
from .algorithms.nsi import ceil_count
from .algorithms.qsgd import QSGD
from .algorithms.randomk import RandomK
from .algorithms.rsdgc import RSDGC
from .algorithms.topk import TopK


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's ResNet-50 (25,557,032 elements), without torchvision."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inp = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            out = width * 4
            shapes += [(width, inp, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (out, width, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, inp, 1, 1), (out,), (out,)]
            inp = out
    shapes += [(1000, 2048), (1000,)]
    return shapes


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats):
    fn()                                    # warm-up
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def methods(density):
    return {
        "rsdgc": lambda: RSDGC(MomentumCorrection(0.9)),
        "rsdgc-sampled": lambda: RSDGC(MomentumCorrection(0.9), selection="sampled"),
        "rsdgc-fp16": lambda: RSDGC(MomentumCorrection(0.9), value_dtype=torch.float16),
        "dgc": lambda: DGC(MomentumCorrection(0.9)),
        "topk": lambda: TopK(ErrorFeedback()),
        "randomk": lambda: RandomK(ErrorFeedback()),
        "qsgd-1bit": lambda: QSGD(NoMemory(), levels=1, bucket_size=512),
    }


def bench_compress(density=0.001, repeats=5, device="cpu", names=None):
    device = torch.device(device)
    torch.manual_seed(0)
    shapes = resnet50_shapes()
    grads = [torch.randn(s, device=device) * 0.01 for s in shapes]
    big = [g for g in grads if g.dim() > 1]
    small = [g for g in grads if g.dim() <= 1]
    total = sum(g.numel() for g in grads)
    dense_bytes = 4 * total
    small_bytes = 4 * sum(g.numel() for g in small)
    print(f"gradient set: ResNet-50 shapes, {len(shapes)} tensors, {total:,} elements "
          f"({len(big)} compressed, {total - sum(g.numel() for g in small):,} elements); "
          f"density {density}; device {device}; median of {repeats}")

    t_abs = _time(lambda: [g.abs() for g in big], device, repeats)
    t_topk = _time(lambda: [torch.topk(g.view(-1).abs(), ceil_count(density, g.numel()),
                                       sorted=False) for g in big], device, repeats)
    rows = [("abs() pass", t_abs, None), ("exact torch.topk", t_topk, None)]

    for name, make in methods(density).items():
        if names and name not in names:
            continue
        m = make()
        layers = []
        for i, g in enumerate(big):
            lay = LayerState(name=str(i), index=i, shape=g.shape, dtype=g.dtype,
                             layout=m.make_layout(g.shape))
            lay.density = density
            lay.k = m.units_for(lay, density)
            m.on_density(lay)
            m.init_memory(lay, device)
            layers.append(lay)
        wire = {"bytes": 0}

        def step():
            nbytes = 0
            for lay, g in zip(layers, big):
                ctx = {}
                msg = m.encode(lay, g, ctx)
                nbytes += msg.numel() * msg.element_size()
                m.decode(lay, msg, 1, ctx)
                lay.step += 1
            wire["bytes"] = nbytes
        t = _time(step, device, repeats)
        rows.append((name, t, wire["bytes"] + small_bytes))

    print(f"\n{'method':18s} {'time ms':>9s} {'x abs':>7s} {'topk/x':>7s} "
          f"{'bytes/step':>12s} {'ratio':>8s}")
    for name, t, nbytes in rows:
        b = f"{nbytes:12,d}" if nbytes is not None else " " * 12
        r = f"{dense_bytes / nbytes:8.1f}" if nbytes else " " * 8
        print(f"{name:18s} {t * 1e3:9.1f} {t / t_abs:7.2f} {t_topk / t:7.2f} {b} {r}")
    print(f"\ndense fp32: {dense_bytes:,} bytes/step; 1-D tensors (sent dense): {small_bytes:,} bytes")
    print("x abs = time / one abs() pass over the compressed tensors (lower is better); "
          "topk/x = how many times faster than exact torch.topk")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hvd_rsgc.bench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compress", help="compress+decompress time and bytes per method")
    c.add_argument("--density", type=float, default=0.001)
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--methods", default=None, help="comma-separated subset")
    args = ap.parse_args(argv)
    if args.cmd == "compress":
        bench_compress(args.density, args.repeats, args.device,
                       args.methods.split(",") if args.methods else None)


if __name__ == "__main__":
    main()
