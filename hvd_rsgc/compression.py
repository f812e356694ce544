"""Public compressors for ``hvd.DistributedOptimizer(..., compression=...)``.

Each is a thin binding of an ``algorithms`` method (selection / quantisation), a memory
(residual, momentum correction) and the Horovod adapter (communication). Common options:

``density``      fraction of each compressed tensor's elements sent per step (0 < density <= 1)
``min_numel``    tensors with fewer elements (and every 1-D tensor) go through the dense allreduce
``exclude``      fnmatch patterns of parameter names to keep dense, e.g. ``("fc.*",)``
``fp16_values``  send values as fp16 (the rounding error stays in the residual)
``int8_values``  sparse methods (rsdgc, dgc, topk, threshold): send each unit's values as int8
                 against its own bfloat16 scale (``max|v|/127``): S + 2 bytes per unit instead
                 of 4S (a 3x3 kernel with its index: 15 bytes instead of 40); the rounding
                 error stays in the residual
``index_dtype``  ``torch.int32`` (default) or ``torch.int64`` (the DGC reference's format)
``average``      ``True`` for ``op=hvd.Average`` (default), ``False`` for ``op=hvd.Sum``
``process_set``  the optimizer's Horovod process set, if not the global one (DDP: the
                 torch.distributed process group DDP uses, if not the default one)
``communicator`` sparse methods (rsdgc, dgc, topk): ``"allgather"`` (default),
                 ``"reduce_scatter"`` (Ok-Topk style, per-rank volume flat in P) or ``"auto"``
``kernels``      sparse methods (rsdgc, dgc, topk): ``"auto"`` (default: the fused C kernels of
                 ``algorithms/native.py`` for CPU tensors where a C compiler is found, else
                 eager), ``"native"``, ``"eager"`` or ``"grouped"`` (whole-group tensor
                 operations, meant for GPUs); decoding is the same code either way, so ranks
                 stay bit-identical whichever each one uses
``nonfinite``    ``"raise"`` (default): every rank raises ``FloatingPointError`` naming the
                 parameter; ``"skip"``: every rank gets NaN gradients for that step and
                 ``step_nonfinite`` is True (skip the optimizer step; state stays consistent)

Adding a compressor: one pure file under ``algorithms/`` (the method), one class here that
builds it, decorated with ``@register("name")`` -- the CLI, ``compare``, ``bench`` and the tests'
conformance runs pick it up from the registry.
"""
from __future__ import annotations

import torch

from .compressor import Compressor
from .algorithms.density import DGC_WARMUP
from .algorithms.dgc import DGC
from .algorithms.efsignsgd import EFSignSGD
from .algorithms.memory import ErrorFeedback, MomentumCorrection, NoMemory, check_momentum
from .algorithms.natural import Natural
from .algorithms.powersgd import PowerSGD
from .algorithms.qsgd import QSGD
from .algorithms.randomk import RandomK
from .algorithms.rsdgc import RSDGC
from .algorithms.signsgd import SignSGD
from .algorithms.terngrad import TernGrad
from .algorithms.threshold import Threshold
from .algorithms.topk import TopK
from .registry import register

__all__ = ["RSDGCCompression", "DGCCompression", "TopKCompression", "RandomKCompression",
           "QSGDCompression", "FP16Compression", "NoneCompression", "LGCCompression",
           "PowerSGDCompression", "SignSGDCompression", "EFSignSGDCompression",
           "TernGradCompression", "NaturalCompression", "ThresholdCompression"]


def _value_dtype(fp16_values: bool, int8_values: bool = False):
    """(Both are checked to be bools by the compressor's ``__init__``: ``_check_bools``.)"""
    if fp16_values and int8_values:
        raise ValueError("fp16_values and int8_values are exclusive: choose one value format")
    return torch.int8 if int8_values else torch.float16 if fp16_values else torch.float32


def _momentum_memory(momentum, nesterov, momentum_masking, error_feedback):
    check_momentum(momentum)        # before the branch: a negative one switched it off silently
    if momentum > 0:
        if not error_feedback:
            raise ValueError("error_feedback=False needs momentum=0 (momentum correction keeps "
                             "its residual by construction)")
        return MomentumCorrection(momentum, nesterov, momentum_masking)
    return ErrorFeedback() if error_feedback else NoMemory()


