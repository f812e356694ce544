"""Public compressors for ``hvd.DistributedOptimizer(..., compression=...)``.

Each is a thin binding of an ``algorithms`` method (selection / quantisation), a memory
(residual, momentum correction) and the Horovod adapter (communication). Common options:

``density``      fraction of each compressed tensor's elements sent per step (0 < density <= 1)
``min_numel``    tensors with fewer elements (and every 1-D tensor) go through the dense allreduce
``exclude``      fnmatch patterns of parameter names to keep dense, e.g. ``("fc.*",)``
``fp16_values``  send values as fp16 (the rounding error stays in the residual)
``index_dtype``  ``torch.int32`` (default) or ``torch.int64`` (the DGC reference's format)
``average``      ``True`` for ``op=hvd.Average`` (default), ``False`` for ``op=hvd.Sum``
``process_set``  the optimizer's Horovod process set, if not the global one
"""
from __future__ import annotations

import torch

from .adapter import HorovodCompression
from .algorithms.density import DGC_WARMUP
from .algorithms.dgc import DGC
from .algorithms.memory import ErrorFeedback, MomentumCorrection, NoMemory
from .algorithms.qsgd import QSGD
from .algorithms.randomk import RandomK
from .algorithms.rsdgc import RSDGC
from .algorithms.topk import TopK

__all__ = ["RSDGCCompression", "DGCCompression", "TopKCompression", "RandomKCompression",
           "QSGDCompression", "FP16Compression", "NoneCompression"]


def _value_dtype(fp16_values: bool):
    return torch.float16 if fp16_values else torch.float32


def _momentum_memory(momentum, nesterov, momentum_masking, error_feedback):
    if momentum > 0:
        if not error_feedback:
            raise ValueError("error_feedback=False needs momentum=0 (momentum correction keeps "
                             "its residual by construction)")
        return MomentumCorrection(momentum, nesterov, momentum_masking)
    return ErrorFeedback() if error_feedback else NoMemory()


class RSDGCCompression(HorovodCompression):
    """RS-DGC: NSI-scored neighbourhoods, layer-wise dynamic density, momentum correction.

    ``beta``: NSI = beta*mean|v| + (1-beta)*std(v) per neighbourhood (default 0.5);
    ``radius``: Chebyshev radius r of the (2r+1)^2 tiles for linear / 1x1 layers (a k x k conv
    kernel is always one unit); ``neighbourhood=False``, ``beta=1``, ``dynamic=False`` switch the
    three ingredients off (paper Table I); ``update_every``: steps between dynamic density
    recomputations; ``density_floor``: no layer gets less than ``density_floor * density``.
    Use with :class:`hvd_rsgc.DGCSGD` (or SGD without momentum).
    """

    def __init__(self, model, density: float = 0.001, *, beta: float = 0.5, radius: int = 1,
                 neighbourhood: bool = True, dynamic: bool = True, update_every: int = 100,
                 density_floor: float = 0.1, momentum: float = 0.9, nesterov: bool = False,
                 momentum_masking: bool = True, error_feedback: bool = True,
                 clip_norm: float | None = None, selection: str = "topk",
                 sample_ratio: float = 0.01, warmup_epochs: int = 0,
                 warmup_densities=DGC_WARMUP, steps_per_epoch: int | None = None,
                 fp16_values: bool = False, index_dtype=torch.int32, min_numel: int = 1024,
                 exclude=(), seed: int = 0, average: bool = True, process_set=None):
        method = RSDGC(_momentum_memory(momentum, nesterov, momentum_masking, error_feedback),
                       beta=beta, radius=radius, neighbourhood=neighbourhood,
                       selection=selection, sample_ratio=sample_ratio, seed=seed,
                       value_dtype=_value_dtype(fp16_values), index_dtype=index_dtype)
        super().__init__(model, method=method, density=density, dynamic=dynamic,
                         update_every=update_every, density_floor=density_floor,
                         warmup_epochs=warmup_epochs, warmup_densities=warmup_densities,
                         steps_per_epoch=steps_per_epoch, momentum=momentum, nesterov=nesterov,
                         clip_norm=clip_norm, min_numel=min_numel, exclude=exclude,
                         average=average, process_set=process_set)


