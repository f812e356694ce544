"""Buckets: several tensors of a sparse method (Top-k, DGC, RS-DGC) encoded into ONE message and
decoded from the gathered messages with ONE scatter -- one collective per bucket instead of one
per tensor (``fused=True`` on those compressors). Pure tensor code.

Each tensor is still selected with its own k (``method.pick`` per tensor: the same
accumulation, scores and exact top-k as the per-tensor path, so the same units are chosen).
The bucket's message is the per-tensor wire format with *bucket-global* unit rows (tensor
offset + unit row); tensors of different unit sizes (RS-DGC's 3x3 and 7x7 kernels) form
separate groups, one message each. Decoding maps every received unit to its elements in the
bucket's flat output in one pass (``Layout.element_index`` for tiled layouts) and sums with one
``index_put_(accumulate=True)``: contributions to an element add in message order (rank order),
as in the per-tensor decode, so the sums are bit-identical.
"""
from __future__ import annotations

import torch

from .base import index_columns, pack_sparse, unpack_sparse


class Group:
    """Tensors of one unit size within a bucket: unit and element offsets."""

    def __init__(self, layers, S: int):
        self.layers, self.S = layers, S
        self.unit_off, self.elem_off = [0], [0]
        for st in layers:
            self.unit_off.append(self.unit_off[-1] + st.layout.num_units)
            self.elem_off.append(self.elem_off[-1] + st.layout.numel)
        self.units, self.numel = self.unit_off[-1], self.elem_off[-1]
        # element = row * S + cell holds for the whole group when no layout pads or tiles
        self.linear = all(st.layout.kind in ("element", "kernel") for st in layers)


class BucketCodec:
    """Encode / decode one bucket (a fixed list of sparse layers) for a sparse method."""

    def __init__(self, method, layers):
        self.method = method
        self.layers = list(layers)
        by_s: dict[int, list] = {}
        for st in self.layers:
            by_s.setdefault(st.layout.unit_size, []).append(st)
        self.groups = [Group(ls, S) for S, ls in sorted(by_s.items())]
        self.numel = sum(st.layout.numel for st in self.layers)
        idx_bytes = torch.empty((), dtype=method.index_dtype).element_size()
        for g in self.groups:
            if g.units >= 2 ** (8 * idx_bytes - 1):
                raise ValueError(f"a bucket of {g.units} units overflows index_dtype {method.index_dtype}: "
                                 "use smaller buckets or index_dtype=torch.int64")

    def encode(self, grads: dict, ctxs: dict) -> list[torch.Tensor]:
        """``grads``: layer name -> gradient (absent: not finite, nothing sent for it).
        Returns one message per group; ``ctxs[name]["sent_units"]`` is filled."""
        m = self.method
        msgs = []
        for g in self.groups:
            vals, rows = [], []
            for st, off in zip(g.layers, g.unit_off):
                grad = grads.get(st.name)
                if grad is None:
                    ctxs[st.name]["sent_units"] = 0
                    continue
                r, v = m.pick(st, grad)
                wire = v.to(m.value_dtype) if m.value_dtype != v.dtype else v
                m.memory.mark_sent(st.memory, r, wire.float() if wire.dtype != torch.float32 else None,
                                  st.layout)
                ctxs[st.name]["sent_units"] = int(r.numel())
                vals.append(wire)
                rows.append(r + off)
            if vals:
                msgs.append(pack_sparse(torch.cat(vals), torch.cat(rows), m.index_dtype))
            else:
                c = index_columns(m.value_dtype, m.index_dtype)
                dev = next(iter(grads.values())).device if grads else torch.device("cpu")
                msgs.append(torch.zeros(0, g.S + c, dtype=m.value_dtype, device=dev))
        return msgs

    def decode(self, gathered: list[torch.Tensor]) -> dict:
        """Gathered messages (every rank's, one per group) -> layer name -> dense fp32 *sum*
        (views of one flat buffer per group)."""
        out = {}
        for g, msg in zip(self.groups, gathered):
            vals, rows = unpack_sparse(msg, g.S, self.method.index_dtype, g.units)
            flat = torch.zeros(g.numel, dtype=torch.float32, device=msg.device)
            if rows.numel():
                if g.linear:
                    lay = torch.searchsorted(torch.tensor(g.unit_off[1:], device=rows.device), rows,
                                             right=True)
                    uoff = torch.tensor(g.unit_off[:-1], device=rows.device)[lay]
                    eoff = torch.tensor(g.elem_off[:-1], device=rows.device)[lay]
                    cells = torch.arange(g.S, device=rows.device)
                    idx = ((rows - uoff) * g.S + eoff).view(-1, 1) + cells
                    flat.index_put_((idx.reshape(-1),), vals.float().reshape(-1), accumulate=True)
                else:
                    self._scatter_layered(g, flat, vals, rows)
            for st, lo, hi in zip(g.layers, g.elem_off[:-1], g.elem_off[1:]):
                out[st.name] = flat[lo:hi].view(st.shape)
        return out

    @staticmethod
    def _scatter_layered(g, flat, vals, rows):
        """Tiled layouts: each tensor's units map to its elements through its layout; all the
        indices are built first, then one scatter (message order kept: bit-identical sums)."""
        lay = torch.searchsorted(torch.tensor(g.unit_off[1:], device=rows.device), rows, right=True)
        idx = torch.empty(rows.numel(), g.S, dtype=torch.int64, device=rows.device)
        valid = torch.ones(rows.numel(), g.S, dtype=torch.bool, device=rows.device)
        for j in torch.unique(lay).tolist():          # per tensor present, not per unit
            sel = (lay == j).nonzero().view(-1)
            st = g.layers[j]
            e, v = st.layout.element_index(rows[sel] - g.unit_off[j])
            idx[sel] = e + g.elem_off[j]
            if v is not None:
                valid[sel] = v
        flat.index_put_((idx[valid],), vals.float()[valid], accumulate=True)


def make_buckets(entries, cap_bytes: int) -> list[list]:
    """Consecutive sparse entries (backward order) cut into buckets of at most ``cap_bytes`` of
    fp32 gradient (a tensor larger than the cap is a bucket of its own), as Horovod's fusion
    buffer and DDP's ``bucket_cap_mb`` group tensors."""
    buckets: list[list] = []
    cur: list = []
    size = 0
    for e in entries:
        nb = 4 * e.layer.layout.numel
        if cur and size + nb > cap_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += nb
    if cur:
        buckets.append(cur)
    return buckets