@register("rsdgc")
class RSDGCCompression(Compressor):
    """RS-DGC: NSI-scored neighbourhoods, layer-wise dynamic density, momentum correction.

    ``beta``: NSI = beta*mean|v| + (1-beta)*std(v) per neighbourhood (default 0.5);
    ``radius``: Chebyshev radius r of the (2r+1)^2 tiles for linear / 1x1 layers (a k x k conv
    kernel is always one unit); ``neighbourhood=False``, ``beta=1``, ``dynamic=False`` switch the
    three ingredients off (paper Table I); ``update_every``: steps between dynamic density
    recomputations; ``density_floor``: no layer gets less than ``density_floor * density``.
    Warm-up: ``warmup_epochs`` (DGC's densities 0.25, 0.0625, ... one per epoch) or
    ``warmup_ramp_steps`` (the same decay per step, for runs of a few epochs).
    ``kernels``: ``"auto"`` (default: ``"native"`` on CPU where a C compiler builds the kernels,
    else ``"eager"``), ``"native"`` (residual update + NSI in one C pass per tensor,
    ``algorithms/native.py``), ``"eager"`` (one PyTorch op per step), ``"compiled"`` (NSI
    by ``torch.compile``, ``algorithms/kernels.py``) or ``"grouped"`` (each bucket group in a
    few whole-group tensor operations, the route meant for GPUs: ``algorithms/grouped.py``;
    not measured on a GPU yet, slower than ``"native"`` on a CPU).
    Use with :class:`hvd_rsgc.DGCSGD` (or SGD without momentum).
    """

    def __init__(self, model, density: float = 0.001, *, beta: float = 0.5, radius: int = 1,
                 neighbourhood: bool = True, dynamic: bool = True, update_every: int = 100,
                 density_floor: float = 0.1, momentum: float = 0.9, nesterov: bool = False,
                 momentum_masking: bool = True, error_feedback: bool = True,
                 clip_norm: float | None = None, selection: str = "topk",
                 sample_ratio: float = 0.01, warmup_epochs: int = 0,
                 warmup_densities=DGC_WARMUP, steps_per_epoch: int | None = None,
                 warmup_ramp_steps: int = 0, fp16_values: bool = False, int8_values: bool = False,
                 index_dtype=torch.int32, min_numel: int = 1024,
                 exclude=(), seed: int = 0, average: bool = True, process_set=None,
                 nonfinite: str = "raise", communicator: str = "allgather",
                 reselect: float | None = 1.0, fused: bool = True, bucket_mb: float = 25.0, kernels: str = "auto"):
        method = RSDGC(_momentum_memory(momentum, nesterov, momentum_masking, error_feedback),
                       beta=beta, radius=radius, neighbourhood=neighbourhood,
                       selection=selection, sample_ratio=sample_ratio, seed=seed, kernels=kernels,
                       value_dtype=_value_dtype(fp16_values, int8_values), index_dtype=index_dtype)
        super().__init__(model, method=method, density=density, dynamic=dynamic,
                         update_every=update_every, density_floor=density_floor,
                         warmup_epochs=warmup_epochs, warmup_densities=warmup_densities,
                         steps_per_epoch=steps_per_epoch, warmup_ramp_steps=warmup_ramp_steps,
                         momentum=momentum, nesterov=nesterov,
                         clip_norm=clip_norm, min_numel=min_numel, exclude=exclude,
                         average=average, process_set=process_set, nonfinite=nonfinite,
                         communicator=communicator, reselect=reselect,
                         fused=fused, bucket_mb=bucket_mb)


