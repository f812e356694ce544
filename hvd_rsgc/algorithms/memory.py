"""Residual memories (GRACE's "memory" role), pure tensor code.

* :class:`MomentumCorrection` — DGC / RS-DGC eq. 12: ``u = m*u + g; v = v + u``, send rows of v,
  zero the sent rows of v (residual; lossy codecs: ``v - sent``, the rounding error) and, with
  momentum factor masking, of u.
  Nesterov form: ``u = m*(u + g); v = v + u + g``.
* :class:`ErrorFeedback` — ``c = e + g``; after sending, ``e = c - sent`` (rows sent exactly are
  zeroed; lossy codecs hand back what was sent).
* :class:`NoMemory` — nothing kept (plain compression, or error feedback switched off).

Buffers live in the layer's storage form (``Layout.storage_shape``): ``accumulate`` adds into
``target(buffer)`` (the layout's ``target_view``; default: the buffer viewed like the input),
and "what was sent" is a set of unit rows, reached through the layout (``mark_sent(...,
layout=)``; default: rows of a 2-D buffer). Conservation (tested): after ``accumulate`` + ``mark_sent``, ``sent + residual`` equals the
accumulated input exactly.
"""
from __future__ import annotations

import math

import torch


def clip_local(g: torch.Tensor, clip_norm: float | None, world_size: int) -> torch.Tensor:
    """DGC local gradient clipping: per tensor, threshold ``clip_norm / sqrt(P)``. The norm of
    an fp16 / bf16 gradient is taken in fp32: in fp16 it overflows to inf past 65504, and the
    scale ``thr / inf = 0`` would silently zero the (finite) gradient."""
    if clip_norm is None:
        return g
    thr = clip_norm / math.sqrt(world_size)
    wide = g.dtype in (torch.float16, torch.bfloat16)
    norm = torch.linalg.vector_norm(g, dtype=torch.float32) if wide else torch.linalg.vector_norm(g)
    scale = torch.clamp(thr / (norm + 1e-6), max=1.0)
    return (g.float() * scale).to(g.dtype) if wide else g * scale


