"""The base of every public compressor: an :class:`~hvd_rsgc.engine.Engine` plus the backend
bindings that use it. Backend-neutral: the Horovod binding (``hvd_rsgc/horovod/binding.py``)
is created on the first ``compress()``, the DDP comm hook (``hvd_rsgc/ddp/``) on the first
bucket, so constructing a compressor imports neither Horovod nor ``torch.distributed``.

    comp = RSDGCCompression(model, density=0.001)
    hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=comp)

Optimizer checks run at the first ``step()`` of any optimizer that holds the compressor's
parameters (a global ``torch.optim`` step pre-hook): the double-momentum mistake, parameters
the compressor does not own, and the backend's own checks (Adasum, op, process set).
"""
from __future__ import annotations

import functools
import inspect
import warnings
import weakref

import numpy
import torch.optim.optimizer as _optim_module

from .algorithms.base import SparseMethod
from .algorithms.collective import SparseCollective
from .engine import Engine

# One global torch.optim step pre-hook for all compressors, registered once. Compressors are
# held weakly; a compressor collected by the GC drops out of the set (removing a hook from
# inside torch's hook iteration would mutate the dict it is iterating).
_LIVE: "weakref.WeakSet[Compressor]" = weakref.WeakSet()
_HOOK = None


def _register(comp) -> None:
    global _HOOK
    _LIVE.add(comp)
    if _HOOK is None:
        _HOOK = _optim_module.register_optimizer_step_pre_hook(_pre_step_all)


def _pre_step_all(opt, args, kwargs):
    for comp in list(_LIVE):
        comp._pre_step(opt)
    return None


def _check_bools(init):
    """Wrap a compressor's ``__init__``: every argument its signature annotates ``bool`` must be
    True or False, else a ValueError naming it ("no", 0, None are refused: a truthy string
    used to switch an option on)."""
    sig = inspect.signature(init)
    flags = [n for n, p in sig.parameters.items() if p.annotation in (bool, "bool")]
    if not flags:
        return init

    @functools.wraps(init)
    def checked(self, *args, **kwargs):
        bound = sig.bind_partial(self, *args, **kwargs)
        for name in flags:
            v = bound.arguments.get(name, True)
            if not isinstance(v, (bool, numpy.bool_)):      # numpy's bool (from arrays) too
                raise ValueError(f"{type(self).__name__}: {name} must be True or False, "
                                 f"got {bound.arguments[name]!r}")
        return init(self, *args, **kwargs)
    return checked


