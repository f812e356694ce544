"""Benchmarks that print ratios measured side by side in one run (no assertions).

    python -m hvd_rsgc.bench compress [--density 0.001] [--repeats 5] [--device cpu|cuda]
    python -m hvd_rsgc.bench decode [--densities 0.25,0.0625,0.01,0.001] [--ranks 4]
    python -m hvd_rsgc.bench update [--repeats 15]     (native update + scoring per layout)
    python -m hvd_rsgc.bench rdpsgd
    python -m hvd_rsgc.bench step [--np 4] [--model resnet20]   (horovodrun on this machine)
    python -m hvd_rsgc.bench collective [--cluster] [--ranks 2,4,8]
    python -m hvd_rsgc.bench tta [--nodes 4] [--links 100mbit,1gbit]    (emulated cluster; root)

For each method: compress (accumulate + select + pack) + decompress (unpack + scatter) of one
step over a gradient set with ResNet-50's parameter shapes (25.6M elements), as one rank
(decode of its own message), next to exact ``torch.topk`` per tensor and a single ``abs()``
pass over the same data into preallocated outputs (the memory-bandwidth floor: one read and one
write of every element; methods that return fresh tensors also pay the page faults). Also bytes on the wire per rank per step
and the compression ratio (1-D tensors sent dense, as in training). Multi-round methods
(PowerSGD) run their rounds over a 1-process :class:`~hvd_rsgc.transport.LocalTransport`
whose byte meter gives the bytes. ``density`` applies to the methods that take one.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from .algorithms.select import ceil_count
from .engine import ByteMeter
from .registry import make_compression, spec
from .transport import LocalTransport


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


def _once(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _spread(xs) -> str:
    """median [min-max] of a list of ratios."""
    return f"{statistics.median(xs):6.2f} [{min(xs):.2f}-{max(xs):.2f}]"


# bench row -> (registered compressor, options); every layer at the same density (RS-DGC's
# dynamic density would make the rows incomparable). Plain names: the default (buckets +
# kernels="auto", i.e. native on a CPU with a C compiler); "-eager": the per-tensor reference
# path; "-fused-eager" / "-fused-compiled" / "-fused-grouped": buckets with the other kernels
# ("grouped": whole-group tensor operations, algorithms/grouped.py, the route meant for GPUs).
METHODS = {
    "rsdgc": ("rsdgc", {"dynamic": False}),
    "rsdgc-eager": ("rsdgc", {"dynamic": False, "kernels": "eager", "fused": False}),
    "rsdgc-fused-eager": ("rsdgc", {"dynamic": False, "kernels": "eager"}),
    "rsdgc-fused-compiled": ("rsdgc", {"dynamic": False, "kernels": "compiled"}),
    "rsdgc-fused-grouped": ("rsdgc", {"dynamic": False, "kernels": "grouped"}),
    "rsdgc-sampled": ("rsdgc", {"dynamic": False, "selection": "sampled"}),
    "rsdgc-sampled-fused-grouped": ("rsdgc", {"dynamic": False, "selection": "sampled",
                                              "kernels": "grouped"}),
    "rsdgc-fp16": ("rsdgc", {"dynamic": False, "fp16_values": True}),
    "rsdgc-int8": ("rsdgc", {"dynamic": False, "int8_values": True}),
    "dgc": ("dgc", {}),
    "dgc-eager": ("dgc", {"kernels": "eager", "fused": False}),
    "dgc-fused-eager": ("dgc", {"kernels": "eager"}),
    "dgc-fused-grouped": ("dgc", {"kernels": "grouped"}),
    "topk": ("topk", {}),
    "topk-eager": ("topk", {"kernels": "eager", "fused": False}),
    "topk-fused-eager": ("topk", {"kernels": "eager"}),
    "topk-fused-grouped": ("topk", {"kernels": "grouped"}),
    "randomk": ("randomk", {}),
    "qsgd-1bit": ("qsgd", {"levels": 1, "bucket_size": 512}),
    "powersgd-r4": ("powersgd", {"rank": 4}),
    "signsgd": ("signsgd", {}),
    "efsignsgd": ("efsignsgd", {}),
    "terngrad": ("terngrad", {}),
    "natural": ("natural", {}),
    # the bench's gradients are N(0, 0.01^2) and the same every repeat: without the residual,
    # 3 sigma sends ~0.27% of the elements on every step (with it, the count would grow per repeat)
    "threshold": ("threshold", {"threshold": 0.03, "error_feedback": False}),
}


def build_method(row: str, grads, density: float):
    """The registered compressor of ``row`` over ``grads`` (as parameters); returns it, its
    method and the ready layer of each tensor (memory allocated, density and k set)."""
    name, options = METHODS[row]
    params = [(f"t{i}", torch.nn.Parameter(g.clone())) for i, g in enumerate(grads)]
    if "density" in spec(name).options():
        options = {"density": density, **options}
    comp = make_compression(name, params, min_numel=0, **options)
    layers = []
    for e, g in zip(comp.engine.table, grads):
        comp.engine.begin(e, g, 1)
        e.layer.step -= 1                   # begin() counted a step; the bench counts its own
        layers.append(e.layer)
    return comp, comp.method, layers


def _step_fn(m, layers, big, wire, comp=None):
    if comp is not None and comp.fused:           # one message per bucket (of bucket_mb)
        from .algorithms.bucket import BucketCodec, make_buckets
        entries = list(comp.engine.table.backward_order())
        codecs = [BucketCodec(m, [e.layer for e in b]) for b in make_buckets(entries, comp.bucket_bytes)]
        by_name = {lay.name: g for lay, g in zip(layers, big)}

        def fused_step():
            nbytes = 0
            for c in codecs:
                ctxs = {st.name: {} for st in c.layers}
                msgs = c.encode({st.name: by_name[st.name] for st in c.layers}, ctxs)
                nbytes += sum(x.numel() * x.element_size() for x in msgs)
                c.decode(msgs)
                for st in c.layers:
                    st.step += 1
            wire["bytes"] = nbytes
        return fused_step

    def step():
        nbytes = 0
        if getattr(m, "rounds", "single") == "multi":
            for lay, g in zip(layers, big):
                lay.step += 1
                m.accumulate(lay, g)
            local = LocalTransport(ByteMeter())
            m.run(layers, local, True, layers[0].step)
            nbytes = local.meter.totals["bytes"]
        else:
            for lay, g in zip(layers, big):
                ctx = {}
                msg = m.encode(lay, g, ctx)
                nbytes += msg.numel() * msg.element_size()
                m.decode(lay, msg, 1, ctx)
                lay.step += 1
        wire["bytes"] = nbytes
    return step


def bench_compress(density=0.001, repeats=5, device="cpu", names=None):
    """Round-robin: each round times one abs() pass, exact top-k and every method once, in
    that order, and every figure is a ratio to *that round's* abs pass; the table gives the
    median over rounds and the min-max spread, so load that comes and goes shifts a whole
    round alike instead of one method's figure."""
    device = torch.device(device)
    torch.manual_seed(0)
    shapes = resnet50_shapes()
    grads = [torch.randn(s, device=device) * 0.01 for s in shapes]
    big = [g for g in grads if g.dim() > 1]
    small = [g for g in grads if g.dim() <= 1]
    total = sum(g.numel() for g in grads)
    dense_bytes = 4 * total
    small_bytes = 4 * sum(g.numel() for g in small)
    n_big = total - sum(g.numel() for g in small)
    print(f"gradient set: ResNet-50 shapes, {len(shapes)} tensors, {total:,} elements "
          f"({len(big)} compressed, {n_big:,} elements); density {density}; device {device}; "
          f"{repeats} rounds, round-robin, torch threads {torch.get_num_threads()}")

    outs = [torch.empty_like(g) for g in big]

    def abs_pass():                  # into preallocated outputs: read + write, no page faults
        return [torch.abs(g, out=o) for g, o in zip(big, outs)]

    def topk():
        return [torch.topk(g.view(-1).abs(), ceil_count(density, g.numel()), sorted=False) for g in big]

    entries = {"abs() pass": (abs_pass, None, None), "exact torch.topk": (topk, None, None)}
    for name in METHODS:
        if names and name not in names:
            continue
        comp, m, layers = build_method(name, big, density)
        wire = {"bytes": 0}
        entries[name] = (_step_fn(m, layers, big, wire, comp), wire, comp)
    for fn, _, _ in entries.values():           # warm-up: allocations, workspaces, plans
        fn()
    times = {k: [] for k in entries}
    for _ in range(repeats):
        for k, (fn, _, _) in entries.items():
            times[k].append(_once(fn, device))
    absr = times["abs() pass"]

    print(f"\n{'method':18s} {'ms (median)':>11s} {'x abs: median [min-max]':>25s} "
          f"{'topk/x':>7s} {'bytes/step':>12s} {'ratio':>8s} {'state words/param':>18s}")
    rows = []
    for k, (_, wire, comp) in entries.items():
        ratios = [t / a for t, a in zip(times[k], absr)]
        vs_topk = statistics.median([tk / t for tk, t in zip(times["exact torch.topk"], times[k])])
        nbytes = wire["bytes"] + small_bytes if wire is not None else None
        mem = comp.engine.memory_bytes()["words_per_parameter"] if comp is not None else None
        b = f"{nbytes:12,d}" if nbytes is not None else " " * 12
        r = f"{dense_bytes / nbytes:8.1f}" if nbytes else " " * 8
        w = f"{mem:18.2f}" if mem is not None else " " * 18
        print(f"{k:18s} {statistics.median(times[k]) * 1e3:11.1f} {_spread(ratios):>25s} "
              f"{vs_topk:7.2f} {b} {r} {w}")
        rows.append({"method": k, "ms": statistics.median(times[k]) * 1e3,
                     "x_abs": statistics.median(ratios), "x_abs_min": min(ratios),
                     "x_abs_max": max(ratios), "vs_topk": vs_topk, "bytes": nbytes,
                     "words_per_param": mem})
    print(f"\ndense fp32: {dense_bytes:,} bytes/step; 1-D tensors (sent dense): {small_bytes:,} bytes")
    print("x abs = time / the same round's abs() pass over the compressed tensors (lower is better); "
          "topk/x = how many times faster than exact torch.topk (median of rounds); state words/param = "
          "compressor state (residual, momentum, workspaces) per compressed parameter, in fp32 words")
    return rows


