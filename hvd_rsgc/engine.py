"""The backend-neutral compression engine: everything a compressor keeps and decides that does
not depend on how bytes travel. No Horovod, no ``torch.distributed``, no MPI.

Roles, one class each (a backend binding -- ``hvd_rsgc/horovod/``, ``hvd_rsgc/ddp/`` -- moves
messages through a :class:`~hvd_rsgc.transport.Transport` and asks the engine the rest):

* :class:`ParamTable` -- one row per parameter (name, parameter, the method's
  :class:`~hvd_rsgc.algorithms.base.LayerState`, compressed or dense), and the lookup from a
  gradient tensor back to its row (Horovod calls ``compress(p.grad)`` without a name).
* :class:`DensitySchedule` -- DGC warm-up densities, RS-DGC's dynamic per-layer densities
  (eq. 3-5), the update period and the starvation floor.
* :class:`ByteMeter` -- bytes this rank submitted to collectives, per tensor and step and in
  total, with the dense fp32 equivalent. Transports count into it.
* :class:`Engine` -- ties them to a method: memory initialisation, clipping, the non-finite
  policy, encode/decode, dense-tensor momentum, ``stats()``, ``state_dict()``.
"""
from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass
from collections.abc import Iterable

import torch

from .algorithms.base import LayerState
from .algorithms.density import DGC_WARMUP, dynamic_densities, ramp_density, warmup_density
from .algorithms.memory import DenseMomentum, all_finite, clip_local

STATE_FORMAT = "hvd_rsgc.compression/2"
# format 1 kept tile residuals (RS-DGC's 1x1 convolutions, linear layers) as the (U, S) unit
# matrix; format 2 keeps them as the padded matrix (layout.py). Loading 1 converts them.
LEGACY_STATE_FORMATS = ("hvd_rsgc.compression/1",)
NONFINITE_POLICIES = ("raise", "skip")
# the non-finite error's tail for a tensor of a multi-round (LGC) step that did not run
ROUNDS_SKIPPED = ("; the step's rounds did not run: some rank's gradient of this or another "
                  "parameter was not finite")


