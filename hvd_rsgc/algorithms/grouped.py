"""RS-DGC's, Top-k's and DGC's bucket group in whole-group tensor operations
(``kernels="grouped"``): the route meant for GPUs, where the per-layer route's dozens of small
operations per tensor (RS-DGC: 2,052 per ResNet-50 step with buckets, each a kernel launch or
more) cost far more than the arithmetic does. This route issues 744 (Top-k: 170 against 570;
DGC: 568 against 1,164, of which ~100 are the sample offsets' draws on the CPU generator;
``docs/results/compress/2026-12-07-grouped-ops.py``).

The residuals of a group's layers live side by side in one flat buffer per kind (u, v; or e),
each layer's buffer a view of it (taken over on first use, and again whenever a buffer was
replaced, e.g. by ``load_state_dict``). For one group, whatever the number of its layers:

1. every present layer's residual update as multi-tensor ``torch._foreach_*`` operations: the
   per-layer route's arithmetic, op for op, so the same bits (a padded tile's strided view
   apart, per tensor, so that it does not cost the others the GPU's fast route: ``fast_split``);
2. the NSI of every unit of the group at once. A unit is an s x s block of its layer's storage
   (a 3x3 kernel is 3 rows of 3 contiguous values; a tile is 3 rows of 3 values in a padded
   matrix), so its sums are those of s *row pieces* of s contiguous values: s strided adds over
   the flat buffer sum every piece, and each unit adds its s pieces, found through a cached
   table of their positions (``x``: first piece; ``tw``: pieces per storage row). Three
   statistics (|v|, v, v^2), one piece buffer reused;
3. every layer's exact top-k over its slice of the scores (what the per-layer route runs:
   ``select.topk_indices`` where its CPU pre-filter applies, else ``torch.topk``), one call per
   layer, then the rows of all layers offset and sorted at once; no host sync on a GPU;
4. the chosen units' cells computed from the same table, their values gathered into the
   message, the residual keeping what the wire rounded away (fp16 / int8), momentum factor
   masking: four indexed operations on the flat buffers.

Top-k is the same route with element units (s = 1: a unit's row is its position, no tables)
and |e| as the score. DGC (and RS-DGC with ``selection="sampled"``) replaces step 3 with the
sampled threshold for all layers at once (``_sampled_rows``): the per-layer route's sample
offsets, thresholds and re-adjust loop, with two host syncs per round of that loop (the
candidates' count, their split by layer) and one for the thresholds; everything else in it
has sizes known on the host (fixed-size index operations, no boolean masks).

One host sync per group for exact top-k: the finiteness test of its gradients, one
multi-tensor max-norm (each layer's first row is added to its picks by one multi-tensor
operation, not a host-to-device copy). A group holding inf / NaN takes the per-layer route, which flags it, as
does a group with a unit that is not an s x s block (a 1x7 kernel) or a memory other than
momentum correction / error feedback. Scores are the NSI summed in another order than the per-layer route's, so they can
differ in the last bit; the tests check the same rows, values and residuals as the per-layer
route on a CPU. Pure tensor code, the same on every device. State: the flat buffers *are* the
residuals; the workspace adds the pieces (one fp32 word per s parameters), a scratch of a
quarter of the largest group and three 4-byte words per unit (the table, the real-cell
counts); the sampled threshold a byte per unit of the largest group (the compare's mask), and
for the step only a difference buffer of the group's length. Its speed on a GPU has not been
measured yet: ``kernels="auto"`` does not pick it (on a CPU the native C route is faster;
``python -m hvd_rsgc.bench compress --methods rsdgc,rsdgc-fused-grouped``).
"""
from __future__ import annotations

import math
import weakref

import torch

from .base import pack_sparse, to_wire
from .memory import ErrorFeedback, MomentumCorrection, all_finite_each
from .nsi import nsi_from_sums
from . import select
from .select import topk_indices


def _keys(memory) -> list[str] | None:
    """The residual buffers this route keeps flat, or None where it does not handle the memory."""
    if type(memory) is MomentumCorrection:
        return ["u", "v"]
    if type(memory) is ErrorFeedback:
        return ["e"]
    return None