class Compressor:
    """Base class. Subclasses build an ``algorithms`` method and pass the engine options.

    Args:
        model: an ``nn.Module`` or an iterable of ``(name, parameter)``.
        method: the ``algorithms`` method (``None``: every tensor dense).
        average: ``True`` for averaging (``op=hvd.Average``), ``False`` for summing.
        process_set: the Horovod process set the optimizer uses, if not the global one; as a
            DDP comm hook, the ``torch.distributed`` process group DDP uses
            (``DistributedDataParallel(..., process_group=G)``), if not the default group.
        communicator: sparse methods: ``"allgather"`` (default), ``"reduce_scatter"`` (flat
            per-rank volume in P, Ok-Topk style) or ``"auto"``; ``reselect``: the owners'
            budget factor. See :class:`hvd_rsgc.algorithms.collective.SparseCollective`.
        fused: sparse methods (default True for rsdgc, dgc, topk): encode the tensors of a
            bucket (``bucket_mb`` of gradient, in backward order; DDP: DDP's own buckets) into
            one message and one collective (``algorithms/bucket.py``); each tensor keeps its k.
        **engine_options: see :class:`hvd_rsgc.engine.Engine`.
    """

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "__init__" in cls.__dict__:          # every compressor's boolean options checked
            cls.__init__ = _check_bools(cls.__dict__["__init__"])

    def __init__(self, model, *, method, average: bool = True, process_set=None,
                 communicator: str = "allgather", reselect: float | None = 1.0,
                 fused: bool = False, bucket_mb: float = 25.0, **engine_options):
        self.engine = Engine(model, method, owner=type(self).__name__, **engine_options)
        self.collective = SparseCollective(communicator, reselect)
        if communicator != "allgather" and not isinstance(method, SparseMethod):
            raise ValueError(f"communicator={communicator!r}: {type(self).__name__} sends no "
                             "(index, value) pieces; the reduce-scatter is for the sparse "
                             "methods (rsdgc, dgc, topk)")
        if not isinstance(fused, bool):
            raise ValueError(f"fused must be True or False, got {fused!r}")
        if fused and not isinstance(method, SparseMethod):
            raise ValueError(f"fused=True: {type(self).__name__} has no bucketed path; it is for "
                             "the sparse methods (rsdgc, dgc, topk)")
        if isinstance(bucket_mb, bool) or not isinstance(bucket_mb, (int, float)) \
                or not 0 < bucket_mb < float("inf"):
            raise ValueError(f"bucket_mb must be a finite number > 0, got {bucket_mb!r}")
        if not isinstance(average, bool):               # "no" was truthy: averaged
            raise ValueError(f"average must be True or False, got {average!r}")
        self.fused = fused
        self.bucket_bytes = int(bucket_mb * 2 ** 20)
        self.method = method
        self.average = bool(average)
        self.process_set = process_set
        self._horovod = None
        self._ddp = None
        self._checked_optimizers = weakref.WeakSet()
        _register(self)

    # -- public ---------------------------------------------------------------------------
    @property
    def momentum(self) -> float:
        return self.engine.momentum

    @property
    def density(self) -> float:
        return self.engine.schedule.density

    @property
    def momentum_correction(self) -> bool:
        """True when the compressor puts momentum into what it sends (use ``DGCSGD``)."""
        return self.method is not None and self.method.momentum_correction and self.momentum > 0

    @property
    def compressed_names(self) -> list[str]:
        return self.engine.compressed_names

    @property
    def step_nonfinite(self) -> bool:
        """With ``nonfinite="skip"``: the last step saw a non-finite gradient on some rank
        (every rank agrees); skip the optimizer step."""
        return self.engine.step_nonfinite

    def set_grad_scaler(self, scaler) -> None:
        """Mixed precision with a loss scaler (``torch.amp.GradScaler``): the residuals and
        momentum buffers follow its scale, so what they carry from earlier steps keeps its
        weight when the scale changes (without this an overflow, which halves the scale, would
        double the weight of everything accumulated before it). Needs ``nonfinite="skip"``: an
        overflow step gives every rank NaN for the tensors concerned, the scaler skips the
        step and backs off, and what this rank sent in that step returns to its residuals.
        ``None`` detaches (the buffers go back to unscaled units at the next step)."""
        self.engine.set_grad_scaler(scaler)

    def set_epoch(self, epoch: int) -> None:
        """Drive the warm-up schedule by epoch (overrides ``steps_per_epoch`` counting)."""
        self.engine.set_epoch(epoch)

    def stats(self) -> dict:
        """Bytes submitted to collectives by this rank (last step, total), the dense fp32
        equivalent and ratio, per-layer density/units, compressor memory, skipped steps."""
        out = self.engine.stats()
        if self.collective.last:
            out["collective"] = dict(self.collective.last)
        return out

    def state_dict(self) -> dict:
        """Residuals, momentum buffers, step counters, densities and RNG state of *this rank*
        (each rank has its own residual: checkpoint every rank's)."""
        return self.engine.state_dict(type(self).__name__)

    def load_state_dict(self, state: dict) -> None:
        """Load a :meth:`state_dict`. Loading between steps (not while a step's gradients are in
        flight) also drops the bindings' per-step state: the loaded step counters may repeat
        one a bucket last saw."""
        self.engine.load_state_dict(state, type(self).__name__)
        if self._horovod is not None:
            self._horovod.new_state()

    # -- Horovod's compression interface (hvd.DistributedOptimizer(compression=self)) -------
    @property
    def horovod(self):
        if self._horovod is None:
            from .horovod.binding import HorovodBinding
            self._horovod = HorovodBinding(self)
        return self._horovod

    def synchronize(self, opt) -> None:
        """Finish this step's compression before ``opt.step()``: Horovod's
        ``opt.synchronize()``, or at ``-np 1`` the local pass. Then ``step_nonfinite`` tells
        whether to skip the step (``nonfinite="skip"``); step with
        ``with opt.skip_synchronize(): opt.step()``."""
        self.horovod.synchronize(opt)

    # -- PyTorch DDP (ddp.register_comm_hook(state=self, hook=hvd_rsgc.ddp_comm_hook)) ---------
    @property
    def ddp(self):
        if self._ddp is None:
            from .ddp.hook import DDPBinding
            self._ddp = DDPBinding(self, self.process_set)
        return self._ddp

    def compress(self, tensor):
        return self.horovod.compress(tensor)

    def decompress(self, tensor, ctx):
        return self.horovod.decompress(tensor, ctx)

    # -- optimizer checks -----------------------------------------------------------------
    def _pre_step(self, opt) -> None:
        owned = getattr(opt, "_compression", None) is self        # a Horovod optimizer of ours
        table = self.engine.table
        params = [p for g in opt.param_groups for p in g["params"]]
        if not owned and not any(table.owns(p) for p in params):
            return
        if opt not in self._checked_optimizers:
            if owned:
                foreign = [tuple(p.shape) for p in params if p.requires_grad and not table.owns(p)]
                if foreign:
                    raise ValueError(
                        f"the optimizer holds {len(foreign)} parameter(s) (shapes {foreign[:4]}) "
                        f"that the model passed to {type(self).__name__}(model, ...) does not own: "
                        "pass the same model / named_parameters to both")
            self.check_optimizer(opt)
            self._checked_optimizers.add(opt)
        if owned:
            self.horovod.pre_step(opt)
        if self._ddp is not None:
            self._ddp.pre_step()

    def check_optimizer(self, opt) -> None:
        """Refuse configurations that silently train wrong. Called automatically at the first
        ``step()`` of any optimizer holding our parameters; may be called by hand."""
        from .optim import DGCSGD
        if getattr(opt, "op", None) is not None or hasattr(opt, "_compression"):
            self.horovod.check_optimizer(opt)
        mc = self.momentum_correction
        table = self.engine.table
        for group in opt.param_groups:
            if not any(table.owns(p) for p in group["params"]):
                continue
            m = group.get("momentum", 0.0) or 0.0
            if mc and not isinstance(opt, DGCSGD) and m > 0:
                raise ValueError(
                    f"double momentum: {type(self).__name__}(momentum={self.momentum}) already puts "
                    f"momentum into the gradient it sends, but the optimizer applies momentum={m} "
                    "again. Use hvd_rsgc.DGCSGD (momentum only on weight decay) or momentum=0 in "
                    "the optimizer.")
            if mc and not isinstance(opt, DGCSGD) and "betas" in group:
                warnings.warn(f"{type(self).__name__} applies momentum correction; combining it with "
                              f"{type(opt).__name__} (adaptive moments) is untested", stacklevel=3)
            if isinstance(opt, DGCSGD) and m > 0 and not mc:
                raise ValueError(
                    f"DGCSGD applies momentum only to weight decay and expects the compressor to do "
                    f"momentum correction, but {type(self).__name__} does not (momentum=0 or a "
                    "method without it): use torch.optim.SGD(momentum=...) instead")
