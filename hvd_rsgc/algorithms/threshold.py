"""Threshold sparsification with error feedback (Strom 2015, "Scalable distributed DNN training
using commodity GPU cloud computing"; GRACE's ``threshold`` compressor).

Per compressed tensor on every rank, with a residual e (zero at the start) and a fixed
absolute threshold tau [choice: GRACE's fixed-threshold form; no relative rule]:

    v = e + g;   I = { i : |v_i| > tau }   (ascending);   send (v_I, I);   e = v;  e_I = 0

The number of elements sent, k, varies per rank and per step (the allgather accepts messages
of different lengths; a rank may send none). Because the residual keeps accumulating, every
element is eventually sent once its accumulated magnitude exceeds tau, so tau sets the
density *relative to the gradient scale*: check ``stats()`` (``sent_fraction`` per layer)
and raise tau when too much is sent -- a message costs ``k*(bv + bi)`` bytes, more than the
dense ``4n`` when over half the elements pass with fp32 values and int32 indices.

Wire format: the sparse (values, index) message of ``base.pack_sparse``, one row per sent
element: ``k*(bv + bi)`` bytes (8k with fp32 values and int32 indices).
"""
from __future__ import annotations

import math

from .base import SparseMethod


class Threshold(SparseMethod):
    name = "threshold"
    scale_equivariant = False           # an absolute tau against a loss-scaled residual

    def __init__(self, memory, threshold: float = 0.01, **kw):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or math.isnan(threshold) or not threshold >= 0:
            raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
        super().__init__(memory, **kw)
        self.threshold = float(threshold)

    def units_for(self, layer, density):
        return layer.numel

    def select(self, layer, acc, pre=None):
        return (acc.view(-1).abs() > self.threshold).nonzero().view(-1)