class _Plan:
    """One group's flat layout on one device: where each layer's storage sits in the flat
    buffers, and per unit the position of its first row piece (``x``) and its layer's pieces
    per storage row (``tw``)."""

    def __init__(self, layers, s: int, device):
        self.layers, self.s, self.S = layers, s, s * s
        self.offs, self.sizes, self.ustart = [], [], [0]
        self.targets: tuple | None = None       # (flat buffers dict, its layer views): _targets
        xs, tws, counts = [], [], []
        off, padded = 0, False
        for st in layers:
            lay = st.layout
            rows, cols = lay.storage_shape
            n, U = rows * cols, lay.num_units
            if s == 1:
                self.offs.append(off)
                self.sizes.append(n)
                self.ustart.append(self.ustart[-1] + U)
                off += n
                continue
            tw = lay.Wp // s if lay.kind == "tile" else 1
            u = torch.arange(U, device=device)
            xs.append(off // s + torch.div(u, tw, rounding_mode="floor") * (s * tw) + u % tw)
            tws.append(torch.full((U,), tw, dtype=torch.int64, device=device))
            c = lay.valid_counts(device)
            padded |= c is not None
            counts.append(c if c is not None else torch.full((U,), float(self.S), dtype=torch.float32,
                                                              device=device))
            self.offs.append(off)
            self.sizes.append(n)
            self.ustart.append(self.ustart[-1] + U)
            off += n
        self.numel, self.units = off, self.ustart[-1]
        self.x = self.tw = self.counts = None
        # each layer's first unit, on the device (the sampled threshold's split by layer)
        self.bounds = torch.tensor(self.ustart, dtype=torch.int64, device=device)
        if s == 1:                  # element units: a unit's position is its row, no tables
            return
        idx = torch.int32 if off // s + 1 < 2 ** 31 else torch.int64
        self.x = torch.cat(xs).to(idx)
        self.tw = torch.cat(tws).to(idx)
        self.counts = torch.cat(counts) if padded else None
        cell = torch.arange(self.S, device=device)
        self.cell_row, self.cell_col = cell // s, cell % s

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.tw, self.counts)
                   if t is not None)


def _side(group) -> int | None:
    """The unit side s of a group whose every unit is an s x s block of its storage rows."""
    s = math.isqrt(group.S)
    if s * s != group.S:
        return None
    for st in group.layers:
        lay = st.layout
        if lay.kind == "tile" and lay.s != s:
            return None
        if lay.kind == "kernel" and tuple(lay.shape[2:]) != (s, s):
            return None
    return s


def _flat(group, plan, keys, device) -> dict:
    """The group's flat residual buffers, every layer's buffer a view of them (taken over, its
    values copied, where it is not)."""
    flats = group.native_tables.get(("grouped-flat", str(device)))
    if flats is None or any(k not in flats for k in keys):
        flats = {k: torch.zeros(plan.numel, dtype=torch.float32, device=device) for k in keys}
        group.native_tables[("grouped-flat", str(device))] = flats
    for k in keys:
        f = flats[k]
        for st, off, n in zip(group.layers, plan.offs, plan.sizes):
            b = st.memory.get(k)
            if (b is not None and b.untyped_storage().data_ptr() == f.untyped_storage().data_ptr()
                    and b.storage_offset() == off and b.is_contiguous() and b.numel() == n):
                continue
            view = f[off:off + n].view(st.layout.storage_shape)
            if b is None:                       # a layer not seen yet: a zero residual
                view.zero_()
            else:
                view.copy_(b.view(st.layout.storage_shape))
            st.memory[k] = view
    return flats