@register("dgc")
class DGCCompression(Compressor):
    """Deep Gradient Compression: momentum correction + factor masking, optional local clipping,
    warm-up densities (``warmup_epochs`` with ``steps_per_epoch`` or ``set_epoch``; or
    ``warmup_ramp_steps``: the same decay as one per-step ramp, ``density.ramp_density``), sampled
    threshold with the reference's re-adjust loop. Use with :class:`hvd_rsgc.DGCSGD`.
    ``kernels``: ``"auto"`` (default), ``"native"``, ``"eager"`` or ``"grouped"`` (whole-group
    tensor operations, meant for GPUs: ``algorithms/grouped.py``)."""

    def __init__(self, model, density: float = 0.001, *, momentum: float = 0.9,
                 nesterov: bool = False, momentum_masking: bool = True,
                 error_feedback: bool = True, clip_norm: float | None = None,
                 sample_ratio: float = 0.01, warmup_epochs: int = 0,
                 warmup_densities=DGC_WARMUP, steps_per_epoch: int | None = None,
                 warmup_ramp_steps: int = 0, fp16_values: bool = False, int8_values: bool = False,
                 index_dtype=torch.int32, min_numel: int = 1024,
                 exclude=(), seed: int = 0, average: bool = True, process_set=None,
                 nonfinite: str = "raise", communicator: str = "allgather",
                 reselect: float | None = 1.0, fused: bool = True, bucket_mb: float = 25.0,
                 kernels: str = "auto"):
        method = DGC(_momentum_memory(momentum, nesterov, momentum_masking, error_feedback),
                     sample_ratio=sample_ratio, seed=seed, kernels=kernels,
                     value_dtype=_value_dtype(fp16_values, int8_values), index_dtype=index_dtype)
        super().__init__(model, method=method, density=density, warmup_epochs=warmup_epochs,
                         warmup_densities=warmup_densities, steps_per_epoch=steps_per_epoch,
                         warmup_ramp_steps=warmup_ramp_steps,
                         momentum=momentum, nesterov=nesterov, clip_norm=clip_norm,
                         min_numel=min_numel, exclude=exclude, average=average,
                         process_set=process_set, nonfinite=nonfinite,
                         communicator=communicator, reselect=reselect,
                         fused=fused, bucket_mb=bucket_mb)


@register("topk")
class TopKCompression(Compressor):
    """Exact per-tensor top-k of |residual + gradient| with error feedback. Use an ordinary
    momentum SGD. ``kernels``: ``"auto"`` (default), ``"native"``, ``"eager"`` or
    ``"grouped"`` (whole-group tensor operations, meant for GPUs: ``algorithms/grouped.py``)."""

    def __init__(self, model, density: float = 0.001, *, error_feedback: bool = True,
                 fp16_values: bool = False, int8_values: bool = False,
                 index_dtype=torch.int32, min_numel: int = 1024,
                 exclude=(), average: bool = True, process_set=None,
                 nonfinite: str = "raise", communicator: str = "allgather",
                 reselect: float | None = 1.0, fused: bool = True, bucket_mb: float = 25.0,
                 kernels: str = "auto"):
        method = TopK(ErrorFeedback() if error_feedback else NoMemory(), kernels=kernels,
                      value_dtype=_value_dtype(fp16_values, int8_values), index_dtype=index_dtype)
        super().__init__(model, method=method, density=density, min_numel=min_numel,
                         exclude=exclude, average=average, process_set=process_set, nonfinite=nonfinite,
                         communicator=communicator, reselect=reselect,
                         fused=fused, bucket_mb=bucket_mb)


@register("randomk")
class RandomKCompression(Compressor):
    """Random-k with a shared per-step seed: values allreduced, no indices on the wire. With
    ``error_feedback=False`` values are scaled by n/k (unbiased)."""

    def __init__(self, model, density: float = 0.001, *, error_feedback: bool = True,
                 seed: int = 0, fp16_values: bool = False, min_numel: int = 1024, exclude=(),
                 average: bool = True, process_set=None,
                 nonfinite: str = "raise"):
        method = RandomK(ErrorFeedback() if error_feedback else NoMemory(), seed=seed,
                         value_dtype=_value_dtype(fp16_values))
        super().__init__(model, method=method, density=density, min_numel=min_numel,
                         exclude=exclude, average=average, process_set=process_set, nonfinite=nonfinite)