class DGCCompression(HorovodCompression):
    """Deep Gradient Compression: momentum correction + factor masking, optional local clipping,
    warm-up densities (``warmup_epochs`` with ``steps_per_epoch`` or ``set_epoch``), sampled
    threshold with the reference's re-adjust loop. Use with :class:`hvd_rsgc.DGCSGD`."""

    def __init__(self, model, density: float = 0.001, *, momentum: float = 0.9,
                 nesterov: bool = False, momentum_masking: bool = True,
                 error_feedback: bool = True, clip_norm: float | None = None,
                 sample_ratio: float = 0.01, warmup_epochs: int = 0,
                 warmup_densities=DGC_WARMUP, steps_per_epoch: int | None = None,
                 fp16_values: bool = False, index_dtype=torch.int32, min_numel: int = 1024,
                 exclude=(), seed: int = 0, average: bool = True, process_set=None):
        method = DGC(_momentum_memory(momentum, nesterov, momentum_masking, error_feedback),
                     sample_ratio=sample_ratio, seed=seed,
                     value_dtype=_value_dtype(fp16_values), index_dtype=index_dtype)
        super().__init__(model, method=method, density=density, warmup_epochs=warmup_epochs,
                         warmup_densities=warmup_densities, steps_per_epoch=steps_per_epoch,
                         momentum=momentum, nesterov=nesterov, clip_norm=clip_norm,
                         min_numel=min_numel, exclude=exclude, average=average,
                         process_set=process_set)


class TopKCompression(HorovodCompression):
    """Exact per-tensor top-k of |residual + gradient| with error feedback. Use an ordinary
    momentum SGD."""

    def __init__(self, model, density: float = 0.001, *, error_feedback: bool = True,
                 fp16_values: bool = False, index_dtype=torch.int32, min_numel: int = 1024,
                 exclude=(), average: bool = True, process_set=None):
        method = TopK(ErrorFeedback() if error_feedback else NoMemory(),
                      value_dtype=_value_dtype(fp16_values), index_dtype=index_dtype)
        super().__init__(model, method=method, density=density, min_numel=min_numel,
                         exclude=exclude, average=average, process_set=process_set)


class RandomKCompression(HorovodCompression):
    """Random-k with a shared per-step seed: values allreduced, no indices on the wire. With
    ``error_feedback=False`` values are scaled by n/k (unbiased)."""

    def __init__(self, model, density: float = 0.001, *, error_feedback: bool = True,
                 seed: int = 0, fp16_values: bool = False, min_numel: int = 1024, exclude=(),
                 average: bool = True, process_set=None):
        method = RandomK(ErrorFeedback() if error_feedback else NoMemory(), seed=seed,
                         value_dtype=_value_dtype(fp16_values))
        super().__init__(model, method=method, density=density, min_numel=min_numel,
                         exclude=exclude, average=average, process_set=process_set)


class QSGDCompression(HorovodCompression):
    """QSGD with ``levels`` quantisation levels per bucket of ``bucket_size`` elements
    (``levels=1``: the RS-DGC paper's "1-bit" setting, 2 bits/element on the wire).
    ``density`` is not used (every element is sent, quantised)."""

    def __init__(self, model, *, levels: int = 1, bucket_size: int = 512,
                 error_feedback: bool = False, seed: int = 0, min_numel: int = 1024,
                 exclude=(), average: bool = True, process_set=None):
        method = QSGD(ErrorFeedback() if error_feedback else NoMemory(), levels=levels,
                      bucket_size=bucket_size, seed=seed)
        super().__init__(model, method=method, density=1.0, min_numel=min_numel,
                         exclude=exclude, average=average, process_set=process_set)


class FP16Compression(HorovodCompression):
    """Every gradient cast to fp16 for the allreduce (like ``hvd.Compression.fp16``), with the
    same byte accounting as the other compressors."""

    def __init__(self, model, *, average: bool = True, process_set=None):
        super().__init__(model, method=None, density=1.0, dense_dtype=torch.float16,
                         average=average, process_set=process_set)


class NoneCompression(HorovodCompression):
    """Dense fp32 allreduce (like ``hvd.Compression.none``), with byte accounting."""

    def __init__(self, model, *, average: bool = True, process_set=None):
        super().__init__(model, method=None, density=1.0, average=average,
                         process_set=process_set)