def bench_decode(densities=(0.25, 0.0625, 0.01, 0.001), ranks=4, repeats=7,
                 rows=("rsdgc", "dgc", "topk")):
    """A bucket's decode of ``ranks`` ranks' messages (the ResNet-50 set, every rank's message
    from a different gradient), the native C loop and the index-tensor route alternately on the
    same messages (their sums compared bit for bit); the warm-up's densities are where
    decoding costs most. Returns one row per method and density."""
    from .algorithms.bucket import BucketCodec, make_buckets
    torch.manual_seed(0)
    grads = [torch.randn(s) * 0.01 for s in resnet50_shapes()]
    big = [g for g in grads if g.dim() > 1]
    print(f"bucket decode of {ranks} ranks' messages, ResNet-50 set ({sum(g.numel() for g in big):,} "
          f"compressed elements), {repeats} rounds, C loop and index tensors alternately\n")
    print(f"{'method':8s} {'density':>8s} {'C ms':>8s} {'index ms':>9s} {'C / index: median [min-max]':>29s}")
    out_rows = []
    for row in rows:
        for d in densities:
            comp, m, layers = build_method(row, big, d)
            if m.kernels != "native":
                print(f"{row:8s} native kernels unavailable (no C compiler)")
                break
            by_name = {lay.name: g for lay, g in zip(layers, big)}
            entries = list(comp.engine.table.backward_order())
            work = []
            for b in make_buckets(entries, comp.bucket_bytes):
                c = BucketCodec(m, [e.layer for e in b])
                msgs = [c.encode({st.name: by_name[st.name] * (1 + r) for st in c.layers},
                                 {st.name: {} for st in c.layers}) for r in range(ranks)]
                work.append((c, [torch.cat([mm[j] for mm in msgs]) for j in range(len(c.groups))]))

            def run(nat):
                out = {}
                for c, gathered in work:
                    c.native = nat
                    out.update(c.decode(gathered))
                return out
            a, b = run(True), run(False)
            same = all(torch.equal(a[k], b[k]) for k in a)
            t = {True: [], False: []}
            for _ in range(repeats):
                for nat in (True, False):
                    t[nat].append(_once(lambda: run(nat), torch.device("cpu")))
            r = [x / y for x, y in zip(t[True], t[False])]
            print(f"{row:8s} {d:8g} {statistics.median(t[True]) * 1e3:8.1f} "
                  f"{statistics.median(t[False]) * 1e3:9.1f} {_spread(r):>29s} "
                  f"{'same sums' if same else 'SUMS DIFFER'}")
            out_rows.append({"method": row, "density": d, "c_ms": statistics.median(t[True]) * 1e3,
                             "index_ms": statistics.median(t[False]) * 1e3,
                             "ratio": statistics.median(r), "same": same})
    return out_rows


