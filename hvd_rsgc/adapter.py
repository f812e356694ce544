"""The one module that knows Horovod: runs any ``algorithms`` method inside a stock, unpatched
``hvd.DistributedOptimizer`` (Horovod 0.28.1).

How the sparse path fits the stock optimizer (see ../shared/HOROVOD_NOTES.md):

* ``compress(p.grad)`` is called from the backward hook, without a name. We find the parameter
  whose ``.grad`` *is* that tensor (a cursor walks the registered parameters in backward order,
  so the lookup is O(1) amortised and survives ``zero_grad(set_to_none=True)``).
* For a sparsified tensor, ``compress`` encodes it and starts our own
  ``allgather_async(message, name="hvd_rsgc.<param name>")`` — a stable name derived from the
  parameter name, so ranks pair up whatever order hooks fire in. It returns to Horovod a fresh
  1-element placeholder, which Horovod allreduces in place under the parameter's name. The
  placeholder carries a health flag: 1 if this rank's gradient was not finite.
* ``decompress(placeholder, ctx)`` waits for the allgather, decodes the ranks' messages into
  one dense sum, divides by the process-set size for ``op=Average`` and returns a fresh tensor,
  which Horovod ``set_``s into ``p.grad``.
* Random-k shares its indices through a seed, so its k values go through the stock allreduce
  itself (Horovod averages them). Small and 1-D tensors go through the stock dense allreduce.

Bytes submitted to collectives per rank are counted here (``stats()``); the tests count them
independently by intercepting Horovod's C collective entry points.

Non-finite gradients: the gradient is checked before it touches the residual; a non-finite one
is never accumulated, the rank sends an empty message and raises the flag, and *every* rank
raises ``FloatingPointError`` naming the parameter in ``decompress`` (after this tensor's
collectives completed, so nothing hangs).

At ``-np 1`` Horovod registers no gradient hooks, so ``compress`` would never run and
momentum correction would silently vanish. A global ``torch.optim`` step pre-hook runs the
method locally instead (no collectives) so a one-process run trains the same algorithm. The
same pre-hook refuses the double-momentum mistake, Adasum and op/process-set mismatches.
"""
from __future__ import annotations

import fnmatch
import math
import warnings
import weakref
from typing import Iterable

import torch
import torch.optim.optimizer as _optim_module

from .algorithms.base import LayerState
from .algorithms.density import DGC_WARMUP, dynamic_densities, warmup_density
from .algorithms.memory import DenseMomentum, clip_local

_FLAG_OK, _FLAG_NONFINITE = 0.0, 1.0
STATE_FORMAT = "hvd_rsgc.compression/1"


def _hvd():
    import horovod.torch as hvd
    return hvd


def named_parameters_of(model_or_params) -> list[tuple[str, torch.nn.Parameter]]:
    """Accept an ``nn.Module`` or an iterable of ``(name, parameter)``."""
    if isinstance(model_or_params, torch.nn.Module):
        items = list(model_or_params.named_parameters())
    else:
        try:
            items = list(model_or_params)
        except TypeError:
            raise TypeError("model must be an nn.Module or an iterable of (name, parameter), "
                            f"got {type(model_or_params).__name__}") from None
        for it in items:
            if not (isinstance(it, tuple) and len(it) == 2 and isinstance(it[0], str)
                    and isinstance(it[1], torch.Tensor)):
                raise TypeError("model must be an nn.Module or an iterable of (name, parameter) "
                                f"tuples; got an element {it!r:.80}")
    names = [n for n, _ in items]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"model: duplicate parameter names {sorted(dup)}")
    if not items:
        raise ValueError("model has no parameters")
    return items


