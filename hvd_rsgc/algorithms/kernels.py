"""Fused hot-path kernels: the same formulas as the eager code, compiled by ``torch.compile``
(Inductor: one generated C++/OpenMP loop on CPU, one Triton kernel on CUDA) instead of one
PyTorch kernel per operation.

``kernels="compiled"`` on :class:`~hvd_rsgc.RSDGCCompression` scores the NSI of a tensor's
units in ONE pass over the ``(U, S)`` accumulated velocity (eager: |v|, a row sum, v*v, a row
sum, a row sum, then the combination -- six passes; measured 11x faster on this 2-core CPU,
``python -m hvd_rsgc.bench compress``). Compiled once per process for all shapes
(``dynamic=True``; the first call takes ~20 s on a CPU, later processes reuse Inductor's disk
cache). Results equal the eager formula to float rounding (the row sums are reassociated): a
rank's setting changes only which units it sends; decoding does not depend on it, so ranks
stay bit-identical whatever each uses. The native C loops (``native.py``) are the CPU default.
"""
from __future__ import annotations

import torch

def _nsi(units: torch.Tensor, beta: float, counts: torch.Tensor | None) -> torch.Tensor:
    """``units``: (U, S) rows, or an (a, s, b, s) tile view (``nsi.py``)."""
    if units.dim() == 2:
        n = units.shape[1] if counts is None else counts
        mu = units.abs().sum(1) / n
        mean = units.sum(1) / n
        sq = (units * units).sum(1) / n
    else:
        n = units.shape[1] * units.shape[3] if counts is None else counts
        mu = units.abs().sum((1, 3)).view(-1) / n
        mean = units.sum((1, 3)).view(-1) / n
        sq = (units * units).sum((1, 3)).view(-1) / n
    var = (sq - mean * mean).clamp_min(0.0)
    return beta * mu + (1.0 - beta) * var.sqrt()


_COMPILED: dict = {}


def compiled_nsi():
    fn = _COMPILED.get("nsi")
    if fn is None:
        fn = _COMPILED["nsi"] = torch.compile(_nsi, dynamic=True)
    return fn