@register("qsgd")
class QSGDCompression(Compressor):
    """QSGD with ``levels`` quantisation levels per bucket of ``bucket_size`` elements
    (``levels=1``: the RS-DGC paper's "1-bit" setting, 2 bits/element on the wire).
    ``density`` is not used (every element is sent, quantised)."""

    def __init__(self, model, *, levels: int = 1, bucket_size: int = 512,
                 error_feedback: bool = False, seed: int = 0, min_numel: int = 1024,
                 exclude=(), average: bool = True, process_set=None,
                 nonfinite: str = "raise"):
        method = QSGD(ErrorFeedback() if error_feedback else NoMemory(), levels=levels,
                      bucket_size=bucket_size, seed=seed)
        super().__init__(model, method=method, density=1.0, min_numel=min_numel,
                         exclude=exclude, average=average, process_set=process_set, nonfinite=nonfinite)


@register("fp16")
class FP16Compression(Compressor):
    """Every gradient cast to fp16 for the allreduce (like ``hvd.Compression.fp16``), with the
    same byte accounting as the other compressors."""

    def __init__(self, model, *, average: bool = True, process_set=None,
                 nonfinite: str = "raise"):
        super().__init__(model, method=None, density=1.0, dense_dtype=torch.float16,
                         average=average, process_set=process_set, nonfinite=nonfinite)


@register("none")
class NoneCompression(Compressor):
    """Dense fp32 allreduce (like ``hvd.Compression.none``), with byte accounting."""

    def __init__(self, model, *, average: bool = True, process_set=None,
                 nonfinite: str = "raise"):
        super().__init__(model, method=None, density=1.0, average=average,
                         process_set=process_set, nonfinite=nonfinite)


@register("lgc-rar", defaults={"mode": "rar"},
          aliases={"lgc_warmup_steps": "warmup_steps", "lgc_ae_steps": "ae_steps",
                   "lgc_innovation_density": "innovation_density"})
@register("lgc-ps", defaults={"mode": "ps"},
          aliases={"lgc_warmup_steps": "warmup_steps", "lgc_ae_steps": "ae_steps",
                   "lgc_innovation_density": "innovation_density"})
class LGCCompression(Compressor):
    """Learned Gradient Compression (``mode="rar"`` ring-allreduce or ``"ps"`` parameter
    server) through the stock optimizer: three stages by step count (top-k under common
    indices; autoencoder training on every rank's values; compressed codes), see
    :class:`hvd_rsgc.algorithms.lgc.LGC`. Use an ordinary momentum SGD.

        compression = LGCCompression(model, mode="rar", density=0.001, warmup_steps=200, ae_steps=300)
    """

    def __init__(self, model, mode: str = "rar", density: float = 0.001, *,
                 warmup_steps: int = 200, ae_steps: int = 300,
                 innovation_density: float | None = None, leader: int = 0,
                 code_channels: int = 4, ae_lr: float = 1e-3, sim_weight: float = 0.1,
                 ae_updates: int = 4, replay: int = 32, min_numel: int = 1024, exclude=(),
                 seed: int = 0, average: bool = True, process_set=None,
                 nonfinite: str = "raise"):
        from .algorithms.lgc import LGC
        from .engine import check_density, check_int, check_number
        if mode not in ("ps", "rar"):
            raise ValueError(f"mode must be 'ps' or 'rar', got {mode!r}")
        check_density("density", density)
        check_int("warmup_steps", warmup_steps, 0)
        if isinstance(ae_steps, bool) or not isinstance(ae_steps, int) or ae_steps < 1:
            raise ValueError(f"ae_steps must be an integer >= 1 (stage 2 is where the autoencoder "
                             f"gets its training data), got {ae_steps!r}")
        if innovation_density is not None:
            check_density("innovation_density", innovation_density)
            if innovation_density >= density:
                raise ValueError("innovation_density must be smaller than density")
        check_int("ae_updates", ae_updates, 1)
        check_int("replay", replay, 1)
        check_int("leader", leader, 0)
        check_int("code_channels", code_channels, 1)
        check_number("ae_lr", ae_lr, 0.0, inclusive=False)
        check_number("sim_weight", sim_weight, 0.0)
        method = LGC(mode, density, warmup_steps=warmup_steps, ae_steps=ae_steps,
                     innovation_density=innovation_density, leader=leader,
                     code_channels=code_channels, ae_lr=ae_lr, sim_weight=sim_weight,
                     ae_updates=ae_updates, replay=replay, seed=seed)
        super().__init__(model, method=method, density=density, min_numel=min_numel,
                         exclude=exclude, average=average, process_set=process_set,
                         nonfinite=nonfinite)
        rows = self.engine.table.compressed
        if not rows:
            raise ValueError("LGC: no tensor is large enough to compress (lower min_numel)")
        method.setup([e.layer.numel for e in rows])
        if mode == "ps":
            nodes = self._nodes()
            if nodes is not None and nodes < 2:
                raise ValueError("LGC-PS needs at least 2 ranks (a leader and side-information "
                                 f"nodes); this job has {nodes}")
        self.mode = mode

    def _nodes(self) -> int | None:
        """Ranks of the job: DDP's group where this is a DDP comm hook (or torch.distributed is
        up and Horovod is not), else Horovod's; None where neither is initialised."""
        if self._ddp is not None:
            return self._ddp.transport.size
        try:
            return self.horovod.network.size
        except Exception:      # noqa: BLE001 - Horovod not installed or not initialised
            pass
        try:                   # --backend ddp: a state loaded before the first hook call
            return self.ddp.transport.size
        except Exception:      # noqa: BLE001 - torch.distributed not initialised either
            return None

    # the signal's facts, for users and tests
    ks = property(lambda self: self.method.ks)
    K = property(lambda self: self.method.K)
    code_size = property(lambda self: self.method.code_size)
    k_inno = property(lambda self: self.method.k_inno)
    leader = property(lambda self: self.method.leader)
    _ae = property(lambda self: self.method.ae)

    def stage(self, step: int | None = None) -> int:
        return self.method.stage(step)

    def stats(self) -> dict:
        st = super().stats()
        m = self.method
        st["lgc"] = {"mode": self.mode, "stage": m.stage(), "K": m.K, "code_size": m.code_size,
                     "k_inno": m.k_inno, "ae_loss": list(m.ae_loss),
                     "bytes_per_step_by_stage": {s: (m.stage_bytes[s] / m.stage_steps[s]
                                                     if m.stage_steps[s] else None) for s in (1, 2, 3)}}
        return st

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["lgc"] = self.method.state_dict(self._nodes() or 1)
        return sd

    def load_state_dict(self, state: dict) -> None:
        lg = state.get("lgc") if isinstance(state, dict) else None
        self.method.check_state(lg, self._nodes() or 1)     # all of it before any part loads:
        super().load_state_dict(state)                      # a refused state changes nothing
        self.method.load_state_dict(lg, self._nodes() or 1)