def _wide_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` in fp32 (fp64 for fp64): what the finiteness tests read."""
    return t.sum(dtype=torch.float32) if t.dtype != torch.float64 else t.sum()


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite, with one host sync.

    The fast path sums in fp32 (a sum of finite fp16/bf16 values cannot overflow fp32); only if
    that sum is not finite -- a real inf/NaN, or finite fp32 values whose sum overflows -- is
    the exact elementwise test run. Summing in the tensor's own dtype is wrong: an fp16 sum
    overflows past 65504 although every element is finite."""
    if t.numel() == 0:
        return True
    s = _wide_sum(t)
    if bool(torch.isfinite(s)):
        return True
    return bool(torch.isfinite(t).all())


def all_finite_each(ts: list[torch.Tensor]) -> list[bool]:
    """:func:`all_finite` of every tensor, with one host sync for all of them (plus one per
    tensor whose fp32 sum is not finite): the fp32 sums are stacked and read at once."""
    if not ts:
        return []
    sums = torch.stack([_wide_sum(t).float() for t in ts])
    ok = torch.isfinite(sums).tolist()
    return [True if good or t.numel() == 0 else bool(torch.isfinite(t).all())
            for good, t in zip(ok, ts)]


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 2 else x.reshape(x.shape[0] * x.shape[1], -1)


class NoMemory:
    error_feedback = False

    def init(self, shape, device, dtype) -> dict:
        return {}

    def accumulate(self, st: dict, g_units: torch.Tensor, target=None) -> torch.Tensor:
        """Add ``g_units`` into ``target(buffer)`` and return the whole buffer. Nothing is kept
        here: ``g_units`` comes back as it is (the method gives it in storage form)."""
        return _as_2d(g_units)

    def mark_sent(self, st: dict, rows: torch.Tensor, sent: torch.Tensor | None = None,
                  layout=None) -> None:
        pass

    def keep(self, st: dict, rows: torch.Tensor, values: torch.Tensor, layout) -> None:
        """Add ``values`` (k, S) to the residual at unit ``rows``: what a reduce-scatter owner
        rounded away when it re-encoded a sum in fp16 / int8, or the units a skipped step
        sent (``Method.give_back``). Nothing kept without a residual."""

    def keep_dense(self, st: dict, values: torch.Tensor) -> None:
        """Add ``values`` (the tensor's shape; an unpadded layout) to the whole residual."""


def _region(buf: torch.Tensor, g: torch.Tensor, target) -> torch.Tensor:
    return target(buf) if target is not None else buf.view(g.shape)


class ErrorFeedback(NoMemory):
    error_feedback = True

    def init(self, shape, device, dtype) -> dict:
        return {"e": torch.zeros(shape, device=device, dtype=dtype)}

    def accumulate(self, st, g_units, target=None):
        e = st["e"]
        _region(e, g_units, target).add_(g_units)
        return e

    def mark_sent(self, st, rows, sent=None, layout=None):
        """``rows``: unit indices that were sent (None: the whole tensor was sent through a
        lossy codec). ``sent``: the decoded values actually sent for those rows (None: exact).
        ``layout``: how unit rows map into the buffer (None: rows of the 2-D buffer)."""
        e = st["e"]
        if rows is None:
            if sent is None:
                e.zero_()
            else:
                e.sub_(sent.reshape(e.shape))
        else:
            _take_sent(e, rows, sent, layout)

    def keep(self, st, rows, values, layout):
        layout.sub_units_(st["e"], rows, -values)

    def keep_dense(self, st, values):
        st["e"].view(-1).add_(values.reshape(-1))


def _fill(buf: torch.Tensor, rows: torch.Tensor, layout) -> None:
    if layout is not None:
        layout.fill_units_(buf, rows, 0.0)
    else:
        buf.index_fill_(0, rows, 0.0)


def _take_sent(buf: torch.Tensor, rows: torch.Tensor, sent: torch.Tensor | None, layout) -> None:
    """The residual's sent rows keep what was not sent of them: zero when ``sent`` is None
    (sent exactly), ``buf - sent`` (a lossy codec's rounding error) otherwise."""
    if sent is None:
        _fill(buf, rows, layout)
    elif layout is not None:
        layout.sub_units_(buf, rows, sent)
    else:
        buf.index_add_(0, rows, sent.reshape(-1, buf.shape[1]), alpha=-1.0)


def check_momentum(momentum) -> None:
    """A momentum factor in [0, 1), or a ValueError naming it (NaN, negatives, bools and
    strings too): the compressors, their memory and DGCSGD share this one rule."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) \
            or not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")


class MomentumCorrection(NoMemory):
    error_feedback = True

    def __init__(self, momentum: float = 0.9, nesterov: bool = False, masking: bool = True):
        check_momentum(momentum)
        self.momentum = momentum
        self.nesterov = nesterov
        self.masking = masking

    def init(self, shape, device, dtype):
        return {"u": torch.zeros(shape, device=device, dtype=dtype),
                "v": torch.zeros(shape, device=device, dtype=dtype)}

    def accumulate(self, st, g_units, target=None):
        u, v = _region(st["u"], g_units, target), _region(st["v"], g_units, target)
        m = self.momentum
        if self.nesterov:
            u.add_(g_units).mul_(m)
            v.add_(u).add_(g_units)
        else:
            torch.add(g_units, u, alpha=m, out=u)          # u = m*u + g in one pass
            v.add_(u)
        return st["v"]

    def mark_sent(self, st, rows, sent=None, layout=None):
        """The sent rows of v become what was not sent of them: zero when sent exactly,
        ``v - sent`` (the rounding error of fp16 / int8 values) when ``sent`` is given, so a
        lossy codec loses nothing. Momentum factor masking zeroes the sent rows of u."""
        _take_sent(st["v"], rows, sent, layout)
        if self.masking:
            _fill(st["u"], rows, layout)

    def keep(self, st, rows, values, layout):
        layout.sub_units_(st["v"], rows, -values)

    def keep_dense(self, st, values):
        st["v"].view(-1).add_(values.reshape(-1))


class DenseMomentum:
    """Local momentum for tensors that a momentum-correcting method sends dense (biases, BN):
    DGC's ``compensate(accumulate=False)`` — applied after the allreduce, ``u = m*u + g_avg``
    (Nesterov: ``u = m*(u + g_avg); out = u + g_avg``). Identical on all ranks."""

    def __init__(self, momentum: float, nesterov: bool = False):
        self.momentum = momentum
        self.nesterov = nesterov

    def apply(self, st: dict, g_avg: torch.Tensor, replace: bool = False) -> torch.Tensor:
        """``replace``: the new ``u`` is a new tensor and the old one is left as it was (a
        caller that may put it back keeps it: no copy, the same operations and bits)."""
        u = st.get("u")
        if u is None:
            u = st["u"] = torch.zeros_like(g_avg)
        if self.nesterov:
            u = st["u"] = (torch.add(u, g_avg) if replace else u.add_(g_avg)).mul_(self.momentum)
            return u + g_avg
        u = st["u"] = (torch.mul(u, self.momentum) if replace else u.mul_(self.momentum)).add_(g_avg)
        return u.clone()
