"""Buckets: several tensors of a sparse method (Top-k, DGC, RS-DGC) encoded into ONE message and
decoded from the gathered messages with ONE scatter -- one collective per bucket instead of one
per tensor (``fused=True`` on those compressors). Pure tensor code.

Each tensor is still selected with its own k (``method.pick`` per tensor: the same
accumulation, scores and exact top-k as the per-tensor path, so the same units are chosen),
or, where the method can, the whole group at once (``method.encode_group``: RS-DGC, Top-k and
DGC with native kernels, a few C calls per group, the same message and residuals). On a CPU
the decode writes into last step's buffer once nobody holds it any more (``_buffer``).
The bucket's message is the per-tensor wire format with *bucket-global* unit rows (tensor
offset + unit row); tensors of different unit sizes (RS-DGC's 3x3 and 7x7 kernels) form
separate groups, one message each. Decoding maps every received unit to its elements in the
bucket's flat output in one pass (for tiles, ``TileLayout.element_index``'s arithmetic
vectorised over the bucket's tensors through a per-tensor geometry table) and sums with one
``base.add_in_order``: contributions to an element add in message order (rank order), as in
the per-tensor decode, so the sums are bit-identical. With native kernels the same
scatter is one C loop over the units (``native.hr_scatter``), same order, same sums.
"""
from __future__ import annotations

import torch

from . import native
from .base import add_in_order, message_columns, pack_sparse, row_range, to_wire, unpack_sparse
from .memory import all_finite_each


def _storage_use_count():
    """How many tensors share a tensor's storage (PyTorch's own reference count of it), or None
    where this PyTorch has no such call (then decode buffers are never reused)."""
    fn = getattr(torch._C, "_storage_Use_Count", None)
    if fn is None:
        return None
    return lambda t: int(fn(t.untyped_storage()._cdata))


_USE_COUNT = _storage_use_count()


