"""Host time per compression step (encode + decode, one rank) when the arithmetic is
negligible: ResNet-50's 54 compressed layers in its order, each cut to at most 16 x 16 kernels /
64 x 64 matrices (52,528 elements in all), density 0.01, one thread, 15 round-robin rounds,
median. What is left is Python and the dispatch of each operation: a proxy for the regime of a
GPU, where the arithmetic is fast and each operation costs a launch (a CPU sort is still far
slower than a GPU's). Not a GPU measurement: no GPU was lent to this work.
Run: python docs/results/compress/2026-12-07-grouped-host.py"""
import statistics
import time

import torch

from hvd_rsgc.bench import _step_fn, build_method, resnet50_shapes

ROWS = ["rsdgc-eager", "rsdgc-fused-eager", "rsdgc-fused-grouped", "topk-eager",
        "topk-fused-eager", "topk-fused-grouped", "dgc-eager", "dgc-fused-eager", "dgc-fused-grouped"]


def small(shape):
    if len(shape) == 4:
        return (min(shape[0], 16), min(shape[1], 16), shape[2], shape[3])
    return (min(shape[0], 64), min(shape[1], 64))


torch.set_num_threads(1)
torch.manual_seed(0)
big = [torch.randn(small(s)) * 0.01 for s in resnet50_shapes() if len(s) > 1]
print(f"{len(big)} layers, {sum(g.numel() for g in big):,} elements, density 0.01, 1 thread")
fns = {}
for name in ROWS:
    comp, m, layers = build_method(name, big, 0.01)
    fns[name] = _step_fn(m, layers, big, {"bytes": 0}, comp)
    fns[name]()
    fns[name]()
times: dict = {name: [] for name in ROWS}
for _ in range(15):
    for name in ROWS:
        t = time.perf_counter()
        fns[name]()
        times[name].append(1e3 * (time.perf_counter() - t))
for name in ROWS:
    print(f"{name:24s} {statistics.median(times[name]):7.2f} ms "
          f"[{min(times[name]):.2f}-{max(times[name]):.2f}]")