def bench_update(repeats=15):
    """The native residual update + what selection reads, alone (no selection, no message), per
    group of ResNet-50's compressed tensors, round-robin with an ``abs()`` pass over the same
    tensors into preallocated outputs: RS-DGC's kernel tensors (``hr_units``: update + NSI of
    contiguous 3x3 units), its tile tensors (``hr_tiles``: 1x1 convolutions and the linear
    layer, update + column sums + NSI of 3x3 tiles), and DGC's element tensors (``hr_blocks``:
    update + max / min of every block of 64). Momentum correction (five streams: read g, u, v,
    write u, v) against the abs pass's two or three: ~1.7x is the floor."""
    from .algorithms import native
    from .algorithms.select import BLOCK
    if not native.available():
        print("native kernels unavailable (no C compiler)")
        return []
    torch.manual_seed(0)
    big = [torch.randn(s) * 0.01 for s in resnet50_shapes() if len(s) > 1]
    _, rs, rs_layers = build_method("rsdgc", big, 0.001)
    _, dgc, dgc_layers = build_method("dgc", big, 0.001)
    groups = {"RS-DGC kernels (hr_units)": [], "RS-DGC tiles (hr_tiles)": [],
              "DGC elements (hr_blocks)": []}
    for st, g in zip(rs_layers, big):
        key = "RS-DGC tiles (hr_tiles)" if st.layout.kind == "tile" else "RS-DGC kernels (hr_units)"
        groups[key].append((st, g, torch.empty_like(g), torch.empty(st.layout.num_units)))
    for st, g in zip(dgc_layers, big):
        nb = st.layout.numel // BLOCK
        groups["DGC elements (hr_blocks)"].append((st, g, torch.empty_like(g), (torch.empty(nb), torch.empty(nb))))

    def run(name, items):
        for st, g, _, out in items:
            if name.startswith("DGC"):
                native.accumulate_extremes(dgc.memory, st, g, BLOCK, *out)
            else:
                native.accumulate_scores(rs.memory, st, g, rs.beta, out)

    def run_abs(items):
        for _, g, o, _ in items:
            torch.abs(g, out=o)

    for name, items in groups.items():              # warm-up
        run(name, items)
        run_abs(items)
    times = {k: ([], []) for k in groups}
    for _ in range(repeats):
        for name, items in groups.items():
            times[name][0].append(_once(lambda: run_abs(items), torch.device("cpu")))
            times[name][1].append(_once(lambda: run(name, items), torch.device("cpu")))
    print(f"native update + scoring, ResNet-50's compressed tensors, momentum correction, "
          f"{repeats} rounds, round-robin, torch threads {torch.get_num_threads()}\n")
    print(f"{'group':28s} {'tensors':>7s} {'elements':>12s} {'abs ms':>7s} {'ms':>7s} "
          f"{'x abs: median [min-max]':>25s}")
    rows = []
    for name, (a, b) in times.items():
        n = sum(st.layout.numel for st, *_ in groups[name])
        ratios = [y / x for x, y in zip(a, b)]
        print(f"{name:28s} {len(groups[name]):7d} {n:12,d} {statistics.median(a) * 1e3:7.2f} "
              f"{statistics.median(b) * 1e3:7.2f} {_spread(ratios):>25s}")
        rows.append({"group": name, "elements": n, "abs_ms": statistics.median(a) * 1e3,
                     "ms": statistics.median(b) * 1e3, "x_abs": statistics.median(ratios)})
    return rows