# ----------------------------------------------------------------------------- GRACE's breadth
@register("powersgd")
class PowerSGDCompression(Compressor):
    """PowerSGD (Vogels et al. 2019): rank-``rank`` approximation P Q^T of each compressed tensor
    (reshaped to (shape[0], -1)) by one warm-started power-iteration step, two allreduces per
    step for all tensors together (every P, then every Q), error feedback. A matrix whose
    factors would not be smaller is sent exactly in the first allreduce; the first
    ``start_step`` steps send everything exactly. ``seed`` fixes the initial Q (the same on
    every rank). Bytes per tensor per step: ``4*r*(n + m)``. Use an ordinary momentum SGD.
    See :class:`hvd_rsgc.algorithms.powersgd.PowerSGD`."""

    def __init__(self, model, rank: int = 4, *, start_step: int = 0, error_feedback: bool = True,
                 seed: int = 0, min_numel: int = 1024, exclude=(), average: bool = True,
                 process_set=None, nonfinite: str = "raise"):
        method = PowerSGD(rank, start_step=start_step, seed=seed, error_feedback=error_feedback)
        super().__init__(model, method=method, density=1.0, min_numel=min_numel, exclude=exclude,
                         average=average, process_set=process_set, nonfinite=nonfinite)
        self.rank = rank

    def stats(self) -> dict:
        from .algorithms.powersgd import effective_rank, is_compressible, matrix_shape, wire_bytes
        st = super().stats()
        st["powersgd"] = {e.name: {"matrix": list(matrix_shape(e.param.shape)),
                                   "rank": effective_rank(e.param.shape, self.rank),
                                   "low_rank": is_compressible(e.param.shape, self.rank),
                                   "bytes": wire_bytes(e.param.shape, self.rank)}
                          for e in self.engine.table.compressed}
        return st