def _unit_sums(plan, flat, pieces, scratch, idx, what) -> torch.Tensor:
    """Per unit: the sum over its cells of ``what`` (``"abs"``, ``"value"``, ``"square"``) of
    the flat buffer -- every row piece's sum (s strided adds over the buffer, by chunks), then
    each unit's s pieces (``idx[r]``: the positions of its r-th piece) added."""
    s = plan.s
    chunk = scratch.numel() - scratch.numel() % s
    for a in range(0, plan.numel, chunk):
        b = min(plan.numel, a + chunk)
        src = flat[a:b]
        if what == "abs":
            src = torch.abs(src, out=scratch[:b - a])
        elif what == "square":
            src = torch.mul(src, src, out=scratch[:b - a])
        out = pieces[a // s:b // s]
        if s == 1:
            out.copy_(src)
            continue
        torch.add(src[0::s], src[1::s], out=out)       # a reduction over s = 3 values is
        for r in range(2, s):                         # ~6x slower on a CPU (nsi._adds)
            out += src[r::s]
    out = pieces.index_select(0, idx[0])       # int32 tables as they are (no int64 copy)
    for r in range(1, s):
        out += pieces.index_select(0, idx[r])
    return out


def scores(method, plan, flat, beta: float | None) -> torch.Tensor:
    """NSI of every unit of the group (in group row order); ``beta=None``: |v| (Top-k)."""
    dev = flat.device
    if plan.s == 1:                             # element units: |v|; NSI of one value: beta |v|
        mag = torch.abs(flat, out=method.workspace.get("grouped_abs", plan.numel, dev))
        if beta is None or beta == 1.0:
            return mag
        return nsi_from_sums(mag, flat * flat, flat.clone(), 1, beta, None)
    if beta is None:
        raise ValueError("|v| scores are for element units (Top-k); this group has s x s units")
    pieces = method.workspace.get("grouped_pieces", plan.numel // plan.s, dev)
    # |v| and v^2 by chunks of a quarter of the group: a few launches, a quarter word per parameter
    scratch = method.workspace.get("grouped_scratch",
                                   min(plan.numel, max(1 << 16, -(-plan.numel // 4) + plan.s)), dev)
    # the other pieces' positions: s - 1 small operations a step, not s - 1 more int32 tables
    # (a fifth of a word per parameter; the state stays under 3 words)
    idx = [plan.x] + [plan.x + r * plan.tw for r in range(1, plan.s)]
    abs_sum = _unit_sums(plan, flat, pieces, scratch, idx, "abs")
    if beta == 1.0:
        return abs_sum / (plan.counts if plan.counts is not None else plan.S)
    sq_sum = _unit_sums(plan, flat, pieces, scratch, idx, "square")
    total = _unit_sums(plan, flat, pieces, scratch, idx, "value")
    return nsi_from_sums(abs_sum, sq_sum, total, plan.S, beta, plan.counts)


def _all_finite(gs: list[torch.Tensor]) -> bool:
    """Whether every entry of every gradient is finite, with one host sync: the largest |entry|
    of each (one multi-tensor operation) is finite exactly then (NaN propagates)."""
    if any(g.numel() == 0 for g in gs):
        return all(all_finite_each(gs))
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(gs, float("inf")))).all())


def _targets(plan, flats: dict) -> dict:
    """Per residual kind, every layer's ``target_view`` of its part of the flat buffer, cached
    on the plan for as long as the group keeps the same flat buffers (``_flat`` never changes
    a dict it made, it makes a new one; about 60 fewer Python-level views a step for
    ResNet-50, host time that counts on a GPU)."""
    if plan.targets is not None and plan.targets[0] is flats:
        return plan.targets[1]
    views = {k: [st.layout.target_view(f[off:off + n])
                 for st, off, n in zip(plan.layers, plan.offs, plan.sizes)]
             for k, f in flats.items()}
    plan.targets = (flats, views)
    return views


def fast_split(targets: dict, srcs: list, present: list) -> tuple[list, list]:
    """The positions in ``present`` whose update can run in multi-tensor kernels, and the rest.

    A ``torch._foreach_*`` call takes its fast route on a GPU (one kernel per chunk of many
    tensors) only if *every* tensor of every list is dense and each target has its source's
    strides; one tensor that is not sends the whole call to a loop of per-tensor kernels
    (ATen's ``can_use_fast_route``). A padded tile's part of the flat buffer (a 1x1 convolution
    or a linear layer whose width is not a multiple of s) is a strided view, so one such layer
    in a group used to cost every layer of it its own kernels. Those go on their own."""
    fast: list[int] = []
    rest: list[int] = []
    for j, i in enumerate(present):
        src = srcs[j]
        ok = src.is_contiguous() and all(
            targets[k][i].is_contiguous() and targets[k][i].shape == src.shape for k in targets)
        (fast if ok else rest).append(j)
    return fast, rest


def _update(memory, layers, gs, targets: dict, present: list) -> None:
    """Every present layer's residual update (``layers``: their states), the per-layer route's
    operations as multi-tensor ones; the layers ``fast_split`` keeps apart go through the
    per-layer route's own ``memory.accumulate``. ``targets``: ``_targets``' views, every layer
    of the group."""
    srcs = [st.layout.source_view(g, None) for st, g in zip(layers, gs)]
    fast, rest = fast_split(targets, srcs, present)
    for j in rest:           # their buffers are views of the flat ones (``_flat``)
        memory.accumulate(layers[j].memory, srcs[j], layers[j].layout.target_view)
    if not fast:
        return
    srcs = [srcs[j] for j in fast]
    if isinstance(memory, MomentumCorrection):
        us = [targets["u"][present[j]] for j in fast]
        vs = [targets["v"][present[j]] for j in fast]
        m = memory.momentum
        if memory.nesterov:                    # u.add_(g).mul_(m); v.add_(u).add_(g)
            torch._foreach_add_(us, srcs)
            torch._foreach_mul_(us, m)
            torch._foreach_add_(vs, us)
            torch._foreach_add_(vs, srcs)
        else:                                  # torch.add(g, u, alpha=m, out=u); v.add_(u)
            torch._foreach_copy_(us, torch._foreach_add(srcs, us, alpha=m))
            torch._foreach_add_(vs, us)
    else:                                      # error feedback: e.add_(g)
        torch._foreach_add_([targets["e"][present[j]] for j in fast], srcs)


def _exact_rows(plan, present, st_of, sc, acc, beta, dev):
    """Every present layer's exact top-k over its slice of the scores: where the CPU
    pre-filter applies, the per-layer route's own call; elsewhere (GPUs, small layers) one
    torch.topk per layer, and a single sort of all the rows after (what topk_indices does per
    layer). Returns (group rows ascending, k per present layer)."""
    picks, ks, starts, unsorted = [], [], [], False
    for i, st in zip(present, st_of):
        a, U = plan.ustart[i], st.layout.num_units
        k = max(0, min(int(st.k), U))
        ks.append(k)
        if k:
            part = sc[a:a + U]
            if select.topk_route(U, k, dev) is not None:         # Top-k: |v| read by the filter itself
                picks.append(topk_indices(part, k) if beta is not None else
                             topk_indices(acc[a:a + U], k, magnitude=True))
            else:
                picks.append(torch.topk(part, k, sorted=False).indices)
                unsorted = True
            starts.append(a)
    if not picks:
        return torch.zeros(0, dtype=torch.int64, device=dev), ks
    # each layer's first row added by one multi-tensor operation: no host-to-device copy
    rows = torch.cat(torch._foreach_add(picks, starts))
    if unsorted:                                # layers in order, rows ascending in each
        rows = torch.sort(rows).values
    return rows, ks


def _desc_key(vals: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort by segment (``seg``, ascending), then largest first, for an
    importance >= 0 (not NaN), which orders as its fp32 bits do (``+ 0.0`` turns -0 into +0).
    The value comes back as ``_key_value``."""
    bits = (vals + 0.0).view(torch.int32).to(torch.int64)
    return seg * (1 << 32) + (0x7FFFFFFF - bits)


def _rank_in_segment(first: torch.Tensor, counts: torch.Tensor, n: int) -> torch.Tensor:
    """For ``n`` entries laid out segment after segment (``counts`` entries each, the segment
    starting at entry ``first``): each entry's position within its segment."""
    return (torch.arange(n, device=counts.device)
            - torch.repeat_interleave(first, counts, output_size=n))


def _h2d(t: torch.Tensor, dev) -> torch.Tensor:
    """A small host tensor onto ``dev``; on a GPU through pinned memory without blocking (a
    pageable copy waits for the stream: every kernel queued before it)."""
    if torch.device(dev).type != "cuda":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


def _segment_heads(start: torch.Tensor, take: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of the first ``take[i]`` entries of every segment ``i`` (starting at entry
    ``start[i]``), segment after segment, ascending within each; ``n = sum(take)``."""
    first = torch.cumsum(take, 0) - take
    return torch.repeat_interleave(start, take, output_size=n) + _rank_in_segment(first, take, n)


def _key_value(key: torch.Tensor) -> torch.Tensor:
    return (0x7FFFFFFF - (key & 0xFFFFFFFF)).to(torch.int32).view(torch.float32)


def _sampled_rows(method, group, plan, present, fill, value_of, dev):
    """DGC's sampled threshold with its re-adjust loop (``select.sampled_threshold_indices``,
    the per-layer route) for every present layer of the group at once, over the importance
    of the group's units (>= 0: |v| for DGC, the NSI for RS-DGC): ``fill(out)`` writes all of
    it into ``out``, ``value_of(rows)`` gives it for some rows.

    * each layer's sample offset drawn from ``method.generator`` as the per-layer route draws
      it (layers in order, only where it samples);
    * every layer's sample gathered in one indexed read, each layer's threshold (the
      ``top_k_samples``-th largest of its sample) from one sort of (layer, value) keys;
    * every unit compared with its layer's threshold t in one pass: ``x - t >= 0``, t
      subtracted per layer by one multi-tensor operation (exactly ``x >= t`` for floats with
      subnormals; a per-unit threshold tensor would cost more passes), the candidates found in
      one ``nonzero`` and counted per layer (one host sync, the thresholds another);
    * the re-adjust loop for all layers at once: a round lowers the thresholds of the layers
      with too few candidates (x 0.8, in fp32 as per layer) and compares again (one more
      pass, only while some layer needs it; at most 10 rounds, as per layer);
    * each layer keeps its first ``num_selects`` candidates, or, with more than 1.3x that, the
      ``num_selects`` largest of them (the per-layer route's ``torch.topk``), for all such
      layers at once by one stable sort of (layer, value) keys (among ties at the last value
      the lower rows, where ``torch.topk``'s choice is unspecified).

    Returns (group rows ascending, units per present layer)."""
    L = len(group.layers)
    sizes = [plan.ustart[i + 1] - plan.ustart[i] for i in range(L)]
    thr = torch.full((L,), math.inf, dtype=torch.float32, device="cpu")   # host; absent layers: nothing passes
    ns = [0] * L
    loops, sampled = [], []                 # sampled: (layer, first unit, stride, count, top k)
    for i in present:
        p = group.layers[i].plan
        if p.n != sizes[i]:
            raise ValueError(f"layer {group.layers[i].name!r}: its sampling plan covers {p.n} units, "
                             f"the layer has {sizes[i]}")
        ns[i] = p.num_selects
        if p.num_selects >= p.n:            # everything is sent
            thr[i] = -math.inf
            ns[i] = p.n
            continue
        start = 0
        if p.stride != 1:
            start = int(torch.randint(0, p.stride, (1,), generator=method.generator,
                                          device=method.generator.device).item())
        cnt = -(-(p.n - start) // p.stride)
        sampled.append((i, plan.ustart[i] + start, p.stride, cnt, p.top_k_samples))
        if p.n > p.num_samples:
            loops.append(i)
    if sampled:
        tab = torch.tensor([list(x) for x in sampled], dtype=torch.int64, device="cpu")
        cnt = tab[:, 3]
        cstart = torch.cumsum(cnt, 0) - cnt
        T = int(cnt.sum())
        tab_d = _h2d(torch.stack([tab[:, 1] - tab[:, 2] * cstart, tab[:, 2], cnt,
                             cstart + tab[:, 4] - 1]), dev)
        pos = (torch.repeat_interleave(tab_d[0], tab_d[2], output_size=T)
               + torch.repeat_interleave(tab_d[1], tab_d[2], output_size=T)
               * torch.arange(T, device=dev))
        seg = torch.repeat_interleave(torch.arange(len(sampled), device=dev), tab_d[2], output_size=T)
        key = torch.sort(_desc_key(value_of(pos), seg)).values[tab_d[3]]
        thr[tab[:, 0]] = _key_value(key).cpu()                    # a host sync
    bounds = plan.bounds
    diff = torch.empty(plan.units, dtype=torch.float32, device=dev)
    views = [diff[a:b] for a, b in zip(plan.ustart[:-1], plan.ustart[1:])]
    mask = method.workspace.get("grouped_mask", plan.units, dev, torch.bool)
    overflow, active = [], loops
    for rnd in range(11):
        fill(diff)
        torch._foreach_sub_(views, thr.tolist())
        torch.ge(diff, 0.0, out=mask)
        cand = mask.nonzero().view(-1)
        cuts = torch.searchsorted(cand, bounds).tolist()
        counts = [cuts[i + 1] - cuts[i] for i in range(L)]
        if rnd == 10 or not active:         # after the 10th lowering: as it stands
            break
        lower = []
        for i in active:
            c = counts[i]
            if c > ns[i]:
                if c > 1.3 * ns[i]:
                    overflow.append(i)
            elif c < 0.8 * ns[i]:
                lower.append(i)
        if not lower:
            break
        thr[lower] = thr[lower] * 0.8
        active = lower
    del diff, views
    # each layer keeps its first keep_n candidates (ascending); an overflowing one its ns
    # largest, by one sort of the candidates of all such layers (ties: lower rows)
    keep_n = [min(c, n) for c, n in zip(counts, ns)]
    over = [0] * L
    for i in overflow:
        keep_n[i], over[i] = 0, 1
    # every size below is known on the host: fixed-size index operations, no boolean masks
    # (a mask's result has a data-dependent size, one more host sync each on a GPU)
    ocounts = [c * o for c, o in zip(counts, over)]
    ns_over = [n * o for n, o in zip(ns, over)]
    tab = _h2d(torch.tensor([cuts[:-1], keep_n, ocounts, ns_over], dtype=torch.int64,
                            device="cpu"), dev)
    rows = cand[_segment_heads(tab[0], tab[1], sum(keep_n))]    # each layer's first keep_n
    if overflow:
        Co = sum(ocounts)
        co = cand[_segment_heads(tab[0], tab[2], Co)]            # the overflowing layers' all
        seg = torch.repeat_interleave(torch.arange(L, device=dev), tab[2], output_size=Co)
        perm = torch.sort(_desc_key(value_of(co), seg), stable=True).indices    # ties: lower rows
        first = torch.cumsum(tab[2], 0) - tab[2]
        picks = co[perm[_segment_heads(first, tab[3], sum(ns_over))]]          # ns largest each
        rows = torch.sort(torch.cat([rows, picks])).values
        for i in overflow:
            keep_n[i] = ns[i]
    return rows, [keep_n[i] for i in present]


def encode_group(method, group, grads: dict, ctxs: dict, beta: float | None,
                 selection: str = "topk") -> torch.Tensor | None:
    """One bucket group's message (``bucket.BucketCodec``), its residuals updated and
    ``ctxs[name]["sent_units"]`` filled: what the per-layer route gives. ``beta``: RS-DGC's
    NSI weight; None: |v| (Top-k, DGC). ``selection``: ``"topk"`` (each layer's exact top-k)
    or ``"sampled"`` (DGC's sampled threshold, ``layer.plan``). None (nothing touched) where
    this route does not apply."""
    keys = _keys(method.memory)
    s = _side(group)
    if keys is None or s is None or (beta is None and s != 1):
        return None
    present, gs = [], []
    for i, st in enumerate(group.layers):
        g = grads.get(st.name)
        if g is None:
            continue
        if not st.memory_ready or any(st.memory.get(k) is None or st.memory[k].device != g.device
                                      for k in keys):
            return None
        present.append(i)
        gs.append(g.float() if g.dtype != torch.float32 else g)
    if present and not _all_finite(gs):        # one host sync; the per-layer route flags it
        return None
    for st in group.layers:
        ctxs[st.name]["sent_units"] = 0
    if not present:
        from .base import message_columns
        dev = next(iter(grads.values())).device if grads else torch.device("cpu")
        return torch.zeros(0, message_columns(group.S, method.value_dtype, method.index_dtype),
                           dtype=method.value_dtype, device=dev)
    dev = gs[0].device
    key = ("grouped-plan", id(group), str(dev))
    plan = method.workspace.kept(key)
    if plan is None or plan.layers is not group.layers:
        plan = method.workspace.keep(key, _Plan(group.layers, s, dev))
        weakref.finalize(group, method.workspace.drop, key)     # a codec rebuilt: no stale plans
    flats = _flat(group, plan, keys, dev)
    st_of = [group.layers[i] for i in present]
    _update(method.memory, st_of, gs, _targets(plan, flats), present)

    acc = flats["v" if "v" in keys else "e"]
    if selection == "sampled" and beta is None:     # DGC: |v|, read where needed
        rows, ks = _sampled_rows(method, group, plan, present, lambda out: torch.abs(acc, out=out),
                                 lambda r: acc[r].abs(), dev)
    else:
        sc = scores(method, plan, acc, beta)
        if selection == "sampled":
            rows, ks = _sampled_rows(method, group, plan, present, lambda out: out.copy_(sc),
                                     lambda r: sc[r], dev)
        else:
            rows, ks = _exact_rows(plan, present, st_of, sc, acc, beta, dev)
    if s == 1:                                               # (K, S) flat positions
        cells = rows.view(-1, 1)
    else:
        x = plan.x[rows].long()
        cells = ((s * x).view(-1, 1) + plan.cell_row * (s * plan.tw[rows].long()).view(-1, 1)
                 + plan.cell_col)
    vals = acc[cells]
    wire, sent = to_wire(vals, method.value_dtype)
    if sent is None:                  # index_fill_: the 0 is a kernel argument, not a tensor
        acc.index_fill_(0, cells.view(-1), 0.0)
    else:                                                    # the residual keeps the rounding
        acc[cells] = vals - sent
    if "u" in keys and method.memory.masking:
        flats["u"].index_fill_(0, cells.view(-1), 0.0)
    for st, k in zip(st_of, ks):
        ctxs[st.name]["sent_units"] = k
    return pack_sparse(wire, rows, method.index_dtype)
