"""Shared pieces of every method: per-tensor state, the sparse wire format, and the two
method shapes (sparse-allgather and values-allreduce). Pure tensor code, no Horovod.

A *method* turns one gradient into one message tensor (``encode``) and the messages of all
ranks back into one dense *sum* (``decode``); the Horovod adapter only moves messages.

Sparse wire format: one 2-D tensor per compressed tensor per rank, ``(k, S + c)`` of the value
dtype: the k selected units' S values, followed by the unit index (int32 or int64) stored
bit-for-bit in ``c`` value-sized columns. One allgather per tensor instead of two; the bytes
are exactly ``k*(S*bv + bi)``. Collectives copy bits, so the reinterpreted indices survive.
With ``value_dtype=torch.int8`` a unit's values are linearly quantised to int8 against its own
scale (``max|v| / 127``, a bfloat16 in two more int8 columns): ``(k, S + 2 + c)`` int8, the
bytes ``k*(S + 2 + bi)`` -- 15 bytes for a 3x3 kernel instead of 40 in fp32. The quantisation
error, like fp16's rounding, stays in the residual (:func:`to_wire` hands back what the
receivers will decode).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layout import Layout, Workspace
from .select import ceil_count


@dataclass
class LayerState:
    """Everything a method keeps about one tensor on one rank."""

    name: str
    index: int
    shape: torch.Size
    dtype: torch.dtype
    layout: Layout
    density: float = 1.0          # density in use for the current step
    k: int = 0                    # units sent per step (fixed between density updates)
    step: int = 0                 # how many times this tensor has been compressed
    memory: dict = field(default_factory=dict)
    memory_ready: bool = False    # buffers allocated (on the gradient's device)
    plan: object = None           # method-specific cached plan (DGC SamplePlan)

    @property
    def numel(self) -> int:
        return self.layout.numel


def make_layer(method: "Method", shape, density: float, *, name: str = "w", index: int = 0,
               device=None) -> LayerState:
    """A ready-to-use :class:`LayerState` for ``method`` on a tensor of ``shape`` at ``density``
    (layout, k, the method's plan, memory allocated): the public way to drive a method outside
    a training job -- benchmarks, tests, a new backend."""
    shape = torch.Size(shape)
    st = LayerState(name=name, index=index, shape=shape, dtype=torch.float32,
                    layout=method.make_layout(shape))
    st.density = float(density)
    st.k = method.units_for(st, st.density)
    method.on_density(st)
    method.init_memory(st, torch.device("cpu") if device is None else torch.device(device))
    st.memory_ready = True
    return st


VALUE_DTYPES = (torch.float32, torch.float16, torch.int8)
INT8_QMAX = 127


def scale_columns(value_dtype: torch.dtype) -> int:
    """Columns a unit's scale takes in the message (int8 values: one bfloat16 = 2 int8)."""
    return 2 if value_dtype == torch.int8 else 0


def unit_bytes(unit_size: int, value_dtype: torch.dtype, index_dtype: torch.dtype) -> int:
    """Bytes one unit takes on the wire: values, scale, index."""
    vb = torch.empty((), dtype=value_dtype).element_size()
    ib = torch.empty((), dtype=index_dtype).element_size()
    return unit_size * vb + scale_columns(value_dtype) * vb + ib


FP16_MAX = 65504.0


def to_wire(values: torch.Tensor, value_dtype: torch.dtype):
    """fp32 unit values ``(k, S)`` -> ``(wire, sent)``: the value columns of the message in the
    wire dtype, and the fp32 values the receivers will decode from them (None where that is
    ``values`` itself, fp32). ``sent`` goes to ``memory.mark_sent`` so the rounding error stays
    in the residual. int8: per unit ``q = round(v / s)`` in [-127, 127] with ``s`` =
    bfloat16(max|v| / 127), decoded as ``q * s`` by the same arithmetic on every rank."""
    if value_dtype == torch.float32:
        return (values if values.dtype == torch.float32 else values.float()), None
    if value_dtype == torch.float16:
        # saturated at fp16's largest finite value: past it the cast gives inf, the residual
        # then keeps v - inf and the next send inf - inf = NaN, for good; clamped, what does
        # not fit stays in the residual and goes out in later steps
        wire = values.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
        return wire, wire.float()
    if value_dtype != torch.int8:
        raise ValueError(f"value_dtype must be one of {VALUE_DTYPES}, got {value_dtype}")
    v = values.float()
    scale = (v.abs().amax(1, keepdim=True) / INT8_QMAX).to(torch.bfloat16)
    s = scale.float()
    # 0/0 (an all-zero unit, or a scale below bfloat16's range) -> 0; clamp: s rounded down
    q = torch.nan_to_num(v / s, nan=0.0).round_().clamp_(-INT8_QMAX, INT8_QMAX)
    # reshape(-1) first: an empty (0, 1) scale has stride (1, 0), which view() refuses
    wire = torch.cat([q.to(torch.int8), scale.reshape(-1).view(torch.int8).view(-1, 2)], dim=1)
    return wire, q * s


def from_wire(cols: torch.Tensor, unit_size: int) -> torch.Tensor:
    """The value columns of received messages ``(K, S [+ 2])`` -> values (int8: decoded fp32,
    exactly ``to_wire``'s ``sent``; fp16 / fp32: as they are)."""
    if cols.dtype != torch.int8:
        return cols
    scale = torch.empty((cols.shape[0], 2), dtype=torch.int8, device=cols.device)
    scale.copy_(cols[:, unit_size:unit_size + 2])
    return cols[:, :unit_size].float() * scale.view(torch.bfloat16).float()


def index_columns(value_dtype: torch.dtype, index_dtype: torch.dtype) -> int:
    vb = torch.empty((), dtype=value_dtype).element_size()
    ib = torch.empty((), dtype=index_dtype).element_size()
    if ib % vb:
        raise ValueError(f"index dtype {index_dtype} does not pack into {value_dtype} columns")
    return ib // vb


def message_columns(unit_size: int, value_dtype: torch.dtype, index_dtype: torch.dtype) -> int:
    """Columns of one unit's row in a sparse message: values, scale (int8), index."""
    return unit_size + scale_columns(value_dtype) + index_columns(value_dtype, index_dtype)


def pack_sparse(values: torch.Tensor, rows: torch.Tensor, index_dtype: torch.dtype) -> torch.Tensor:
    """values (k, S) of the wire dtype (int8: ``to_wire``'s (k, S + 2)), rows (k,) -> message
    (k, S [+ 2] + c)."""
    c = index_columns(values.dtype, index_dtype)
    idx = rows.to(index_dtype).contiguous().view(values.dtype).view(-1, c)
    return torch.cat([values, idx], dim=1)


def row_range(rows: torch.Tensor, num_units: int) -> tuple[int, int]:
    """(smallest, largest) of a message's rows, read with one host sync; a row outside
    ``[0, num_units)`` is a ValueError. Empty: (0, -1)."""
    if not rows.numel():
        return 0, -1
    lo, hi = torch.stack(torch.aminmax(rows)).tolist()
    if lo < 0 or hi >= num_units:
        raise ValueError(f"sparse message index out of range [0, {num_units})")
    return lo, hi


def unpack_sparse(msg: torch.Tensor, unit_size: int, index_dtype: torch.dtype, num_units: int,
                  check_rows: bool = True):
    """message (K, S [+ 2] + c) -> (values (K, S), rows int64 (K,)); rejects malformed
    messages. int8 messages come back decoded (fp32); fp16 / fp32 as they are.
    ``check_rows=False``: the caller checks the rows with :func:`row_range` itself (and uses
    what it reads)."""
    width = message_columns(unit_size, msg.dtype, index_dtype)
    c = index_columns(msg.dtype, index_dtype)
    if msg.dim() != 2 or msg.shape[1] != width:
        raise ValueError(f"sparse message has shape {tuple(msg.shape)}, expected (K, {width})")
    w = width - c
    values = from_wire(msg[:, :w], unit_size)
    # copy into fresh storage: a 1-row slice counts as "contiguous" but sits at an odd offset
    idx = torch.empty((msg.shape[0], c), dtype=msg.dtype, device=msg.device).copy_(msg[:, w:])
    rows = idx.view(index_dtype).view(-1).long()
    if check_rows:
        row_range(rows, num_units)
    return values, rows


def add_in_order(out: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> None:
    """``out[idx[j]] += vals[j]`` for every j (rows of dim 0; duplicates add), deterministically, so that
    every rank decoding the same gathered messages gets the same bits. On a CPU
    ``index_add_`` adds one index after the other, in message order (rank order) -- the order
    the native decode (``native.hr_scatter``) uses. Not ``index_put_(accumulate=True)``: on a
    CPU it adds duplicates in an order that is not the message order and, for large inputs,
    not even the same from one call to the next (torch 2.13, measured: two decodes of the same
    gathered Top-k messages of 4 ranks, one ResNet-50 bucket, differed in each of its 4 tensors),
    which would let the ranks' parameters drift apart. On CUDA, where ``index_add_`` uses atomics,
    ``index_put_(accumulate=True)`` (sorted, deterministic) does it."""
    if out.device.type == "cpu":
        out.index_add_(0, idx, vals)
    else:
        out.index_put_((idx,), vals, accumulate=True)


def scatter_sum(layout: Layout, values: torch.Tensor, rows: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """Sum the units' values straight into a zero tensor of the layout's shape (one memset and
    a k*S-element scatter: no (U, S) matrix, no copy back). Duplicate rows (different ranks
    picking the same unit) add in message order (:func:`add_in_order`), so every rank computes
    bit-identical sums."""
    out = torch.zeros(layout.numel, dtype=torch.float32, device=values.device)
    if rows.numel():
        idx, valid = layout.element_index(rows)
        vals = values.float().reshape(idx.shape)
        if valid is not None:
            idx, vals = idx[valid], vals[valid]
        add_in_order(out, idx.reshape(-1), vals.reshape(-1))
    out = out.view(layout.shape)
    return out if out_dtype == torch.float32 else out.to(out_dtype)


class Method:
    """Base: subclasses set ``communicator`` and implement ``encode``/``decode``."""

    name = "method"
    communicator = "allgather"          # "allgather" (per-rank messages) or "allreduce"
    momentum_correction = False         # puts momentum into what it sends (DGC family)
    # its output scales with its input (a loss scaler's factor passes through): not so for a
    # sign vote or an absolute threshold (``Engine.set_grad_scaler`` refuses those)
    scale_equivariant = True
    wants_neighbourhood = False
    generator: torch.Generator | None = None     # seeded methods set their own
    VALUE_DTYPES: tuple = (torch.float32, torch.float16)   # sparse methods add int8

    def __init__(self, memory, value_dtype=torch.float32, index_dtype=torch.int32):
        if index_dtype not in (torch.int32, torch.int64):
            raise ValueError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")
        if value_dtype not in self.VALUE_DTYPES:
            raise ValueError(f"value_dtype must be one of {self.VALUE_DTYPES}, got {value_dtype}")
        self.memory = memory
        self.value_dtype = value_dtype
        self.index_dtype = index_dtype
        self.workspace = Workspace()

    # -- random state (part of the compressor's state_dict, so resume is exact) -----------
    def rng_state(self) -> dict:
        gen = getattr(self, "generator", None)
        return {"generator": gen.get_state()} if gen is not None else {}

    def load_rng_state(self, state: dict) -> None:
        gen = self.generator
        if gen is not None and "generator" in state:
            gen.set_state(state["generator"])

    # -- hooks for subclasses -------------------------------------------------------------
    def make_layout(self, shape) -> Layout:
        return Layout(shape)

    def units_for(self, layer: LayerState, density: float) -> int:
        return max(1, min(layer.layout.num_units, ceil_count(density, layer.numel)))

    def on_density(self, layer: LayerState) -> None:
        """Called when ``layer.density`` changed (recompute cached plans)."""

    def init_memory(self, layer: LayerState, device) -> None:
        layer.memory = self.memory.init(layer.layout.storage_shape, device, torch.float32)

    def empty_message(self, layer: LayerState, device) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, layer: LayerState, g: torch.Tensor, ctx: dict) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, layer: LayerState, gathered: torch.Tensor, nranks: int, ctx: dict) -> torch.Tensor:
        raise NotImplementedError

    def give_back(self, layer: LayerState, msg: torch.Tensor, ctx: dict) -> None:
        """A skipped step (``nonfinite="skip"``): what this rank sent of ``layer`` -- ``msg``,
        its own message -- goes back into the residual, as if it had not been sent. Default:
        the message decoded as one rank's sum, added to the residual whole."""
        if not self.memory.error_feedback or not layer.memory:
            return
        self.memory.keep_dense(layer.memory, self.decode(layer, msg, 1, ctx))


class SparseMethod(Method):
    """Select units of the accumulated gradient, send (values, unit index) by allgather.

    ``kernels``: ``"eager"`` (one PyTorch kernel per operation), ``"native"`` (the residual
    update fused with what selection reads, one C loop per tensor: ``native.py``; CPU fp32,
    other tensors take the eager route) or ``"auto"`` (native where it builds)."""

    KERNELS: tuple[str, ...] = ("auto", "eager", "native")
    VALUE_DTYPES = VALUE_DTYPES

    def __init__(self, memory, kernels: str = "eager", **kw):
        super().__init__(memory, **kw)
        from . import native
        if kernels not in self.KERNELS:
            raise ValueError(f"kernels must be one of {self.KERNELS}, got {kernels!r}")
        self.kernels = native.resolve(kernels)

    def select(self, layer: LayerState, acc: torch.Tensor, pre=None) -> torch.Tensor:
        """acc (the residual in the layout's storage form) -> selected unit rows, int64
        ascending. ``pre``: what ``native_pass`` computed alongside the update (None: eager)."""
        raise NotImplementedError

    def native_pass(self, layer: LayerState, g: torch.Tensor):
        """Native route: update the residual with ``g`` and compute what ``select`` reads, in one
        pass. Default (element units): the block extremes of the threshold filter
        (``select.AtLeast``) when it will read them. Returns ``(acc, pre)``."""
        from . import native
        from .select import BLOCK, blocked
        n = layer.layout.numel
        if blocked(n, self.filter_expected(layer), g.device):
            nb = n // BLOCK
            hi = self.workspace.get("hi", nb, g.device)
            lo = self.workspace.get("lo", nb, g.device)
            acc = native.accumulate_extremes(self.memory, layer, g, BLOCK, hi, lo)
            return acc, (hi, lo)
        return native.accumulate_extremes(self.memory, layer, g, BLOCK, None, None), None

    def encode_group(self, group, grads: dict, ctxs: dict) -> torch.Tensor | None:
        """A bucket group's message in one go (``bucket.BucketCodec``), exactly what encoding
        its layers one by one gives; None (the default): encode them one by one."""
        return None

    def filter_expected(self, layer: LayerState) -> float | None:
        """The fraction of entries ``select``'s threshold filter expects to pass (None: none)."""
        return None

    def empty_message(self, layer, device):
        width = message_columns(layer.layout.unit_size, self.value_dtype, self.index_dtype)
        return torch.zeros(0, width, dtype=self.value_dtype, device=device)

    def unit_scores(self, values: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        """Importance of summed units ``(m, S)`` when a reduce-scatter owner re-selects
        (``collective.py``); ``counts``: real cells per unit (None: all S)."""
        return values.abs().sum(1)

    def pick(self, layer, g, finite: bool = True):
        """Accumulate ``g`` into the residual (in the layout's storage form) and select: ``(rows
        int64 ascending, fp32 values (k, S))``. The residual is not touched yet (``encode`` marks them sent; the
        reduce-scatter marks only what reached the final set). ``finite=False``: nothing is
        accumulated and nothing selected (empty rows and values)."""
        if not finite:
            return (torch.zeros(0, dtype=torch.int64, device=g.device),
                    torch.zeros(0, layer.layout.unit_size, device=g.device))
        g = g.float() if g.dtype != torch.float32 else g
        lay = layer.layout
        if self.kernels == "native" and _native_supports(self.memory, layer, g):
            acc, pre = self.native_pass(layer, g)
            rows = self.select(layer, acc, pre)
            return rows, lay.gather_units(acc, rows)
        if self.memory.error_feedback:
            acc = self.memory.accumulate(layer.memory, lay.source_view(g, self.workspace),
                                         lay.target_view)
        else:
            acc = lay.storage(g, self.workspace)
        rows = self.select(layer, acc)
        return rows, lay.gather_units(acc, rows)

    def accumulate_finite(self, layer, g) -> None:
        """A gradient holding inf / NaN that is not sent (``bucket.BucketCodec``): its finite
        entries go into the residual as ``pick`` would add them, its other entries leave the
        residual as it was (the native kernels' update skips them itself)."""
        if not self.memory.error_feedback:
            return
        g = g.float() if g.dtype != torch.float32 else g
        if self.kernels == "native" and _native_supports(self.memory, layer, g):
            self.native_pass(layer, g)
            return
        ok = torch.isfinite(g)
        lay = layer.layout
        bad = lay.source_view(~ok, self.workspace)
        bufs = [b for b in layer.memory.values() if isinstance(b, torch.Tensor)]
        old = [lay.target_view(b)[bad] for b in bufs]
        self.memory.accumulate(layer.memory, lay.source_view(torch.where(ok, g, 0.0), self.workspace),
                               lay.target_view)
        for b, o in zip(bufs, old):
            lay.target_view(b)[bad] = o

    def encode(self, layer, g, ctx):
        rows, values = self.pick(layer, g)
        wire, sent = to_wire(values, self.value_dtype)
        self.memory.mark_sent(layer.memory, rows, sent, layer.layout)
        ctx["sent_units"] = int(rows.numel())
        return pack_sparse(wire, rows, self.index_dtype)

    def decode(self, layer, gathered, nranks, ctx):
        values, rows = unpack_sparse(gathered, layer.layout.unit_size, self.index_dtype,
                                     layer.layout.num_units)
        return scatter_sum(layer.layout, values, rows, torch.float32)

    def give_back(self, layer, msg, ctx):
        """The units of this rank's own message return to the residual at their rows (the
        values the receivers decode: a lossy codec's rounding error is already there)."""
        if not layer.memory:
            return
        values, rows = unpack_sparse(msg, layer.layout.unit_size, self.index_dtype,
                                     layer.layout.num_units)
        if rows.numel():
            self.memory.keep(layer.memory, rows, values.float(), layer.layout)


def _native_supports(memory, layer, g) -> bool:
    from . import native
    lay = layer.layout
    rows, cols = lay.storage_shape
    if not native.applies(memory, g, layer.memory, rows * cols):
        return False
    # without a residual a padded tile layout needs its zero-padded copy (eager ``storage``)
    return memory.error_feedback or not getattr(lay, "padded", False)


def header_words(msgs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The first 4-byte word of each row of a (P, bytes) uint8 message matrix, reinterpreted as
    ``dtype`` (float32 / int32) -> (P, 1). Copied into fresh storage first: a row's offset
    need not be a multiple of 4 (and a 1-row slice counts as contiguous at any offset)."""
    head = torch.empty((msgs.shape[0], 4), dtype=torch.uint8, device=msgs.device)
    head.copy_(msgs[:, :4])
    return head.view(dtype)


class StochasticElementwise(Method):
    """Every element sent, rounded with uniforms drawn per (seed, rank, tensor, step) -- so
    ranks draw independently and a resumed run draws exactly what the uninterrupted one did.
    Subclasses give ``message_bytes(n)`` and ``pack(g, u)`` (TernGrad, natural compression)."""

    seed = 0

    def message_bytes(self, n: int) -> int:
        raise NotImplementedError

    def pack(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def units_for(self, layer, density):
        return layer.numel

    def uniforms(self, layer, device, rank: int) -> torch.Tensor:
        from .select import seeded_uniform
        return seeded_uniform(layer.numel, device, self.seed, rank, layer.index, layer.step)

    def empty_message(self, layer, device):
        return torch.zeros(self.message_bytes(layer.numel), dtype=torch.uint8, device=device)

    def encode(self, layer, g, ctx):
        u = self.uniforms(layer, g.device, int(ctx.get("rank", 0)))
        ctx["sent_units"] = layer.numel
        return self.pack(g, u)