@register("signsgd")
class SignSGDCompression(Compressor):
    """signSGD with majority vote (Bernstein et al. 2018): every rank sends 1 bit per element
    (the sign of its gradient), the aggregate is the element-wise majority sign (a tie: 0).
    No error feedback, no scale: the optimizer's learning rate is the step size (use a small
    one, e.g. 1e-4 .. 1e-3). Bytes per tensor per rank: ``ceil(n/8)``."""

    def __init__(self, model, *, min_numel: int = 1024, exclude=(), average: bool = True,
                 process_set=None, nonfinite: str = "raise"):
        super().__init__(model, method=SignSGD(), density=1.0, min_numel=min_numel,
                         exclude=exclude, average=average, process_set=process_set,
                         nonfinite=nonfinite)


@register("efsignsgd")
class EFSignSGDCompression(Compressor):
    """EF-signSGD (Karimireddy et al. 2019): sends ``(||p||_1/n) * sign(p)`` of ``p = e + g``
    (one fp32 scale + 1 bit per element), keeps ``e = p - sent``; the aggregate is the ranks'
    average. Bytes per tensor per rank: ``4 + ceil(n/8)``. Use an ordinary (momentum) SGD."""

    def __init__(self, model, *, min_numel: int = 1024, exclude=(), average: bool = True,
                 process_set=None, nonfinite: str = "raise"):
        super().__init__(model, method=EFSignSGD(), density=1.0, min_numel=min_numel,
                         exclude=exclude, average=average, process_set=process_set,
                         nonfinite=nonfinite)


@register("terngrad")
class TernGradCompression(Compressor):
    """TernGrad (Wen et al. 2017): ``s * sign(g_i) * Bernoulli(|g_i|/s)`` with ``s = max|g|``,
    unbiased, 2 bits per element + one fp32 scale. ``clip_sigma`` (default off; the paper's
    2.5) clips at ``clip_sigma`` standard deviations first (lower variance, biased). Draws
    are seeded by (seed, rank, tensor, step). Bytes per tensor per rank: ``4 + ceil(n/4)``."""

    def __init__(self, model, *, clip_sigma: float | None = None, seed: int = 0,
                 min_numel: int = 1024, exclude=(), average: bool = True, process_set=None,
                 nonfinite: str = "raise"):
        super().__init__(model, method=TernGrad(seed=seed, clip_sigma=clip_sigma), density=1.0,
                         min_numel=min_numel, exclude=exclude, average=average,
                         process_set=process_set, nonfinite=nonfinite)


@register("natural")
class NaturalCompression(Compressor):
    """Natural compression (Horvath et al. 2019): every element rounded stochastically to a
    power of two (unbiased), sent as a sign bit + 7-bit exponent code per element (one byte)
    + one int32 exponent header per tensor. Bytes per tensor per rank: ``n + 4``."""

    def __init__(self, model, *, seed: int = 0, min_numel: int = 1024, exclude=(),
                 average: bool = True, process_set=None, nonfinite: str = "raise"):
        super().__init__(model, method=Natural(seed=seed), density=1.0, min_numel=min_numel,
                         exclude=exclude, average=average, process_set=process_set,
                         nonfinite=nonfinite)


@register("threshold")
class ThresholdCompression(Compressor):
    """Threshold sparsification: sends every element with ``|e + g| > threshold`` (absolute;
    the number sent varies per rank and step), error feedback keeps the rest. Bytes per
    tensor per rank: ``k*(bv + bi)`` (8k by default). Use an ordinary momentum SGD."""

    def __init__(self, model, threshold: float = 0.01, *, error_feedback: bool = True,
                 fp16_values: bool = False, int8_values: bool = False,
                 index_dtype=torch.int32, min_numel: int = 1024,
                 exclude=(), average: bool = True, process_set=None, nonfinite: str = "raise"):
        method = Threshold(ErrorFeedback() if error_feedback else NoMemory(), threshold,
                           value_dtype=_value_dtype(fp16_values, int8_values), index_dtype=index_dtype)
        super().__init__(model, method=method, density=1.0, min_numel=min_numel,
                         exclude=exclude, average=average, process_set=process_set,
                         nonfinite=nonfinite)
        self.threshold = method.threshold