class Group:
    """Tensors of one unit size within a bucket: unit and element offsets."""

    def __init__(self, layers, S: int):
        self.layers, self.S = layers, S
        self.unit_off, self.elem_off = [0], [0]
        for st in layers:
            self.unit_off.append(self.unit_off[-1] + st.layout.num_units)
            self.elem_off.append(self.elem_off[-1] + st.layout.numel)
        self.units, self.numel = self.unit_off[-1], self.elem_off[-1]
        # tiles of one unit size S = s*s share their side s (0: no tile in the group)
        self.s = next((st.layout.s for st in layers if st.layout.kind == "tile"), 0)
        self._geo: dict = {}
        self._geo_at: dict = {}
        self.native_tables: dict = {}       # native.encode_group's per-layer tables, cached

    def geometry_at(self, offsets: list[int]) -> dict:
        """:meth:`geometry` on the CPU with the layers' elements at ``offsets`` of another
        buffer instead of one after the other (``BucketCodec.decode_into``; cached)."""
        key = tuple(offsets)
        geo = self._geo_at.get(key)
        if geo is None:
            geo = self._geo_at[key] = {**self.geometry(torch.device("cpu")),
                                       "elem_off": torch.tensor(offsets, dtype=torch.int64)}
        return geo

    def geometry(self, device) -> dict:
        """Per tensor of the group, as tensors on ``device`` (cached): unit and element offsets,
        whether it is tiled, and its tile geometry (tiles per row, H, W; H is 0 for a tensor
        without tiles)."""
        key = str(device)
        geo = self._geo.get(key)
        if geo is None:
            def t(xs, dtype=torch.int64):
                return torch.tensor(xs, dtype=dtype, device=device)
            tiles = [st.layout.kind == "tile" for st in self.layers]
            geo = self._geo[key] = {
                "unit_end": t(self.unit_off[1:]), "unit_off": t(self.unit_off[:-1]),
                "elem_off": t(self.elem_off[:-1]), "tiled": t(tiles, torch.bool),
                "tiles_w": t([st.layout.Wp // st.layout.s if k else 1
                              for st, k in zip(self.layers, tiles)]),
                "H": t([st.layout.H if k else 0 for st, k in zip(self.layers, tiles)]),
                "W": t([st.layout.W if k else 1 for st, k in zip(self.layers, tiles)]),
            }
        return geo


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
        # the decode in C where the method's kernels are native (the same sums, bit for bit)
        self.native = getattr(method, "kernels", None) == "native"
        self._out: dict = {}                # group -> (decode buffer, its storage's own use count)
        self._marks: dict = {}              # bytes -> zeroed bit per cell (decode's divide)
        # the layers some rank flagged as not finite in the messages decoded last
        self.flagged: set[str] = set()
        idx_bytes = torch.empty((), dtype=method.index_dtype).element_size()
        for g in self.groups:                   # + one flag row index per layer
            if g.units + len(g.layers) >= 2 ** (8 * idx_bytes - 1):
                raise ValueError(f"a bucket of {g.units + len(g.layers)} units overflows index_dtype {method.index_dtype}: "
                                 "use smaller buckets or index_dtype=torch.int64")

    def encode(self, grads: dict, ctxs: dict) -> list[torch.Tensor]:
        """``grads``: layer name -> gradient (absent: nothing sent for it). Returns one message
        per group; ``ctxs[name]["sent_units"]`` is filled. A gradient holding inf / NaN: its
        non-finite entries never reach the residual (its finite ones are accumulated as
        usual), nothing of the layer is sent, the layer is marked ``ctxs[name]["nonfinite"]``
        and the message carries a *flag row* for it (unit row ``group units + the layer's
        position``, zero values), so every rank's decode learns of it (:attr:`flagged`). With
        native kernels the check is part of the residual update (no extra pass, no host sync
        per tensor); a finite step adds no byte."""
        m = self.method
        msgs = []
        for g in self.groups:
            msg = m.encode_group(g, grads, ctxs)        # the whole group at once, where it can
            if msg is None:
                msg = self._encode_layers(g, grads, ctxs)
            bad = [g.units + i for i, st in enumerate(g.layers)
                   if st.name in grads and ctxs[st.name].get("nonfinite")]
            if bad:
                zeros = torch.zeros(len(bad), g.S, dtype=torch.float32, device=msg.device)
                flags = pack_sparse(to_wire(zeros, m.value_dtype)[0],
                                    torch.tensor(bad, dtype=torch.int64, device=msg.device),
                                    m.index_dtype)
                msg = torch.cat([msg, flags])
            msgs.append(msg)
        return msgs

    def give_back(self, msgs: list[torch.Tensor], only=None) -> None:
        """A skipped step (``Method.give_back``): the units of this rank's own group messages
        go back into their layers' residuals (flag rows carry nothing); ``only``: the names of
        the layers to give back to (None: all)."""
        m = self.method
        for g, msg in zip(self.groups, msgs):
            vals, rows = unpack_sparse(msg, g.S, m.index_dtype, g.units + len(g.layers),
                                       check_rows=False)
            if not rows.numel():
                continue
            rows, order = torch.sort(rows)
            vals = vals.float()[order]
            # each layer's rows are the run [unit_off, next unit_off) of the sorted group rows
            # (flag rows, past the group's units, are left out)
            cuts = torch.searchsorted(rows, torch.tensor(g.unit_off[1:], dtype=rows.dtype,
                                                         device=rows.device)).tolist()
            lo = 0
            for st, hi, off in zip(g.layers, cuts, g.unit_off):
                if hi > lo and st.memory and (only is None or st.name in only):
                    m.memory.keep(st.memory, rows[lo:hi] - off, vals[lo:hi], st.layout)
                lo = hi

    def _encode_layers(self, g: Group, grads: dict, ctxs: dict) -> torch.Tensor:
        """One group's message, layer by layer (``method.pick``): where ``encode_group`` cannot."""
        m = self.method
        vals, rows = [], []
        given = [grads[st.name] for st in g.layers if st.name in grads]
        finite = iter(all_finite_each(given))       # one host sync for the group, not per tensor
        for st, off in zip(g.layers, g.unit_off):
            grad = grads.get(st.name)
            ctxs[st.name]["sent_units"] = 0
            if grad is None:
                continue
            if not next(finite):
                m.accumulate_finite(st, grad)
                ctxs[st.name]["nonfinite"] = True
                continue
            r, v = m.pick(st, grad)
            wire, sent = to_wire(v, m.value_dtype)
            m.memory.mark_sent(st.memory, r, sent, st.layout)
            ctxs[st.name]["sent_units"] = int(r.numel())
            vals.append(wire)
            rows.append(r + off)
        if vals:
            return pack_sparse(torch.cat(vals), torch.cat(rows), m.index_dtype)
        dev = next(iter(grads.values())).device if grads else torch.device("cpu")
        return torch.zeros(0, message_columns(g.S, m.value_dtype, m.index_dtype),
                           dtype=m.value_dtype, device=dev)

    def _received(self, g: Group, msg: torch.Tensor):
        """A gathered group message -> (values, rows) of its units, flag rows taken out and
        their layers added to :attr:`flagged`."""
        vals, rows = unpack_sparse(msg, g.S, self.method.index_dtype, g.units + len(g.layers),
                                   check_rows=False)
        _, hi = row_range(rows, g.units + len(g.layers))         # one host sync: range + flags
        if hi >= g.units:                                          # some rank flagged a layer
            flag = rows >= g.units
            self.flagged.update(g.layers[i].name for i in (rows[flag] - g.units).tolist())
            keep = ~flag
            vals, rows = vals[keep], rows[keep]
        return vals, rows

    def decode(self, gathered: list[torch.Tensor], divide: int = 1) -> dict:
        """Gathered messages (every rank's, one per group) -> layer name -> dense fp32 *sum*
        (views of one flat buffer per group); ``divide`` > 1: the sum divided by it (the
        average over ``divide`` ranks, the same values as ``sum.div_(divide)``; with native
        kernels only the cells some unit reached are divided, the rest stay +0)."""
        if divide < 1:
            raise ValueError(f"divide must be >= 1, got {divide}")
        out = {}
        self.flagged = set()
        for gi, (g, msg) in enumerate(zip(self.groups, gathered)):
            vals, rows = self._received(g, msg)
            flat = self._buffer(gi, g.numel + 1, msg.device)                         # + spare slot
            if rows.numel():
                v = vals.float()
                if self.native and flat.device.type == "cpu":
                    native.scatter(flat, v, rows, g.S, g.s, g.geometry(flat.device), divide,
                                   self._mark(flat, divide))
                else:
                    self._scatter(g, flat, v, rows)
                    if divide > 1:
                        flat.div_(divide)
            for st, lo, hi in zip(g.layers, g.elem_off[:-1], g.elem_off[1:]):
                out[st.name] = flat[lo:hi].view(st.shape)
        return out

    def decode_into(self, gathered: list[torch.Tensor], base: torch.Tensor, offsets: dict,
                    divide: int = 1) -> bool:
        """Decode straight into ``base``, a flat fp32 CPU tensor that holds each layer at
        element ``offsets[name]`` (DDP's bucket buffer): every layer's region zeroed, the units
        added in message order, the cells they reached divided by ``divide`` -- the same values
        as :meth:`decode`, without its buffer and the copy out of it. Returns False (nothing
        written) where the codec cannot: no native kernels, or ``base`` not a contiguous fp32
        CPU tensor; use :meth:`decode` then."""
        if divide < 1:
            raise ValueError(f"divide must be >= 1, got {divide}")
        if not (self.native and base.device.type == "cpu" and base.dtype == torch.float32
                and base.dim() == 1 and base.is_contiguous()):
            return False
        all_offs = [[int(offsets[st.name]) for st in g.layers] for g in self.groups]
        for g, offs in zip(self.groups, all_offs):        # every group's, before any write
            for st, o in zip(g.layers, offs):
                if o < 0 or o + st.layout.numel > base.numel():
                    raise ValueError(f"decode_into: layer '{st.name}' at {o} does not fit a "
                                     f"buffer of {base.numel()} elements")
        self.flagged = set()
        for g, msg, offs in zip(self.groups, gathered, all_offs):
            for st, o in zip(g.layers, offs):
                native.zero(base[o:o + st.layout.numel])
            vals, rows = self._received(g, msg)
            if rows.numel():
                native.scatter(base, vals.float(), rows, g.S, g.s, g.geometry_at(offs), divide,
                               self._mark(base, divide))
        return True

    def _mark(self, out: torch.Tensor, divide: int) -> torch.Tensor | None:
        """``native.scatter``'s zeroed bit per cell of ``out`` (kept: the scatter leaves it
        zeroed), or None without a division."""
        if divide <= 1:
            return None
        nbytes = (out.numel() + 8) // 8
        mark = self._marks.get(nbytes)
        if mark is None:
            mark = self._marks[nbytes] = torch.zeros(nbytes, dtype=torch.uint8)
        return mark

    def _buffer(self, gi: int, n: int, device) -> torch.Tensor:
        """Group ``gi``'s zeroed decode output. On a CPU, last step's buffer is zeroed and used
        again once nothing outside this codec holds its storage any more (Horovod made its views
        the parameters' ``.grad``; ``zero_grad()`` or the next step's ``set_`` let them go):
        a fresh buffer of a bucket's size page-faults on every page when written (glibc hands
        the freed buckets back to the kernel), ~18k faults and ~30 ms a ResNet-50 step. Where
        something still holds it (gradients kept across steps, ``zero_grad(set_to_none=False)``
        accumulating into it) a new buffer is made, so nothing a caller holds ever changes."""
        held = self._out.get(gi)
        if held is not None and _USE_COUNT is not None:
            buf, own = held
            if buf.numel() == n and buf.device == device and _USE_COUNT(buf) == own:
                return native.zero(buf) if self.native else buf.zero_()
        buf = torch.zeros(n, dtype=torch.float32, device=device)
        if device.type == "cpu" and _USE_COUNT is not None:       # CUDA's allocator caches
            self._out[gi] = (buf, _USE_COUNT(buf))
        return buf

    @staticmethod
    def _scatter(g, flat, vals, rows):
        """Every unit's element indices in the bucket's flat output from its tensor's geometry,
        looked up per unit (no loop over tensors or units), then one scatter (message order
        kept: bit-identical sums). ``flat`` has one spare slot at the end that takes the padded
        cells of tiles."""
        dev = rows.device
        geo = g.geometry(dev)
        lay = torch.searchsorted(geo["unit_end"], rows, right=True)
        local = rows - geo["unit_off"][lay]
        cells = torch.arange(g.S, device=dev)
        # kernel / element layouts: a unit's cells are contiguous
        idx = (local * g.S + geo["elem_off"][lay]).view(-1, 1) + cells
        if g.s:                                     # the group has tiles (host-side: no sync)
            tiled = geo["tiled"][lay]
            tw, W = geo["tiles_w"][lay], geo["W"][lay]
            tr = torch.div(local, tw, rounding_mode="floor")
            tc = local - tr * tw
            si = torch.div(cells, g.s, rounding_mode="floor")
            r = (tr * g.s).view(-1, 1) + si
            c = (tc * g.s).view(-1, 1) + (cells - si * g.s)
            tidx = r * W.view(-1, 1) + c + geo["elem_off"][lay].view(-1, 1)
            ok = (r < geo["H"][lay].view(-1, 1)) & (c < W.view(-1, 1))
            # padded cells (zero in every message) go to one spare slot past the end instead
            # of being masked out: no compaction of the index and value arrays
            idx = torch.where(tiled.view(-1, 1), tidx.masked_fill_(~ok, g.numel), idx)
        add_in_order(flat, idx.reshape(-1), vals.reshape(-1))


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