def bench_rdpsgd(numel=25_557_032, ratios=(0.5, 0.1, 0.01), repeats=5, loop_sample=20_000):
    """RD-PSGD's programming optimisations, side by side (paper Table 2), **round-robin**: each
    round times, once each, index generation by geometric gaps and by N Bernoulli draws, and
    extraction + expansion with index_select/index_copy_, with a boolean mask
    (masked_select/masked_scatter_) and with the Python for-loop the paper started from (timed
    on ``loop_sample`` entries and scaled, stated as such); the speed-ups are the median
    [min-max] of the per-round ratios (a busy machine shifts a whole round alike). Also bytes
    per exchange vs dense. Returns one row per ``p``."""
    from .algorithms.rdpsgd import bernoulli_indices, encode_gaps, geometric_indices
    dev = torch.device("cpu")
    x = torch.randn(numel)
    recv = torch.randn(numel)
    what = " (ResNet-50)" if numel == 25_557_032 else ""
    print(f"RD-PSGD, {numel:,} parameters{what}, {repeats} rounds, round-robin; per "
          "neighbour per round; ms: median, speed-ups: median [min-max] of the per-round ratios")
    print(f"{'p':>6s} {'gen geom ms':>11s} {'gen bern ms':>11s} {'bern / geom':>18s} "
          f"{'extr+exp ms':>11s} {'mask ms':>8s} {'loop ms*':>9s} {'mask / vectorised':>18s} "
          f"{'loop / vectorised':>20s} {'bytes shared-seed':>17s} {'bytes +8bit idx':>15s} "
          f"{'dense':>11s}")
    rows = []
    for p in ratios:
        g = torch.Generator().manual_seed(0)
        idx = geometric_indices(numel, p, g)
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[idx] = True
        vals = recv.index_select(0, idx)

        def vec():
            send = x.index_select(0, idx)
            y = x.clone()
            y.index_copy_(0, idx, vals)
            return send, y

        def masked():
            send = x.masked_select(mask)
            y = x.clone()
            y.masked_scatter_(mask, vals)
            return send, y

        sub = idx[idx < loop_sample].tolist()

        def loop():
            send = [float(x[i]) for i in sub]
            y = x[:loop_sample].clone()
            for k, i in enumerate(sub):
                y[i] = send[k]
            return y
        fns = {"geo": lambda: geometric_indices(numel, p, g),
               "bern": lambda: bernoulli_indices(numel, p, g), "vec": vec, "mask": masked,
               "loop": loop}
        for fn in fns.values():                     # warm-up
            fn()
        t = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                t[k].append(_once(fn, dev))
        t["loop"] = [v * numel / loop_sample for v in t["loop"]]
        med = {k: statistics.median(v) for k, v in t.items()}
        per_round = {name: [a / b for a, b in zip(t[num], t[den])]
                     for name, num, den in (("bern/geo", "bern", "geo"), ("mask/vec", "mask", "vec"),
                                            ("loop/vec", "loop", "vec"))}
        m = idx.numel()
        gap = encode_gaps(idx).numel()
        print(f"{p:6.2f} {med['geo'] * 1e3:11.1f} {med['bern'] * 1e3:11.1f} "
              f"{_spread(per_round['bern/geo']):>18s} {med['vec'] * 1e3:11.1f} "
              f"{med['mask'] * 1e3:8.1f} {med['loop'] * 1e3:9.0f} "
              f"{_spread(per_round['mask/vec']):>18s} {_spread(per_round['loop/vec']):>20s} "
              f"{4 * m:17,d} {4 * m + gap + 4:15,d} {4 * numel:11,d}")
        rows.append({"p": p, **{f"{k}_ms": v * 1e3 for k, v in med.items()},
                     **{k: statistics.median(v) for k, v in per_round.items()},
                     "bytes_shared_seed": 4 * m, "bytes_8bit_idx": 4 * m + gap + 4,
                     "bytes_dense": 4 * numel})
    print("* the Python loop is timed on the first "
          f"{loop_sample:,} entries and scaled to the whole vector")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hvd_rsgc.bench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compress", help="compress+decompress time and bytes per method")
    c.add_argument("--density", type=float, default=0.001)
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--methods", default=None, help="comma-separated subset")
    dc = sub.add_parser("decode", help="bucket decode of several ranks' messages: C loop vs index tensors")
    dc.add_argument("--densities", default="0.25,0.0625,0.01,0.001")
    dc.add_argument("--ranks", type=int, default=4)
    dc.add_argument("--repeats", type=int, default=7)
    dc.add_argument("--methods", default="rsdgc,dgc,topk")
    up = sub.add_parser("update", help="native residual update + scoring per layout vs an abs pass")
    up.add_argument("--repeats", type=int, default=15)
    r = sub.add_parser("rdpsgd", help="RD-PSGD index generation / extraction / bytes")
    r.add_argument("--repeats", type=int, default=5)
    sub.add_parser("tta", help="time to accuracy on the emulated cluster (python -m hvd_rsgc.bench tta --help)",
                   add_help=False)
    sub.add_parser("collective", help="bytes received per rank and exchange time vs P: dense, sparse "
                   "allgather, sparse reduce-scatter (python -m hvd_rsgc.bench collective --help)",
                   add_help=False)
    sub.add_parser("step", help="training step time per compressor vs the dense Horovod step, "
                   "horovodrun -np 4 (python -m hvd_rsgc.bench step --help)", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["step"]:                # its own options: hvd_rsgc/app/bench_step.py
        from .app.bench_step import main as step_main
        return step_main(argv[1:])
    if argv[:1] == ["collective"]:          # its own options: hvd_rsgc/app/bench_collective.py
        from .app.bench_collective import main as collective_main
        return collective_main(argv[1:])
    if argv[:1] == ["tta"]:                 # its own options: hvd_rsgc/app/bench_tta.py
        from .app.bench_tta import main as tta_main
        return tta_main(argv[1:])
    args = ap.parse_args(argv)
    for name in ("repeats", "ranks"):
        if getattr(args, name, 1) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.cmd == "compress" and args.methods:
        unknown = [m for m in args.methods.split(",") if m not in METHODS]
        if unknown:
            ap.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if args.cmd == "rdpsgd":
        bench_rdpsgd(repeats=args.repeats)
    if args.cmd == "update":
        bench_update(args.repeats)
    if args.cmd == "decode":
        bench_decode([float(x) for x in args.densities.split(",")], args.ranks, args.repeats,
                     args.methods.split(","))
    if args.cmd == "compress":
        bench_compress(args.density, args.repeats, args.device,
                       args.methods.split(",") if args.methods else None)


if __name__ == "__main__":
    main()