# ----------------------------------------------------------------------------- validation
def check_density(name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not (0.0 <= value <= 1.0 if allow_zero else 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in {'[0' if allow_zero else '(0'}, 1], got {value!r}")


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_number(name: str, value, minimum: float, inclusive: bool = True) -> None:
    """A finite real number >= ``minimum`` (> with ``inclusive=False``), or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (value < minimum if inclusive else value <= minimum):
        raise ValueError(f"{name} must be a finite number {'>=' if inclusive else '>'} {minimum}, "
                         f"got {value!r}")


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


def sparse_gradient_modules(model) -> list[str]:
    """Names of parameters that produce ``torch.sparse`` gradients (``nn.Embedding`` /
    ``nn.EmbeddingBag`` with ``sparse=True``)."""
    if not isinstance(model, torch.nn.Module):
        return []
    out = []
    for mname, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and mod.sparse:
            out.append(f"{mname}.weight" if mname else "weight")
    return out


# ----------------------------------------------------------------------------- table
@dataclass
class Entry:
    """One parameter: its name, the tensor, the method's per-tensor state, compressed or not."""

    name: str
    param: torch.nn.Parameter
    layer: LayerState
    sparse: bool


class ParamTable:
    """Rows in the model's parameter order; lookup by parameter identity or by gradient."""

    def __init__(self, items: list[tuple[str, torch.nn.Parameter]], eligible, make_layout):
        self.entries: list[Entry] = []
        self._by_id: dict[int, Entry] = {}
        for i, (name, p) in enumerate(items):
            sparse = bool(eligible(name, p))
            layout = make_layout(p.shape) if sparse else None
            e = Entry(name, p, LayerState(name=name, index=i, shape=p.shape, dtype=p.dtype,
                                          layout=layout), sparse)
            self.entries.append(e)
            self._by_id[id(p)] = e
        self._order = [e for e in self.entries][::-1]     # backward visits late layers first
        self._cursor = 0

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    @property
    def compressed(self) -> list[Entry]:
        return [e for e in self.entries if e.sparse]

    def owns(self, p) -> bool:
        return id(p) in self._by_id

    def of(self, p) -> Entry:
        return self._by_id[id(p)]

    def backward_order(self) -> list[Entry]:
        return self._order

    def find_grad(self, tensor: torch.Tensor, owner: str) -> Entry:
        """The row whose parameter's ``.grad`` *is* ``tensor`` (cursor walk in backward order:
        O(1) amortised, survives ``zero_grad(set_to_none=True)``)."""
        order, n = self._order, len(self._order)
        for off in range(n):
            i = (self._cursor + off) % n
            e = order[i]
            if e.param.grad is tensor:
                self._cursor = (i + 1) % n
                return e
        # hvd.DistributedOptimizer(sparse_as_dense=True) compresses p.grad.to_dense(), a new
        # tensor: the parameter whose torch.sparse gradient it is (same shape; by value where
        # several sparse gradients share the shape)
        sparse = [e for e in order if e.param.grad is not None and e.param.grad.is_sparse
                  and e.param.grad.shape == tensor.shape and not tensor.is_sparse]
        if len(sparse) > 1:
            same = [e for e in sparse if torch.equal(e.param.grad.to_dense(), tensor)] or sparse
            # equal values (two unused embeddings: zeros): the one not yet begun this step
            # (begin() advances a layer's step), so no entry is claimed twice
            low = min(e.layer.step for e in same)
            sparse = [e for e in same if e.layer.step == low]
        if sparse:
            return sparse[0]
        for e in order:
            if e.param is tensor or e.param.data is tensor:
                raise ValueError(
                    f"compress() got the parameter '{e.name}' itself, not its gradient: this "
                    "happens with op=hvd.Adasum, which compresses parameter deltas; sparsifying "
                    "compressors do not support Adasum (use op=hvd.Average)")
        raise ValueError(
            f"compress() got a gradient (shape {tuple(tensor.shape)}) that belongs to no parameter "
            f"passed to {owner}(model, ...): pass the same model / named_parameters "
            "to the compressor as to the distributed optimizer")


# ----------------------------------------------------------------------------- density
class DensitySchedule:
    """Density per compressed tensor: warm-up (by epoch, ``warmup_epochs``, or a per-step ramp,
    ``warmup_ramp_steps``), then the target; with ``dynamic``,
    per-layer densities from the global |w| ranking, recomputed every ``update_every`` steps.
    ``k`` stays fixed between updates (Horovod's response cache compares shapes)."""

    def __init__(self, density: float, *, dynamic: bool = False, update_every: int = 100,
                 floor: float = 0.1, warmup_epochs: int = 0, warmup_densities=DGC_WARMUP,
                 steps_per_epoch: int | None = None, warmup_ramp_steps: int = 0):
        check_density("density", density)
        check_int("warmup_ramp_steps", warmup_ramp_steps, 0)
        if warmup_ramp_steps and warmup_epochs:
            raise ValueError(f"warmup_ramp_steps={warmup_ramp_steps} and warmup_epochs="
                             f"{warmup_epochs}: choose one warm-up (per-step ramp or per-epoch list)")
        check_int("update_every", update_every, 1)
        check_density("density_floor", floor, allow_zero=True)
        check_int("warmup_epochs", warmup_epochs, 0)
        if warmup_epochs and steps_per_epoch is None:
            raise ValueError("warmup_epochs > 0 needs steps_per_epoch= (or call set_epoch(); "
                             "pass steps_per_epoch=0 to rely on set_epoch() alone)")
        if steps_per_epoch is not None:
            check_int("steps_per_epoch", steps_per_epoch, 0)
        warmup_densities = tuple(warmup_densities)
        if warmup_epochs > len(warmup_densities):   # the warm-up silently ended early
            raise ValueError(f"warmup_epochs={warmup_epochs} needs one density per warm-up epoch, "
                             f"warmup_densities has {len(warmup_densities)}: {warmup_densities}")
        for d in warmup_densities[:warmup_epochs]:
            check_density("warmup_densities[...]", d)
        self.density = float(density)
        self.dynamic = bool(dynamic)
        self.update_every = update_every
        self.floor = float(floor)
        self.warmup = warmup_densities[:warmup_epochs]
        self.steps_per_epoch = steps_per_epoch
        self.ramp_steps = warmup_ramp_steps
        self.epoch: int | None = None
        self.key: tuple | None = None

    def set_epoch(self, epoch: int) -> None:
        check_int("epoch", epoch, 0)
        self.epoch = epoch

    def base(self, step: int) -> float:
        if self.ramp_steps:
            return ramp_density(step, self.ramp_steps, self.density)
        if not self.warmup:
            return self.density
        epoch = self.epoch
        if epoch is None:
            epoch = step // self.steps_per_epoch if self.steps_per_epoch else 0
        return warmup_density(epoch, self.density, self.warmup)

    def update(self, layer: LayerState, table: ParamTable, method) -> None:
        """Before ``layer``'s step: if the (base density, update period) key changed, set
        density, k and the method's plan for every compressed tensor."""
        base = self.base(layer.step)
        key = (base, layer.step // self.update_every if self.dynamic else 0)
        if key == self.key and layer.k:
            return
        if key != self.key:
            self.key = key
            rows = table.compressed
            dens = dynamic_densities([e.param for e in rows], base, self.floor) if self.dynamic \
                else [base] * len(rows)
            for e, d in zip(rows, dens):
                e.layer.density = d
                e.layer.k = method.units_for(e.layer, d)
                method.on_density(e.layer)


# ----------------------------------------------------------------------------- bytes
class ByteMeter:
    """Bytes this rank submitted to collectives. ``tensor()`` opens a tensor's record for its
    step (the first tensor of a new step starts a new "last step"); ``add()`` adds bytes to a
    record -- transports call it for every collective they run."""

    def __init__(self):
        self.totals = {"bytes": 0, "dense_bytes": 0, "steps": 0, "received_bytes": 0}
        self.last: dict[str, dict] = {}
        self.last_received = 0
        self.cur_step = 0

    def tensor(self, key: str, step: int, nbytes: int, dense_bytes: int,
               sent_units: int | None = None) -> None:
        if step > self.cur_step:
            self.cur_step = step
            self.totals["steps"] += 1
            self.last = {}
            self.last_received = 0
        self.last[key] = {"step": step, "bytes": nbytes, "dense_bytes": dense_bytes,
                          "sent_units": sent_units}
        self.totals["bytes"] += nbytes
        self.totals["dense_bytes"] += dense_bytes

    def add(self, key: str, nbytes: int) -> None:
        rec = self.last.setdefault(key, {"step": self.cur_step, "bytes": 0, "dense_bytes": 0,
                                         "sent_units": None})
        rec["bytes"] += nbytes
        self.totals["bytes"] += nbytes

    def add_received(self, nbytes: int) -> None:
        """Bytes this rank received from other ranks (transports call it; see transport.py)."""
        self.last_received += nbytes
        self.totals["received_bytes"] = self.totals.get("received_bytes", 0) + nbytes

    def summary(self) -> dict:
        step_bytes = sum(r["bytes"] for r in self.last.values())
        step_dense = sum(r["dense_bytes"] for r in self.last.values())
        t = self.totals
        return {"steps": t["steps"], "step_bytes": step_bytes, "step_dense_bytes": step_dense,
                "step_ratio": step_dense / step_bytes if step_bytes else None,
                "total_bytes": t["bytes"], "total_dense_bytes": t["dense_bytes"],
                "step_received_bytes": self.last_received,
                "total_received_bytes": t.get("received_bytes", 0),
                "compression_ratio": t["dense_bytes"] / t["bytes"] if t["bytes"] else None}

    def state_dict(self) -> dict:
        return dict(self.totals)

    def load_state_dict(self, totals: dict) -> None:
        self.totals = {**self.totals, **totals}


# ----------------------------------------------------------------------------- engine
class Engine:
    """A method (``algorithms``) bound to a model's parameters, backend-neutral.

    ``method=None`` sends every tensor dense (``dense_dtype`` on the wire: fp16 compression).
    ``nonfinite``: ``"raise"`` (every rank raises ``FloatingPointError`` naming the
    parameter) or ``"skip"`` (every rank gets a NaN gradient for the step, no inf / NaN
    reaches the state, ``step_nonfinite`` is True: the caller skips the optimizer step).
    """

    def __init__(self, model, method, *, density: float = 1.0, dynamic: bool = False,
                 update_every: int = 100, density_floor: float = 0.1, warmup_epochs: int = 0,
                 warmup_densities=DGC_WARMUP, steps_per_epoch: int | None = None,
                 warmup_ramp_steps: int = 0, momentum: float = 0.0, nesterov: bool = False,
                 clip_norm: float | None = None,
                 min_numel: int = 1024, exclude: Iterable[str] = (), compress_all: bool = False,
                 dense_dtype: torch.dtype | None = None, nonfinite: str = "raise",
                 owner: str = "Compressor"):
        if clip_norm is not None and (isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float))
                                      or not clip_norm > 0):
            raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm!r}")
        check_int("min_numel", min_numel, 0)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if exclude is None:
            exclude = ()
        if isinstance(exclude, str):
            exclude = (exclude,)
        if not all(isinstance(x, str) for x in exclude):
            raise ValueError(f"exclude must be fnmatch patterns (strings), got {exclude!r}")
        self.owner = owner
        self.method = method
        self.schedule = DensitySchedule(density, dynamic=dynamic, update_every=update_every,
                                        floor=density_floor, warmup_epochs=warmup_epochs,
                                        warmup_densities=warmup_densities,
                                        steps_per_epoch=steps_per_epoch,
                                        warmup_ramp_steps=warmup_ramp_steps)
        self.momentum = float(momentum)
        self.nesterov = nesterov
        self.clip_norm = clip_norm
        self.min_numel = min_numel
        self.exclude = tuple(exclude)
        self.compress_all = compress_all
        self.dense_dtype = dense_dtype
        self.nonfinite = nonfinite
        self.dense_momentum = DenseMomentum(self.momentum, nesterov) \
            if method is not None and method.momentum_correction and self.momentum > 0 else None
        items = named_parameters_of(model)
        self.sparse_grad_params = sparse_gradient_modules(model)
        self.table = ParamTable(items, lambda n, p: method is not None and self.eligible(n, p),
                                method.make_layout if method is not None else None)
        idx = getattr(method, "index_dtype", None)
        if idx in (torch.int32, torch.int16):          # a unit row must fit the wire's index
            top = 2 ** (8 * torch.empty((), dtype=idx).element_size() - 1) - 1
            for e in self.table.compressed:
                if e.layer.layout is not None and e.layer.layout.num_units > top:
                    raise ValueError(
                        f"index_dtype {idx}: parameter '{e.name}' has {e.layer.layout.num_units} "
                        f"units, more than its indexes reach ({top}); pass index_dtype=torch.int64")
        self.meter = ByteMeter()
        self.step_nonfinite = False         # a non-finite gradient was seen this step ("skip")
        self.local_nonfinite = False        # this rank's own gradients checked this step held one
        self.skipped_steps = 0
        # nonfinite="skip": what this rank sent this step, to hand back to the residuals if
        # the step is skipped (``hold`` / ``settle``)
        # [names covered (None: not by name), give_back, also for a skipped step]
        self._held: list = []
        # the DDP binding sets it: DDP drops the result of a parameter no rank used this step,
        # so what was sent of it comes back at the optimizer's step (give_back_unused)
        self.keep_for_unused = False
        self._unused_checked = False        # this step's give_back_unused ran
        self._began: set = set()            # the tensors that began this step
        self._in_step, self._open = False, 0    # a step is open; its tensors without a result
        self.grad_scaler = None             # a loss scaler (set_grad_scaler)
        self.loss_scale = 1.0               # the loss scale the state's buffers are in

    # -- which tensors --------------------------------------------------------------------
    def eligible(self, name: str, p: torch.Tensor) -> bool:
        """Compressed: trainable float, dim > 1 with at least ``min_numel`` elements (any size
        with ``compress_all``), not matched by ``exclude``."""
        return (p.requires_grad and p.is_floating_point()
                and (self.compress_all or (p.dim() > 1 and p.numel() >= self.min_numel))
                and not any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude))

    @property
    def compressed_names(self) -> list[str]:
        return [e.name for e in self.table.compressed]

    def set_epoch(self, epoch: int) -> None:
        self.schedule.set_epoch(epoch)

    # -- one tensor's step ----------------------------------------------------------------
    def begin(self, e: Entry, tensor: torch.Tensor, world: int, check: bool = True):
        """Start ``e``'s step: allocate memory, update densities, count the step, check the
        gradient (``check=False``: the caller's codec checks it, ``bucket.BucketCodec``;
        ``finite`` is then True). Returns ``(finite, g)`` with ``g`` locally clipped when
        ``clip_norm`` (a clipped non-finite gradient keeps a non-finite entry)."""
        if tensor.is_sparse:
            raise TypeError(f"parameter '{e.name}': torch.sparse gradients are not supported "
                            "(use nn.Embedding(sparse=False), or hvd.DistributedOptimizer(..., "
                            "sparse_as_dense=True))")
        st = e.layer
        if e.sparse and tensor.numel() == 0:
            raise ValueError(f"parameter '{e.name}': empty gradient")
        if not st.memory_ready:
            if st.memory:                   # loaded (load_state_dict): onto the gradient's device,
                st.memory = {k: v.to(tensor.device) if isinstance(v, torch.Tensor) else v
                             for k, v in st.memory.items()}   # model.cuda() may come after; a
            elif e.sparse:                  # dense tensor's momentum 'u' too (DenseMomentum)
                self.method.init_memory(st, tensor.device)
            st.memory_ready = True
        if e.sparse:
            self.schedule.update(st, self.table, self.method)
        st.step += 1
        # the step's first tensor -- the last step ended (``finish`` / ``end_step``), or, if
        # a binding could not tell, a tensor begins again -- comes before any tensor of the
        # step is updated: the last step's give-backs, a new loss scale, fresh flags
        if not self._in_step or e.name in self._began:
            self._began, self._open, self._in_step = set(), 0, True
            self._unused_checked = False
            self.settle(new_step=True)
            self.rescale()
            self.step_nonfinite = self.local_nonfinite = False
        self._began.add(e.name)
        self._open += 1
        finite = all_finite(tensor) if check else True
        if not finite:
            self.local_nonfinite = True
        # the clipping threshold in the loss scale's units, as the gradient is
        g = clip_local(tensor, self.clip_norm * self.loss_scale, world) \
            if finite and e.sparse and self.clip_norm else tensor
        return finite, g

    # -- step boundaries --------------------------------------------------------------------
    def finish(self, e: Entry) -> None:
        """``e``'s result of this step was handed out (Horovod: its ``decompress``); once every
        tensor that began the step has one, the step has ended."""
        self._open -= 1
        if self._open <= 0:
            self.end_step()

    def end_step(self) -> None:
        """Every result of this step was handed out (DDP: the step's last bucket); the next
        ``begin`` opens a new step, whichever tensor it is."""
        self._in_step, self._open = False, 0

    # -- a skipped step gives back what it sent; a loss scale change rescales the state ----
    def _keeping(self) -> bool:
        return self.nonfinite == "skip" or self.keep_for_unused

    def hold(self, give_back, names=None) -> None:
        """``give_back(only)`` puts what this rank sent this step of the tensors ``names`` (of
        those in ``only``; None: all) back into their residuals. It runs if the step turns out
        to be skipped (``nonfinite="skip"``: some rank's gradient of some tensor was not
        finite), so the units sent in a step that no rank applies are not lost, and under DDP
        for a parameter no rank used (:meth:`give_back_unused`). Kept only then
        (``"raise"`` ends the job)."""
        if self._keeping():
            self._held.append([set(names) if names is not None else None, give_back, True])

    def hold_sent(self, layer: LayerState, msg: torch.Tensor, ctx: dict) -> None:
        """:meth:`hold` for a message the method encoded for one tensor (both bindings'
        per-tensor path): ``method.give_back`` of it. An allreduced message is summed in place
        by the collective, so a copy is held."""
        if not self._keeping() or not layer.memory:          # no residual: nothing to give back
            return
        m = self.method
        own = msg.clone() if m.communicator == "allreduce" else msg
        self._held.append([{layer.name}, lambda only=None: m.give_back(layer, own, ctx), True])

    def give_back_unused(self, dropped) -> None:
        """What this rank sent this step of the tensors whose results were dropped
        (``dropped(entry)``, for the entries that began this step; DDP: parameters no rank
        used, left with ``.grad`` None) goes back into their residuals now, once a step: a
        second call in the step (a second optimizer's step, or step() after zero_grad()) does
        nothing. The rest of the step's give-backs stay held only for a step that turns out
        skipped (``nonfinite="skip"``)."""
        if self._unused_checked:
            return
        self._unused_checked = True
        names = {e.name for e in self.table if e.name in self._began and dropped(e)}
        for item in self._held:
            covered, give_back, _ = item
            mine = covered & names if covered is not None else set()
            if mine:
                give_back(mine)
                item[0] = covered - mine
        if self.nonfinite != "skip":
            self._held = []
        else:
            self._held = [it for it in self._held if it[2] and (it[0] is None or it[0])]

    def settle(self, new_step: bool = False) -> None:
        """If the last step was skipped, hand its sent units back to the residuals (once).
        Runs at the next step's first tensor and before :meth:`state_dict`, so a checkpoint
        taken after a skipped step holds them."""
        if self.step_nonfinite:
            held, self._held = self._held, []
            for names, give_back, on_skip in held:
                if on_skip:
                    give_back(names)
        elif new_step:
            self._held = []

    def set_grad_scaler(self, scaler) -> None:
        """Keep the state's buffers (residuals, momentum) in the units of ``scaler``'s current
        loss scale. The gradients a loss scaler produces are multiplied by its scale, and so is
        everything a residual accumulates of them; when the scale changes (an overflow halves
        it, ``growth_interval`` good steps double it) every buffer is multiplied by new / old
        at the next step's first tensor -- exact for the powers of two that ``GradScaler``
        uses. ``None`` detaches."""
        if scaler is None:
            self.grad_scaler = None
            return
        if not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(f"scaler must have get_scale() (torch.amp.GradScaler), got "
                            f"{type(scaler).__name__}")
        m = self.method
        if not getattr(m, "scale_equivariant", True):
            raise ValueError(f"set_grad_scaler: {self.owner}'s output does not scale with the "
                             "gradient (a sign vote, an absolute threshold), so a loss scaler "
                             "would divide every update by its scale; train it without one "
                             "(e.g. bf16 autocast)")
        if getattr(m, "value_dtype", None) == torch.float16 \
                and not getattr(getattr(m, "memory", None), "error_feedback", False):
            raise ValueError(f"set_grad_scaler: {self.owner} sends fp16 values without a residual: "
                             "loss-scaled values past 65504 would be cut off and lost; use fp32 "
                             "values or error feedback")
        if self.nonfinite != "skip":
            raise ValueError("set_grad_scaler: a loss scaler's overflow steps give inf / NaN "
                             "gradients, which nonfinite='raise' turns into an error; build the "
                             "compressor with nonfinite='skip'")
        self.grad_scaler = scaler

    def _scale_now(self) -> float:
        sc = self.grad_scaler
        if sc is None:
            return 1.0
        enabled = getattr(sc, "is_enabled", None)
        s = float(sc.get_scale()) if enabled is None or enabled() else 1.0
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"the loss scaler's scale must be a finite number > 0, got {s}")
        return s

    def rescale(self) -> None:
        """If the loss scale changed since the state was last updated, multiply every buffer
        of every tensor's state by new / old (see :meth:`set_grad_scaler`). Without a scaler
        the scale is 1: a state saved under a scaler and loaded without one is divided back."""
        s = self._scale_now()
        if s == self.loss_scale:
            return
        factor, self.loss_scale = s / self.loss_scale, s
        for e in self.table:
            for buf in e.layer.memory.values():
                if isinstance(buf, torch.Tensor) and buf.is_floating_point():
                    buf.mul_(factor)

    def record(self, e: Entry, nbytes: int, tensor: torch.Tensor, sent_units=None) -> None:
        self.meter.tensor(e.name, e.layer.step, nbytes, tensor.numel() * 4, sent_units)

    def nonfinite_result(self, e: Entry, like: torch.Tensor, where: str = "") -> torch.Tensor:
        """Every rank learned (from the reduced flag or values) that some rank's gradient of
        ``e`` was not finite: raise, or (``skip``) hand back a NaN gradient."""
        if self.nonfinite == "raise":
            raise FloatingPointError(
                f"non-finite gradient for parameter '{e.name}' on at least one rank "
                f"(step {e.layer.step}); no inf / NaN reached the compressor state{where}")
        if not self.step_nonfinite:
            self.skipped_steps += 1
        self.step_nonfinite = True
        return torch.full(e.layer.shape, float("nan"), dtype=like.dtype, device=like.device)

    def dense_result(self, e: Entry, reduced: torch.Tensor, dtype) -> torch.Tensor:
        """A dense tensor back from the allreduce: non-finite check, then the local momentum
        that momentum-correcting methods apply to the tensors they send dense."""
        if not all_finite(reduced):
            return self.nonfinite_result(e, reduced.to(dtype))
        out = reduced
        if self.dense_momentum is not None:
            st = e.layer.memory
            old = st.get("u") if self.keep_for_unused else None
            # DDP drops the result of a tensor no rank used: its momentum is put back as it was
            # (the update made a new tensor: no copy), as plain DDP's optimizer leaves it (a
            # skipped step keeps the new one, which holds that step's gradient, as the
            # residuals do)
            out = self.dense_momentum.apply(st, out.float(), replace=old is not None)
            if old is not None:
                self._held.append([{e.name}, lambda only=None: st.__setitem__("u", old), False])
        return out.to(dtype) if out.dtype != dtype else out

    def wire_dense(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype.is_floating_point and self.dense_dtype is not None \
                and tensor.dtype != self.dense_dtype:
            return tensor.to(self.dense_dtype)
        return tensor

    # -- reporting ------------------------------------------------------------------------
    def memory_bytes(self) -> dict:
        """Compressor state held by this rank: residual/momentum buffers (fp32) and workspaces."""
        buffers = sum(t.numel() * t.element_size() for e in self.table
                      for t in e.layer.memory.values() if isinstance(t, torch.Tensor))
        ws = self.method.workspace.nbytes() if self.method is not None else 0
        params = sum(e.param.numel() for e in self.table)
        return {"state_bytes": buffers, "workspace_bytes": ws,
                "words_per_parameter": (buffers + ws) / (4 * params) if params else 0.0}

    def stats(self) -> dict:
        last = self.meter.last
        layers = {}
        for e in self.table:
            rec, st = last.get(e.name), e.layer
            layers[e.name] = {
                "compressed": e.sparse,
                "density": st.density if e.sparse else 1.0,
                "units": st.k if e.sparse else None,
                "unit_size": st.layout.unit_size if e.sparse else None,
                "sent_fraction": (rec["sent_units"] / st.layout.num_units
                                  if rec and rec.get("sent_units") is not None and e.sparse
                                  else (1.0 if rec else None)),
                "bytes": rec["bytes"] if rec else 0,
                "dense_bytes": rec["dense_bytes"] if rec else 0,
            }
        return {**self.meter.summary(), "skipped_steps": self.skipped_steps,
                "memory": self.memory_bytes(), "layers": layers}

    # -- state ----------------------------------------------------------------------------
    def state_dict(self, owner: str) -> dict:
        self.settle()
        layers = {e.name: {"step": e.layer.step, "density": e.layer.density, "k": e.layer.k,
                           "memory": {k: v.detach().clone() for k, v in e.layer.memory.items()}}
                  for e in self.table}
        s = self.schedule
        return {"format": STATE_FORMAT, "method": owner, "epoch": s.epoch,
                "density_key": list(s.key) if s.key else None,
                "totals": self.meter.state_dict(), "layers": layers,
                "skipped_steps": self.skipped_steps, "loss_scale": self.loss_scale,
                "rng": self.method.rng_state() if self.method is not None else {}}

    def _check_buffers(self, e: Entry, saved: dict) -> None:
        """The saved buffers of ``e`` are the ones this configuration keeps (names and shapes),
        also in a fresh process, before the first step allocated any: a momentum of 0 against
        0.9, another radius or unit layout would otherwise fail later without a name."""
        st = e.layer
        if e.sparse:
            want = st.memory
            if not want:                        # what the first step would allocate
                probe = copy.copy(st)
                try:
                    self.method.init_memory(probe, torch.device("meta"))
                    want = probe.memory
                except Exception:               # noqa: BLE001 - a method that cannot: no check
                    return
            want = {k: tuple(v.shape) for k, v in want.items() if isinstance(v, torch.Tensor)}
        else:                                   # dense: the local momentum, after a first step
            want = {"u": tuple(e.param.shape)} if self.dense_momentum is not None else {}
        got = {k: tuple(v.shape) for k, v in saved.items() if isinstance(v, torch.Tensor)}
        extra = sorted(set(got) - set(want))
        missing = sorted(set(want) - set(got)) if e.sparse and want else []
        if extra or missing:
            raise ValueError(f"compression state for parameter '{e.name}': buffers {sorted(got)}, this "
                             f"configuration keeps {sorted(want)} (a different momentum, method or "
                             "options than the run that saved it?)")
        for key, shape in got.items():             # every key is in want (extra: refused above)
            same = want[key] == shape if e.sparse else math.prod(want[key]) == math.prod(shape)
            if not same:
                raise ValueError(f"compression state for parameter '{e.name}': buffer '{key}' "
                                 f"has shape {shape}, expected {want[key]}")

    def load_state_dict(self, state: dict, owner: str) -> None:
        legacy = isinstance(state, dict) and state.get("format") in LEGACY_STATE_FORMATS
        if not isinstance(state, dict) or (state.get("format") != STATE_FORMAT and not legacy):
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a hvd_rsgc compression state (format {got!r}, expected "
                             f"{STATE_FORMAT!r})")
        if state.get("method") != owner:
            raise ValueError(f"state was saved by {state.get('method')}, cannot load into {owner}")
        saved = state["layers"]
        mine = {e.name for e in self.table}
        if set(saved) != mine:
            missing, extra = sorted(mine - set(saved)), sorted(set(saved) - mine)
            raise ValueError(f"compression state does not match the model: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        recs = {}
        for e in self.table:                  # every layer checked before any is changed: a
            rec, st = saved[e.name], e.layer  # refused state leaves the compressor as it was
            if legacy and st.layout is not None:
                rec = {**rec, "memory": {k: st.layout.from_legacy(v) if isinstance(v, torch.Tensor)
                                         and v.shape == (st.layout.num_units, st.layout.unit_size)
                                         else v for k, v in rec["memory"].items()}}
            if rec["memory"]:
                self._check_buffers(e, rec["memory"])
            recs[e.name] = rec
        for e in self.table:
            rec, st = recs[e.name], e.layer
            # the first step moves the buffers to its gradient's device, or allocates them
            # anew if the state was saved before that tensor's first step (empty)
            st.memory = {k: v.to(e.param.device).clone() for k, v in rec["memory"].items()}
            st.memory_ready = False
            st.step, st.density, st.k = int(rec["step"]), float(rec["density"]), int(rec["k"])
            if st.layout is not None and st.k:
                self.method.on_density(st)
        if self.method is not None and state.get("rng"):
            self.method.load_rng_state(state["rng"])
        self.schedule.epoch = state.get("epoch")
        dk = state.get("density_key")
        self.schedule.key = tuple(dk) if dk else None
        self.meter.load_state_dict(state.get("totals", {}))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.meter.cur_step = max((e.layer.step for e in self.table), default=0)
        self._held, self._began, self._in_step, self._open = [], set(), False, 0
        self.loss_scale = float(state.get("loss_scale", 1.0))
