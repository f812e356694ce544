"""Operations per RS-DGC / Top-k / DGC step over the ResNet-50 gradient set (density 0.001, one
rank, encode + decode through the compressor), counted with torch.profiler on a CPU, with
selection routed as on a GPU (exact top-k: one ``torch.topk`` per layer; DGC's threshold: one
compare over the layer; the CPU's block pre-filters are switched off).

"issued" counts the ATen operations Python issues (a ``torch._foreach_*`` call is one, as on
a GPU, where it is one multi-tensor kernel per chunk of tensors), views and metadata left out:
on a GPU each is one kernel launch or a few, and the launches, not the bytes, are what the
per-layer route spends its ~35 ms on. "GPU launches" estimates those: one per issued
operation, except a multi-tensor call whose tensors are not all dense with matching strides,
which on a GPU runs one kernel per tensor (ATen's ``can_use_fast_route``; 2026-12-08: the
grouped route's update used to send every layer of a group with a padded tile that way). Not
a GPU measurement: no GPU was lent to this work.
Run: python docs/results/compress/2026-12-07-grouped-ops.py"""
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from hvd_rsgc.algorithms import select
from hvd_rsgc.bench import _step_fn, build_method, resnet50_shapes

VIEWS = {"aten::view", "aten::slice", "aten::as_strided", "aten::select", "aten::reshape",
         "aten::_reshape_alias", "aten::unbind", "aten::expand", "aten::alias", "aten::detach",
         "aten::lift_fresh", "aten::t", "aten::transpose", "aten::permute", "aten::unsqueeze",
         "aten::squeeze", "aten::split", "aten::split_with_sizes", "aten::narrow", "aten::empty",
         "aten::empty_strided", "aten::resize_", "aten::result_type", "aten::_unsafe_view",
         "aten::contiguous", "aten::view_as", "aten::resolve_conj", "aten::resolve_neg",
         "aten::chunk"}

select.topk_route = lambda n, k, device: None           # exact top-k as on a GPU
select.blocked = lambda n, expected, device: False       # DGC's threshold filter as on a GPU
torch.manual_seed(0)
grads = [torch.randn(s) * 0.01 for s in resnet50_shapes()]
slow = collections.Counter()          # per-tensor kernels of multi-tensor calls off the fast route


def _counted(name, real):
    def wrapped(*args, **kw):
        lists = [a for a in args if isinstance(a, (list, tuple)) and a
                 and all(isinstance(t, torch.Tensor) for t in a)]
        fast = all(t.is_contiguous() and t.stride() == lists[0][j].stride()
                   for lst in lists for j, t in enumerate(lst))
        if lists and not fast:
            slow["extra"] += len(lists[0]) - 1
        return real(*args, **kw)
    return wrapped


for _name in ("_foreach_add_", "_foreach_add", "_foreach_mul_", "_foreach_copy_",
              "_foreach_sub_", "_foreach_norm"):
    setattr(torch, _name, _counted(_name, getattr(torch, _name)))
big = [g for g in grads if g.dim() > 1]
print(f"{len(big)} compressed tensors, {sum(g.numel() for g in big):,} elements, density 0.001\n")
print(f"{'route':26s} {'issued':>7s} {'GPU launches':>13s}  most issued")
for name, label in (("rsdgc-eager", "RS-DGC per tensor, eager"),
                    ("rsdgc-fused-eager", "RS-DGC buckets, eager"),
                    ("rsdgc-fused-grouped", "RS-DGC buckets, grouped"),
                    ("topk-eager", "Top-k per tensor, eager"),
                    ("topk-fused-eager", "Top-k buckets, eager"),
                    ("topk-fused-grouped", "Top-k buckets, grouped"),
                    ("dgc-eager", "DGC per tensor, eager"),
                    ("dgc-fused-eager", "DGC buckets, eager"),
                    ("dgc-fused-grouped", "DGC buckets, grouped")):
    comp, m, layers = build_method(name, big, 0.001)
    fn = _step_fn(m, layers, big, {"bytes": 0}, comp)
    fn()
    fn()
    slow.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    issued = collections.Counter()
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is not None:                  # called by another ATen op: part of it
            continue
        if ev.name not in VIEWS:
            issued[ev.name] += 1
    common = ", ".join(f"{k[6:]} {v}" for k, v in issued.most_common(5))
    n = sum(issued.values())
    print(f"{label:26s} {n:7d} {n + slow['extra']:13d}  {common}")