def _check_density(name, value, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not (0.0 <= value <= 1.0 if allow_zero else 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in {'[0' if allow_zero else '(0'}, 1], got {value!r}")


# One global torch.optim step pre-hook for all compressors, registered once. Compressors are
# held weakly; a compressor collected by the GC simply drops out of the set (removing a hook
# from inside torch's hook iteration would mutate the dict it is iterating).
_LIVE: "weakref.WeakSet[HorovodCompression]" = weakref.WeakSet()
_HOOK = None


def _register(comp):
    global _HOOK
    _LIVE.add(comp)
    if _HOOK is None:
        _HOOK = _optim_module.register_optimizer_step_pre_hook(_pre_step_all)


def _pre_step_all(opt, args, kwargs):
    for comp in list(_LIVE):
        comp._pre_step(opt)
    return None


class _Ctx(dict):
    """Per-call context handed from compress() to decompress()."""


class HorovodCompression:
    """Base adapter. Subclasses build ``self.method`` and call ``_setup``."""

    def __init__(self, model, *, method, density: float, dynamic: bool = False,
                 update_every: int = 100, density_floor: float = 0.1,
                 warmup_epochs: int = 0, warmup_densities=DGC_WARMUP,
                 steps_per_epoch: int | None = None, momentum: float = 0.0,
                 nesterov: bool = False, clip_norm: float | None = None,
                 min_numel: int = 1024, exclude: Iterable[str] = (),
                 compress_all: bool = False, dense_dtype: torch.dtype | None = None,
                 average: bool = True, process_set=None):
        _check_density("density", density)
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an integer >= 1, got {update_every!r}")
        _check_density("density_floor", density_floor, allow_zero=True)
        if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        if warmup_epochs and steps_per_epoch is None:
            raise ValueError("warmup_epochs > 0 needs steps_per_epoch= (or call set_epoch(); "
                             "pass steps_per_epoch=0 to rely on set_epoch() alone)")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 0):
            raise ValueError(f"steps_per_epoch must be an integer >= 0, got {steps_per_epoch!r}")
        for d in list(warmup_densities)[:warmup_epochs]:
            _check_density("warmup_densities[...]", d)
        if clip_norm is not None and not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm!r}")
        if not isinstance(min_numel, int) or min_numel < 0:
            raise ValueError(f"min_numel must be an integer >= 0, got {min_numel!r}")
        if isinstance(exclude, str):
            exclude = (exclude,)
        self.method = method
        self.density = float(density)
        self.dynamic = bool(dynamic)
        self.update_every = update_every
        self.density_floor = float(density_floor)
        self.warmup = tuple(warmup_densities)[:warmup_epochs]
        self.steps_per_epoch = steps_per_epoch
        self.momentum = float(momentum)
        self.nesterov = nesterov
        self.clip_norm = clip_norm
        self.min_numel = min_numel
        self.exclude = tuple(exclude)
        self.dense_dtype = dense_dtype
        self.average = average
        self._process_set = process_set
        self._epoch: int | None = None
        self._dense_momentum = DenseMomentum(self.momentum, nesterov) \
            if method is not None and method.momentum_correction and self.momentum > 0 else None

        self._params = named_parameters_of(model)
        self._layers: list[LayerState] = []
        self._layer_of: dict[int, LayerState] = {}
        self._param_of: dict[int, torch.nn.Parameter] = {}
        self._sparse: dict[int, bool] = {}
        for i, (name, p) in enumerate(self._params):
            sparse = method is not None and self._eligible(name, p, compress_all)
            layout = method.make_layout(p.shape) if sparse else None
            st = LayerState(name=name, index=i, shape=p.shape, dtype=p.dtype, layout=layout)
            self._layers.append(st)
            self._layer_of[id(p)] = st
            self._param_of[id(p)] = p
            self._sparse[id(p)] = sparse
        self._order = [p for _, p in self._params][::-1]   # backward visits late layers first
        self._cursor = 0
        self._density_key = None
        self._totals = {"bytes": 0, "dense_bytes": 0, "steps": 0}
        self._last_step = {}
        self._cur_step = 0
        self._checked_optimizers = weakref.WeakSet()
        self._local_mode = False
        self._local_done: dict[int, tuple[int, int]] = {}
        _register(self)

    def _eligible(self, name: str, p: torch.Tensor, compress_all: bool = False) -> bool:
        """Whether a parameter is compressed: trainable float, dim > 1 with at least
        ``min_numel`` elements (or any size with ``compress_all``), not in ``exclude``."""
        return (p.requires_grad and p.is_floating_point()
                and (compress_all or (p.dim() > 1 and p.numel() >= self.min_numel))
                and not any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude))

    # ------------------------------------------------------------------ public API
    def set_epoch(self, epoch: int) -> None:
        """Drive the warm-up schedule by epoch (overrides ``steps_per_epoch`` counting)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self._epoch = epoch

    @property
    def compressed_names(self) -> list[str]:
        return [st.name for (n, p), st in zip(self._params, self._layers) if self._sparse[id(p)]]

    def stats(self) -> dict:
        """Bytes submitted to Horovod collectives by this rank: for the last step and in total,
        the dense fp32-equivalent, the ratio, and per layer the density/units actually used."""
        last = dict(self._last_step)
        layers = {}
        for (name, p), st in zip(self._params, self._layers):
            rec = last.get(name)
            layers[name] = {
                "compressed": self._sparse[id(p)],
                "density": st.density if self._sparse[id(p)] else 1.0,
                "units": st.k if self._sparse[id(p)] else None,
                "unit_size": st.layout.unit_size if self._sparse[id(p)] else None,
                "sent_fraction": (rec["sent_units"] / st.layout.num_units
                                  if rec and rec.get("sent_units") is not None and self._sparse[id(p)]
                                  else (1.0 if rec else None)),
                "bytes": rec["bytes"] if rec else 0,
                "dense_bytes": rec["dense_bytes"] if rec else 0,
            }
        step_bytes = sum(r["bytes"] for r in last.values())
        step_dense = sum(r["dense_bytes"] for r in last.values())
        t = self._totals
        return {
            "steps": t["steps"],
            "step_bytes": step_bytes,
            "step_dense_bytes": step_dense,
            "step_ratio": step_dense / step_bytes if step_bytes else None,
            "total_bytes": t["bytes"],
            "total_dense_bytes": t["dense_bytes"],
            "compression_ratio": t["dense_bytes"] / t["bytes"] if t["bytes"] else None,
            "layers": layers,
        }

    def state_dict(self) -> dict:
        """Residuals, momentum buffers, step counters and densities of *this rank* (each rank
        has its own residual: checkpoint every rank's, or gather them)."""
        layers = {}
        for st in self._layers:
            layers[st.name] = {
                "step": st.step, "density": st.density, "k": st.k,
                "memory": {k: v.detach().clone() for k, v in st.memory.items()},
            }
        return {"format": STATE_FORMAT, "method": type(self).__name__, "epoch": self._epoch,
                "density_key": list(self._density_key) if self._density_key else None,
                "totals": dict(self._totals), "layers": layers,
                "rng": self.method.rng_state() if self.method is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a hvd_rsgc compression state (format {state.get('format') if isinstance(state, dict) else type(state).__name__!r}, expected {STATE_FORMAT!r})")
        if state.get("method") != type(self).__name__:
            raise ValueError(f"state was saved by {state.get('method')}, cannot load into {type(self).__name__}")
        saved = state["layers"]
        mine = {st.name for st in self._layers}
        if set(saved) != mine:
            missing, extra = sorted(mine - set(saved)), sorted(set(saved) - mine)
            raise ValueError(f"compression state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for st in self._layers:
            rec = saved[st.name]
            p = self._params[st.index][1]
            for key, val in rec["memory"].items():
                want = st.memory.get(key)
                if want is not None and want.shape != val.shape:
                    raise ValueError(f"compression state for parameter '{st.name}': buffer '{key}' "
                                     f"has shape {tuple(val.shape)}, expected {tuple(want.shape)}")
            st.memory = {k: v.to(p.device).clone() for k, v in rec["memory"].items()}
            st.memory_ready = bool(st.memory) or st.memory_ready
            st.step, st.density, st.k = int(rec["step"]), float(rec["density"]), int(rec["k"])
            if st.layout is not None and st.k:
                self.method.on_density(st)
        if self.method is not None and state.get("rng"):
            self.method.load_rng_state(state["rng"])
        self._epoch = state.get("epoch")
        dk = state.get("density_key")
        self._density_key = tuple(dk) if dk else None
        self._totals = dict(state.get("totals", self._totals))
        self._cur_step = max((st.step for st in self._layers), default=0)

    # ------------------------------------------------------------------ Horovod interface
    def compress(self, tensor: torch.Tensor):
        p, st = self._find(tensor)
        if tensor.is_sparse:
            raise TypeError(f"parameter '{st.name}': torch.sparse gradients are not supported")
        ctx = _Ctx(name=st.name, pid=id(p), dtype=tensor.dtype)
        if not self._sparse[id(p)]:
            return self._compress_dense(tensor, st, ctx)
        if tensor.numel() == 0:
            raise ValueError(f"parameter '{st.name}': empty gradient")
        device = tensor.device
        if not st.memory_ready:
            self.method.init_memory(st, device)
            st.memory_ready = True
        self._update_density(st)
        st.step += 1
        finite = bool(torch.isfinite(tensor.sum()))
        if finite:
            g = clip_local(tensor, self.clip_norm, self._size()) if self.clip_norm else tensor
            msg = self.method.encode(st, g, ctx)
        else:
            msg = self.method.empty_message(st, device)
            if self.method.communicator == "allreduce":
                msg.fill_(float("nan"))       # poisons the allreduce on every rank -> all raise
            ctx["sent_units"] = 0
        if self.method.communicator == "allreduce":      # values through the stock allreduce
            ctx["kind"], ctx["bytes"] = "reduce", msg.numel() * msg.element_size()
            self._record(st, ctx, tensor)
            return msg, ctx
        flag = torch.full((1,), _FLAG_OK if finite else _FLAG_NONFINITE, dtype=tensor.dtype, device=device)
        ctx["kind"] = "gather"
        ctx["bytes"] = msg.numel() * msg.element_size() + flag.numel() * flag.element_size()
        if self._local_mode:
            ctx["gathered"] = msg
        else:
            hvd = _hvd()
            ctx["handle"] = hvd.allgather_async(msg, name=f"hvd_rsgc.{st.name}",
                                                process_set=self._pset())
        self._record(st, ctx, tensor)
        return flag, ctx

    def decompress(self, tensor: torch.Tensor, ctx):
        st = self._layer_of[ctx["pid"]]
        kind = ctx["kind"]
        if kind == "dense":
            out = tensor
            if not bool(torch.isfinite(out.sum())):
                raise FloatingPointError(
                    f"non-finite gradient for parameter '{st.name}' on at least one rank "
                    f"(step {st.step}); compressor state was not updated with it")
            if self._dense_momentum is not None:
                out = self._dense_momentum.apply(st.memory, out.float())
            return out.to(ctx["dtype"]) if out.dtype != ctx["dtype"] else out
        if kind == "reduce":
            if not bool(torch.isfinite(tensor.sum())):
                raise FloatingPointError(
                    f"non-finite gradient for parameter '{st.name}' on at least one rank (step {st.step})")
            dense = self.method.decode(st, tensor, self._size(), ctx)
            return dense.to(ctx["dtype"])
        # gather
        if self._local_mode:
            gathered, n = ctx["gathered"], 1
        else:
            gathered, n = _hvd().synchronize(ctx["handle"]), self._size()
        if float(tensor.reshape(-1)[0]) != _FLAG_OK:
            raise FloatingPointError(
                f"non-finite gradient for parameter '{st.name}' on at least one rank "
                f"(step {st.step}); it was not accumulated into the residual")
        dense = self.method.decode(st, gathered, n, ctx)
        if self.average and n > 1:
            dense.div_(n)
        return dense.to(ctx["dtype"])

    # ------------------------------------------------------------------ internals
    def _size(self) -> int:
        if self._local_mode:
            return 1
        return self._pset().size()

    def _pset(self):
        if self._process_set is not None:
            return self._process_set
        return _hvd().global_process_set

    def _compress_dense(self, tensor, st, ctx):
        if tensor.dtype.is_floating_point and self.dense_dtype is not None and tensor.dtype != self.dense_dtype:
            out = tensor.to(self.dense_dtype)
        else:
            out = tensor
        ctx["kind"] = "dense"
        ctx["bytes"] = out.numel() * out.element_size()
        st.step += 1
        self._record(st, ctx, tensor)
        return out, ctx

    def _record(self, st, ctx, tensor):
        dense = tensor.numel() * 4
        if st.step > self._cur_step:          # first tensor of a new step
            self._cur_step = st.step
            self._totals["steps"] += 1
            self._last_step = {}
        self._last_step[st.name] = {"step": st.step, "bytes": ctx["bytes"], "dense_bytes": dense,
                                    "sent_units": ctx.get("sent_units")}
        self._totals["bytes"] += ctx["bytes"]
        self._totals["dense_bytes"] += dense

    def _find(self, tensor):
        """The registered parameter whose .grad is ``tensor`` (cursor walk, backward order)."""
        order = self._order
        n = len(order)
        for off in range(n):
            i = (self._cursor + off) % n
            p = order[i]
            if p.grad is tensor:
                self._cursor = (i + 1) % n
                return p, self._layer_of[id(p)]
        for p in order:
            if p is tensor or p.data is tensor:
                raise ValueError(
                    f"compress() got the parameter '{self._layer_of[id(p)].name}' itself, not its "
                    "gradient: this happens with op=hvd.Adasum, which compresses parameter deltas; "
                    "sparsifying compressors do not support Adasum (use op=hvd.Average)")
        raise ValueError(
            f"compress() got a gradient (shape {tuple(tensor.shape)}) that belongs to no parameter "
            f"passed to {type(self).__name__}(model, ...): pass the same model / named_parameters "
            "to the compressor as to hvd.DistributedOptimizer")

    def _base_density(self, st) -> float:
        if not self.warmup:
            return self.density
        epoch = self._epoch
        if epoch is None:
            epoch = st.step // self.steps_per_epoch if self.steps_per_epoch else 0
        return warmup_density(epoch, self.density, self.warmup)

    def _update_density(self, st):
        base = self._base_density(st)
        key = (base, st.step // self.update_every if self.dynamic else 0)
        if key == self._density_key and st.k:
            return
        if key != self._density_key:
            self._density_key = key
            sparse = [(p, s) for (n, p), s in zip(self._params, self._layers) if self._sparse[id(p)]]
            if self.dynamic:
                dens = dynamic_densities([p for p, _ in sparse], base, self.density_floor)
            else:
                dens = [base] * len(sparse)
            for (_, s), d in zip(sparse, dens):
                s.density = d
                s.k = self.method.units_for(s, d)
                self.method.on_density(s)

    # ------------------------------------------------------------------ optimizer checks
    def _pre_step(self, opt):
        owned = getattr(opt, "_compression", None) is self
        params = [p for g in opt.param_groups for p in g["params"]]
        if not owned and not any(id(p) in self._param_of for p in params):
            return
        if opt not in self._checked_optimizers:
            if owned:
                foreign = [tuple(p.shape) for p in params
                           if p.requires_grad and id(p) not in self._param_of]
                if foreign:
                    raise ValueError(
                        f"the optimizer holds {len(foreign)} parameter(s) (shapes {foreign[:4]}) "
                        f"that the model passed to {type(self).__name__}(model, ...) does not own: "
                        "pass the same model / named_parameters to both")
            self.check_optimizer(opt)
            self._checked_optimizers.add(opt)
        if owned and not getattr(opt, "_requires_update", None) and self._hooks_absent():
            self._run_local(opt)

    def _hooks_absent(self) -> bool:
        """Horovod registers no hooks at size 1 (non-elastic): the compressor never runs."""
        try:
            return _hvd().size() == 1
        except Exception:
            return False

    def check_optimizer(self, opt) -> None:
        """Refuse configurations that silently train wrong. Called automatically at the first
        ``step()`` of any optimizer holding our parameters; may be called by hand."""
        from .optim import DGCSGD
        hvd_op = getattr(opt, "op", None)
        if hvd_op is not None:
            hvd = _hvd()
            if hvd_op == hvd.Adasum:
                raise ValueError(f"{type(self).__name__} does not support op=hvd.Adasum "
                                 "(Adasum compresses parameter deltas); use op=hvd.Average")
            if hvd_op == hvd.Sum and self.average:
                raise ValueError(f"optimizer uses op=hvd.Sum but {type(self).__name__}(average=True); "
                                 "pass average=False")
            if hvd_op == hvd.Average and not self.average:
                raise ValueError(f"optimizer uses op=hvd.Average but {type(self).__name__}(average=False)")
            ps = getattr(opt, "process_set", None)
            if ps is not None and self._process_set is not None and ps is not self._process_set:
                raise ValueError("optimizer and compressor use different process_set")
        mc = self.method is not None and self.method.momentum_correction and self.momentum > 0
        for group in opt.param_groups:
            if not any(id(p) in self._param_of for p in group["params"]):
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

    def _run_local(self, opt):
        """-np 1: run each gradient through compress/decompress with no collective."""
        # Horovod's step() calls the base class's step(), which fires the pre-hook again: a
        # gradient already processed (same tensor, same version) is not processed twice.
        # Same order as Horovod's synchronize(): every compress() first, then every decompress().
        self._local_mode = True
        try:
            pending = []
            for p in self._order:
                if id(p) not in self._param_of or p.grad is None or not p.requires_grad:
                    continue
                if self._local_done.get(id(p)) == (id(p.grad), p.grad._version):
                    continue
                pending.append((p, *self.compress(p.grad)))
            for p, out, ctx in pending:
                p.grad.set_(self.decompress(out, ctx))
                self._local_done[id(p)] = (id(p.grad), p.grad._version)
        finally:
            self._local_mode = False
