"""The sparse methods' collective: allgather (every rank receives every other rank's k units)
or a balanced sparse reduce-scatter + allgather in the style of Ok-Topk (Li & Hoefler,
PPoPP'22) whose per-rank volume stays flat as ranks are added. Pure tensor code over a
:class:`~hvd_rsgc.transport.Transport`; see docs/COLLECTIVES.md for the volumes.

``reduce_scatter``, for one group of tensors (all sparse tensors of a Horovod step, or one DDP
bucket; tensors with different unit sizes form separate groups):

1. every rank's selected units get group-global row numbers (tensor offset + unit row);
2. **regions**: a histogram of every rank's rows (``bins_per_rank * P`` bins, one small int32
   allreduce) gives P contiguous row ranges holding about the same number of candidates, the
   same on every rank -- balanced from this step's own index statistics, so no state is kept;
3. **alltoall**: each rank sends the units falling in region j to rank j (its owner);
4. the owner sums what it received (duplicates add) and **re-selects** its share of the
   step's budget, ``ceil(reselect * K * c_j / C)`` units (K: units per step over the group;
   ``c_j`` of the ``C`` candidates fall in its region, from the same histogram: ``K / P`` when
   the regions are balanced, and no loss of budget where candidates cluster in a bin, which
   leaves other regions empty), by the method's own unit score (|v| for element methods, the
   NSI for RS-DGC);
   ``reselect=None`` keeps every unit (the result is then exactly the allgather path's sum);
5. **allgather** of the owners' re-selected units: every rank gets the same (rows, values).

Nothing is lost: a rank removes from its residual only the units of its own that made it into
the final set (what the owners dropped stays in the senders' residuals, as in Ok-Topk), and
only once the caller knows the tensor's step is finite (:meth:`Marks.apply`).
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

from .base import add_in_order, pack_sparse, scatter_sum, to_wire, unit_bytes, unpack_sparse

COMMUNICATORS = ("allgather", "reduce_scatter", "auto")


class SparseCollective:
    """Which collective the sparse methods use, and the reduce-scatter itself.

    Args:
        communicator: ``"allgather"`` (default), ``"reduce_scatter"`` or ``"auto"``: the
            reduce-scatter where it moves fewer bytes -- at least ``auto_min_ranks`` ranks
            (allgather receives ``k(P-1)`` units per rank, the reduce-scatter about
            ``2k(P-1)/P``, plus one more round of latency) and at least ``auto_min_bytes``
            that an allgather would deliver to each rank per step.
        reselect: owners keep ``ceil(reselect * K / P)`` units each (``None``: all).
        bins_per_rank: histogram resolution of the region balancing.
    """

    def __init__(self, communicator: str = "allgather", reselect: float | None = 1.0,
                 bins_per_rank: int = 64, auto_min_ranks: int = 4, auto_min_bytes: int = 1 << 16):
        if communicator not in COMMUNICATORS:
            raise ValueError(f"communicator must be one of {COMMUNICATORS}, got {communicator!r}")
        if reselect is not None and (isinstance(reselect, bool) or not isinstance(reselect, (int, float))
                                     or not reselect > 0):
            raise ValueError(f"reselect must be a number > 0 or None, got {reselect!r}")
        if isinstance(bins_per_rank, bool) or not isinstance(bins_per_rank, int) or bins_per_rank < 1:
            raise ValueError(f"bins_per_rank must be an integer >= 1, got {bins_per_rank!r}")
        self.communicator = communicator
        self.reselect = None if reselect is None else float(reselect)
        self.bins_per_rank = bins_per_rank
        self.auto_min_ranks = auto_min_ranks
        self.auto_min_bytes = auto_min_bytes
        self.last: dict = {}
        self._counts_cache: dict = {}

    # -- choice ---------------------------------------------------------------------------
    def uses_reduce_scatter(self, size: int, method, layers, density: float) -> bool:
        """Same answer on every rank at any point of a step: depends on P, the configured
        ``density`` (not the per-step dynamic one), the tensors and the method only."""
        if self.communicator == "allgather" or size < 2:
            return False
        if self.communicator == "reduce_scatter":
            return True
        if size < self.auto_min_ranks:
            return False
        per_rank = sum(math.ceil(density * st.layout.num_units)
                       * unit_bytes(st.layout.unit_size, method.value_dtype, method.index_dtype)
                       for st in layers)
        return per_rank * (size - 1) >= self.auto_min_bytes

    # -- the exchange ---------------------------------------------------------------------
    def exchange(self, method, items, transport, name: str = "hvd_rsgc.rs", key=None):
        """``items``: ``(layer, rows, values)`` per tensor -- this rank's selected unit rows
        (int64) and their fp32 values ``(k, S)`` (not yet removed from the residual).
        Returns ``(sums, marks)``: per item, the dense fp32 *sum* over ranks in the tensor's
        shape, and a :class:`Marks` to apply once the step is known to be finite. Every rank
        must call it with the same tensors in the same order."""
        key = key or name
        groups: dict[int, list[int]] = {}
        for i, (st, _, _) in enumerate(items):
            groups.setdefault(st.layout.unit_size, []).append(i)
        P, me = transport.size, transport.rank
        stats = dict(groups=len(groups), sent_units=0, alltoall_sent_rows=0, alltoall_recv_rows=0,
                     owner_units=0, kept_units=0, final_units=0, allgather_recv_rows=0,
                     recv_bytes=0, hist_bytes=0)
        plans = []
        for S, idx in sorted(groups.items()):
            plans.append(_Group(self, method, [items[i] for i in idx], idx, S, P, me,
                                f"{name}.s{S}"))
        # four rounds, each started for every group before any is waited on
        hs = [transport.allreduce_async(g.histogram(), g.name + ".hist", "sum", key=key)
              for g in plans]
        for g, h in zip(plans, hs):
            g.set_regions(transport.wait(h))
            stats["hist_bytes"] += g.hist_bytes
        hs = [transport.alltoall_async(g.outgoing, g.splits, g.name + ".a2a", key=key) for g in plans]
        for g, h in zip(plans, hs):
            g.reduce(*transport.wait(h))
        hs = [transport.allgather_async(g.kept, g.name + ".ag", key=key) for g in plans]
        sums: list = [None] * len(items)
        marks: list = [None] * len(items)
        for g, h in zip(plans, hs):
            for i, s, mk in g.finish(transport.wait(h)):
                sums[i], marks[i] = s, mk
            for k in stats:
                if k in g.stats:
                    stats[k] += g.stats[k]
        self.last = stats
        return sums, marks

    def valid_counts(self, layers, device) -> torch.Tensor | None:
        sig = tuple((st.name, st.layout.num_units) for st in layers) + (str(device),)
        if sig not in self._counts_cache:
            parts, any_partial = [], False
            for st in layers:
                c = st.layout.valid_counts(device, torch.float32)
                if c is None:
                    c = torch.full((st.layout.num_units,), float(st.layout.unit_size), device=device)
                else:
                    any_partial = True
                parts.append(c.reshape(-1))
            self._counts_cache[sig] = torch.cat(parts) if any_partial else None
        return self._counts_cache[sig]


class Marks:
    """A tensor's residual update after a reduce-scatter: its own units that reached the final
    set are removed from the residual (``memory.mark_sent``); with fp16 / int8 values, what
    this rank as an owner rounded away when it re-encoded its kept sums goes back into its
    residual (``memory.keep``), so the ranks' residuals together lose nothing."""

    __slots__ = ("method", "layer", "rows", "sent", "kept")

    def __init__(self, method, layer, rows, sent, kept=None):
        self.method, self.layer, self.rows, self.sent = method, layer, rows, sent
        self.kept = kept

    def apply(self) -> None:
        mem, st = self.method.memory, self.layer
        mem.mark_sent(st.memory, self.rows, self.sent, st.layout)
        if self.kept is not None and self.kept[0].numel():
            mem.keep(st.memory, self.kept[0], self.kept[1], st.layout)

    def give_back(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Undo :meth:`apply` after a skipped step (``Engine.hold``): the units removed from the
        residual come back -- ``rows`` / ``values``: everything this rank picked (ascending
        rows), of which the removed ones are a subset -- and an owner's rounding error, which
        belonged to sums that no rank applied, goes out again."""
        mem, st = self.method.memory, self.layer
        if self.rows.numel():
            back = values[torch.searchsorted(rows, self.rows)] if self.sent is None else self.sent
            mem.keep(st.memory, self.rows, back.float(), st.layout)
        if self.kept is not None and self.kept[0].numel():
            mem.keep(st.memory, self.kept[0], -self.kept[1], st.layout)


class _Group:
    """One unit size's tensors through the four rounds (pure bookkeeping between them)."""

    def __init__(self, coll, method, items, positions, S, P, me, name):
        self.coll, self.method, self.S, self.P, self.me, self.name = coll, method, S, P, me, name
        self.items, self.positions = items, positions
        self.layers = [st for st, _, _ in items]
        sizes = [st.layout.num_units for st in self.layers]
        self.offsets = [0]
        for u in sizes:
            self.offsets.append(self.offsets[-1] + u)
        self.total = self.offsets[-1]
        self.index_dtype = torch.int32 if self.total < 2 ** 31 else torch.int64
        self.budget = sum(st.k for st in self.layers)
        dev = items[0][2].device
        self.device = dev
        rows = [r.to(torch.int64) + off for (_, r, _), off in zip(items, self.offsets)]
        vals = [v.float().reshape(-1, S) for _, _, v in items]
        grows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64, device=dev)
        gvals = torch.cat(vals) if vals else torch.zeros(0, S, device=dev)
        order = torch.argsort(grows, stable=True)
        self.rows, self.vals = grows[order], gvals[order]
        self.wire, self.sent = to_wire(self.vals, method.value_dtype)
        self.nbins = coll.bins_per_rank * P
        self.stats: dict = {"sent_units": int(self.rows.numel())}

    def histogram(self) -> torch.Tensor:
        b = torch.div(self.rows * self.nbins, self.total, rounding_mode="floor")
        h = torch.bincount(b, minlength=self.nbins).to(torch.int32)
        self.hist_bytes = h.numel() * h.element_size()
        return h

    def set_regions(self, hist: torch.Tensor) -> None:
        """P contiguous row ranges with about equal candidate counts (identical on all ranks:
        computed from the allreduced histogram)."""
        P, nb, U = self.P, self.nbins, self.total
        cum = torch.cumsum(hist.to(torch.int64), 0)
        tot = int(cum[-1]) if cum.numel() else 0
        if tot == 0:
            inner = torch.tensor([U * j // P for j in range(1, P)], dtype=torch.int64)
        else:
            targets = torch.tensor([math.ceil(tot * j / P) for j in range(1, P)], dtype=torch.int64)
            b = torch.searchsorted(cum.cpu(), targets)                 # first bin reaching it
            inner = torch.div((b + 1) * U + nb - 1, nb, rounding_mode="floor").clamp_(max=U)
        self.bounds = torch.cat([torch.zeros(1, dtype=torch.int64), inner,
                                 torch.tensor([U], dtype=torch.int64)])
        # this owner's candidates: the histogram's bins inside its region (the inner bounds
        # are bin edges); its share of the budget follows them
        if tot == 0:
            self.share = (0, 1)
        else:
            edges = torch.div(self.bounds * nb, U, rounding_mode="floor").clamp_(max=nb)
            upto = torch.cat([torch.zeros(1, dtype=torch.int64), cum.cpu()])[edges]
            self.share = (int(upto[self.me + 1] - upto[self.me]), tot)
        cuts = torch.searchsorted(self.rows, self.bounds.to(self.rows.device))
        self.splits = [int(x) for x in torch.diff(cuts).cpu()]
        self.outgoing = pack_sparse(self.wire, self.rows, self.index_dtype)
        self.stats["alltoall_sent_rows"] = int(self.rows.numel()) - self.splits[self.me]

    def reduce(self, received: torch.Tensor, rsplits) -> None:
        """Owner: sum the units received for this rank's region, keep the budget's share."""
        S = self.S
        vals, rows = unpack_sparse(received, S, self.index_dtype, self.total)
        row_bytes = received.shape[1] * received.element_size() if received.dim() == 2 else 0
        self.stats["alltoall_recv_rows"] = int(rows.numel()) - int(rsplits[self.me])
        self.stats["recv_bytes"] = self.stats["alltoall_recv_rows"] * row_bytes
        uniq, inv = torch.unique(rows, sorted=True, return_inverse=True)
        sums = torch.zeros(uniq.numel(), S, dtype=torch.float32, device=received.device)
        if rows.numel():
            add_in_order(sums, inv, vals.float())     # CUDA: not atomics (run-to-run bits)
        self.stats["owner_units"] = int(uniq.numel())
        mine, tot = self.share
        keep = uniq.numel() if self.coll.reselect is None else \
            min(uniq.numel(), math.ceil(Fraction(self.coll.reselect) * self.budget * mine / tot))
        if keep < uniq.numel():
            counts = self.coll.valid_counts(self.layers, received.device)
            scores = self.method.unit_scores(sums, None if counts is None else counts[uniq])
            pick = torch.topk(scores, keep, sorted=False).indices.sort().values
            uniq, sums = uniq[pick], sums[pick]
        self.stats["kept_units"] = int(uniq.numel())
        wire, sent = to_wire(sums, self.method.value_dtype)
        self.kept = pack_sparse(wire, uniq, self.index_dtype)
        # what the re-encoding rounded away (lossy values): back into this owner's residual
        self.rounded = None if sent is None else (uniq, sums - sent)

    def finish(self, gathered: torch.Tensor):
        fvals, frows = unpack_sparse(gathered, self.S, self.index_dtype, self.total)
        row_bytes = gathered.shape[1] * gathered.element_size()
        own = self.kept.shape[0]
        self.stats["allgather_recv_rows"] = int(frows.numel()) - own
        self.stats["recv_bytes"] += self.stats["allgather_recv_rows"] * row_bytes
        self.stats["final_units"] = int(frows.numel())
        cuts = torch.searchsorted(frows, torch.tensor(self.offsets, dtype=torch.int64,
                                                      device=frows.device)).tolist()
        mine = torch.isin(self.rows, frows)
        own_cuts = torch.searchsorted(self.rows, torch.tensor(self.offsets, dtype=torch.int64,
                                                              device=self.rows.device)).tolist()
        out = []
        for j, (st, pos) in enumerate(zip(self.layers, self.positions)):
            lo, hi, off = cuts[j], cuts[j + 1], self.offsets[j]
            dense = scatter_sum(st.layout, fvals[lo:hi], frows[lo:hi] - off, torch.float32)
            a, b = own_cuts[j], own_cuts[j + 1]
            m = mine[a:b]
            rows = self.rows[a:b][m] - off
            sent = None if self.sent is None else self.sent[a:b][m]
            kept = None
            if self.rounded is not None:
                urows, err = self.rounded
                sel = (urows >= off) & (urows < self.offsets[j + 1])
                kept = (urows[sel] - off, err[sel])
            out.append((pos, dense, Marks(self.method, st, rows, sent, kept)))
        return out
