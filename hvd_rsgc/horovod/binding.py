"""The Horovod binding: runs a compressor's engine inside a stock, unpatched
``hvd.DistributedOptimizer`` (Horovod 0.28.1). See docs/HOROVOD_NOTES.md for the internals it
respects.

* ``compress(p.grad)`` is called from the backward hook, without a name; the engine's table
  finds the parameter whose ``.grad`` *is* that tensor.
* Sparse (allgather) methods: ``compress`` encodes and starts ``allgather_async(message,
  name="hvd_rsgc.<param name>")`` on the transport -- a stable name, so ranks pair up whatever
  order hooks fire in -- and returns a fresh 1-element placeholder, which Horovod allreduces in
  place under the parameter's name. The placeholder is a health flag: 1 if this rank's
  gradient was not finite. ``decompress`` waits, decodes every rank's message into one dense
  sum, divides by the process-set size for ``op=Average`` and returns a fresh tensor.
* Values-allreduce methods (Random-k: shared seed, no indices) return their k values to the
  stock allreduce itself; dense tensors (1-D, small, excluded) go through it unchanged
  (``dense_dtype`` on the wire).
* ``communicator="reduce_scatter"`` (sparse methods): ``compress`` selects without touching
  the residual and returns the flag; the first ``decompress`` of a step runs the balanced
  sparse reduce-scatter + allgather (``algorithms/collective.py``) for every sparse tensor of
  the step, in table order (Horovod alltoall / allgather / allreduce, named), and each
  ``decompress`` then removes from the residual what of this rank reached the final set.
* ``fused=True`` (sparse methods): ``compress`` holds each tensor until its bucket (about
  ``bucket_mb`` of gradient, consecutive in backward order) is complete, then encodes the whole
  bucket into one message and starts ONE allgather per bucket (``algorithms/bucket.py``);
  every ``compress`` returns the placeholder, always FLAG_OK: the bucket's encode checks the
  gradients and a non-finite one travels as a flag row of the message; ``decompress``
  decodes the bucket once (one scatter) and returns each tensor's slice.
* Multi-round methods (LGC) accumulate in ``compress``; the first ``decompress`` of a step runs
  the method's rounds over the transport for all compressed tensors (stock ``synchronize()``
  calls every ``compress()`` of a step before the first ``decompress()``), after one
  1-element allreduce says whether any rank's gradient of the step was non-finite: then no
  round runs and every compressed tensor follows the non-finite policy (as in DDP).

No inf / NaN reaches the residual: per tensor, a non-finite gradient is not accumulated, the
rank sends an empty message and raises the flag; in a bucket, its finite entries are
accumulated, nothing of it is sent and the message carries its flag row. Every rank then
follows the engine's policy (raise ``FloatingPointError`` naming the parameter, after that
tensor's collectives completed, or hand back NaN with ``skip``).

At ``-np 1`` Horovod registers no gradient hooks, so ``compress`` would never run and momentum
correction would silently vanish: the compressor's ``torch.optim`` step pre-hook calls
:meth:`HorovodBinding.pre_step`, which runs every gradient through compress/decompress over a
:class:`~hvd_rsgc.transport.LocalTransport`.
"""
from __future__ import annotations

import os
import sys

import torch

from ..algorithms.memory import all_finite
from ..engine import ROUNDS_SKIPPED
from ..transport import LocalTransport
from .transport import HorovodTransport, hvd

FLAG_OK, FLAG_NONFINITE = 0.0, 1.0


def _in_state_broadcast() -> bool:
    """Whether this step is the one ``hvd.broadcast_optimizer_state`` takes to create a new
    optimizer's state (zero gradients, the base class's step, no allreduce at any size): at -np
    1 the local pass must skip it as the hooks do at -np N, else the compressor ran a step on
    zeros (counters + 1, the residual one more momentum step: a resume was not bit-exact)."""
    f = sys._getframe(1)
    for _ in range(16):
        if f is None:
            return False
        if f.f_code.co_name == "broadcast_optimizer_state" \
                and f.f_globals.get("__name__", "").startswith("horovod."):
            return True
        f = f.f_back
    return False


def _updated(opt) -> set:
    """Ids of the parameters ``opt`` updates (what Horovod's optimizer would hook: those that
    require a gradient)."""
    return {id(p) for g in opt.param_groups for p in g["params"] if p.requires_grad}


class Ctx(dict):
    """Per-call context handed from compress() to decompress()."""


class HorovodBinding:
    def __init__(self, comp):
        self.comp = comp
        self.engine = comp.engine
        self.method = comp.method
        self.network = HorovodTransport(self.engine.meter, comp.process_set)
        self.local = LocalTransport(self.engine.meter)
        self.transport = self.network
        self._local_done: dict[int, tuple[int, int]] = {}
        self._multi_cache: dict[str, torch.Tensor] = {}
        self._multi_step = -1
        self._multi_skipped = False
        self._rs_pending: list = []
        self._rs_results: dict = {}
        self._rs_decided = (-1, False)
        self._buckets: list | None = None
        self._bucket_by_name: dict = {}

    # -- compress -------------------------------------------------------------------------
    def compress(self, tensor: torch.Tensor):
        eng = self.engine
        e = eng.table.find_grad(tensor, type(self.comp).__name__)
        # rank: stochastic methods (TernGrad, natural compression) seed their draws with it
        ctx = Ctx(name=e.name, entry=e, dtype=tensor.dtype, rank=self.transport.rank)
        bucket = self._bucket_of(e)           # a bucket's codec checks its gradients itself
        m = self.method
        multi = m is not None and getattr(m, "rounds", "single") == "multi"
        # a dense tensor is checked once reduced (engine.dense_result: a non-finite entry of
        # any rank's makes the sum non-finite), not here as well: a pass and a host sync less;
        # except in a multi-round step, where every check decides whether the rounds run
        finite, g = eng.begin(e, tensor, self.transport.size,
                              check=(bucket is None and e.sparse) or (not e.sparse and multi))
        if not e.sparse:
            out = eng.wire_dense(tensor)
            ctx["kind"] = "dense"
            eng.record(e, out.numel() * out.element_size(), tensor)
            return out, ctx
        if multi:
            if finite:
                m.accumulate(e.layer, g)
            return self._flag(finite, tensor, ctx, e, "multi")
        if m.communicator == "allgather" and self._reduce_scatter(e.layer.step):
            if bucket is not None:
                finite = all_finite(tensor)
            rows, values = m.pick(e.layer, g, finite)
            ctx["sent_units"] = int(rows.numel())
            ctx["pieces"] = (rows, values)
            self._rs_pending.append(ctx)
            return self._flag(finite, tensor, ctx, e, "rs")
        if bucket is not None:
            return self._fused_compress(bucket, e, g, tensor, ctx)
        if finite:
            ctx["size"] = self.transport.size      # an allreduced fp16 message fits its sum
            msg = m.encode(e.layer, g, ctx)
            eng.hold_sent(e.layer, msg, ctx)       # a skipped step hands it back
        else:
            msg = m.empty_message(e.layer, tensor.device)
            ctx["sent_units"] = 0
        if m.communicator == "allreduce":          # values through the stock allreduce
            if not finite:
                msg.fill_(float("nan"))            # poisons the allreduce on every rank
            ctx["kind"] = "reduce"
            eng.record(e, msg.numel() * msg.element_size(), tensor, ctx.get("sent_units"))
            return msg, ctx
        flag = self._flag(finite, tensor, ctx, e, "gather")
        ctx["handle"] = self.transport.allgather_async(msg, name=f"hvd_rsgc.{e.name}", key=e.name)
        return flag

    @staticmethod
    def _flag_tensor(finite, tensor):
        return torch.full((1,), FLAG_OK if finite else FLAG_NONFINITE, dtype=tensor.dtype,
                          device=tensor.device)

    def _flag(self, finite, tensor, ctx, e, kind):
        flag = self._flag_tensor(finite, tensor)
        ctx["kind"] = kind
        self.engine.record(e, flag.numel() * flag.element_size(), tensor, ctx.get("sent_units"))
        return flag, ctx

    # -- decompress -----------------------------------------------------------------------
    def decompress(self, tensor: torch.Tensor, ctx):
        out = self._decompress(tensor, ctx)
        self.engine.finish(ctx["entry"])       # the step ends with its last result
        return out

    def _decompress(self, tensor: torch.Tensor, ctx):
        if ctx is None:        # Horovod's torch.sparse path skipped compress() and sends no ctx
            raise TypeError(
                f"a torch.sparse gradient (parameters {self.engine.sparse_grad_params[:4] or '?'}) "
                f"reached {type(self.comp).__name__}: Horovod sends sparse gradients around the "
                "compressor. Use nn.Embedding(sparse=False), or hvd.DistributedOptimizer(..., "
                "sparse_as_dense=True)")
        eng, e, kind = self.engine, ctx["entry"], ctx["kind"]
        if kind == "dense":
            return eng.dense_result(e, tensor, ctx["dtype"])
        if kind == "reduce":
            if not torch.isfinite(tensor).all():
                return eng.nonfinite_result(e, tensor.to(ctx["dtype"]))
            return self.method.decode(e.layer, tensor, self.transport.size, ctx).to(ctx["dtype"])
        if kind == "rs":
            if e.name not in self._rs_results:
                self._run_reduce_scatter()
            dense, marks = self._rs_results.pop(e.name)
            if float(tensor.reshape(-1)[0]) != FLAG_OK:
                return eng.nonfinite_result(e, tensor.to(ctx["dtype"]))
            marks.apply()
            eng.hold(lambda only=None: marks.give_back(*ctx["pieces"]))
            if self.comp.average and self.transport.size > 1:
                dense.div_(self.transport.size)
            return dense.to(ctx["dtype"])
        if kind == "fused":
            return self._fused_decompress(e, tensor, ctx)
        if kind == "multi":
            if self._multi_step != e.layer.step:
                self._run_multi(e.layer.step, tensor.device)
            if self._multi_skipped:
                return eng.nonfinite_result(e, tensor.to(ctx["dtype"]), ROUNDS_SKIPPED)
            return self._multi_cache.pop(e.name).to(ctx["dtype"])
        gathered = self.transport.wait(ctx["handle"])
        if float(tensor.reshape(-1)[0]) != FLAG_OK:
            return eng.nonfinite_result(e, tensor.to(ctx["dtype"]))
        n = self.transport.size
        dense = self.method.decode(e.layer, gathered, n, ctx)
        if self.comp.average and n > 1:
            dense.div_(n)
        return dense.to(ctx["dtype"])

    # -- fused buckets (fused=True) ------------------------------------------------------
    def _bucket_of(self, e):
        """``e``'s bucket state where its gradient goes through a bucket (a sparse single-round
        allgather method with ``fused=True``; the reduce-scatter steps excepted), else None."""
        m = self.method
        if not (e.sparse and self.comp.fused and m.communicator == "allgather"
                and getattr(m, "rounds", "single") != "multi"):
            return None
        return self._buckets_by_name().get(e.name)

    def new_state(self) -> None:
        """The engine's state was replaced (``load_state_dict``): the buckets' per-step state
        (keyed by the layers' step counters, which the loaded state may set back to a value a
        bucket has seen) and the -np 1 pass's record of processed gradients start over."""
        for b in self._buckets or []:
            b.pop("step", None)
        self._local_done.clear()
        self._multi_cache, self._multi_step, self._multi_skipped = {}, -1, False
        self._rs_pending, self._rs_results, self._rs_decided = [], {}, (-1, False)

    def _buckets_by_name(self) -> dict:
        """Bucket state by parameter name, built on first use (parameters outside any bucket
        take the per-tensor path)."""
        if self._buckets is None:
            from ..algorithms.bucket import BucketCodec, make_buckets
            # parameters with torch.sparse gradients never reach compress() (Horovod sends them
            # around the compressor): kept out of buckets, they meet the per-tensor refusal
            skip = set(self.engine.sparse_grad_params)
            # nor do frozen parameters (requires_grad=False: frozen after the compressor was
            # built, e.g. a backbone for fine-tuning); in a bucket they would never complete it
            sparse = [e for e in self.engine.table.backward_order()
                      if e.sparse and e.name not in skip and e.param.requires_grad]
            self._buckets = []
            for b, members in enumerate(make_buckets(sparse, self.comp.bucket_bytes)):
                codec = BucketCodec(self.method, [e.layer for e in members])
                # named by its first parameter, as Horovod names a tensor: two compressors
                # (two optimizers) stepping together must not submit the same names
                state = {"id": b, "codec": codec, "members": [e.name for e in members],
                         "wire": f"hvd_rsgc.bucket.{members[0].name}"}
                self._buckets.append(state)
                for e in members:
                    self._bucket_by_name[e.name] = state
        return self._bucket_by_name

    def _fused_compress(self, b, e, g, tensor, ctx):
        """Hold the tensor until its bucket ``b`` is complete (every member's compress() ran:
        stock synchronize() calls compress() for every parameter before any decompress()), then
        encode the bucket and start one allgather per unit-size group, named by the bucket.
        The gradient is not checked here: the bucket's encode checks it (in the native update
        pass) and a non-finite layer travels as a flag row of the message, so the placeholder
        returned is always FLAG_OK (no sum and no host sync per tensor)."""
        if b.get("step") != e.layer.step:                  # a new step: fresh bucket state
            b.update(step=e.layer.step, grads={}, ctxs={}, tensors={}, handles=None, results=None)
        ctx["kind"], ctx["bucket"] = "fused", b["id"]
        b["grads"][e.name] = g
        b["ctxs"][e.name] = ctx
        b["tensors"][e.name] = (e, tensor)
        flag = self._flag_tensor(True, tensor)
        if len(b["ctxs"]) == len(b["members"]):
            codec = b["codec"]
            msgs = codec.encode(b["grads"], b["ctxs"])
            self.engine.hold(lambda only=None: codec.give_back(msgs))
            key = b["wire"]
            for name in b["members"]:
                m_e, t = b["tensors"][name]
                self.engine.record(m_e, flag.numel() * flag.element_size(), t,
                                   b["ctxs"][name].get("sent_units"))
            b["handles"] = [self.transport.allgather_async(msg, name=f"{key}.s{g.S}", key=key)
                            for msg, g in zip(msgs, b["codec"].groups)]
            b["grads"], b["tensors"] = {}, {}
        return flag, ctx

    def _fused_decompress(self, e, tensor, ctx):
        b = self._buckets[ctx["bucket"]]
        if b["handles"] is None:
            missing = [n for n in b["members"] if n not in b["ctxs"]]
            raise RuntimeError(
                f"bucket {b['id']} of '{e.name}' was decompressed before all its tensors were "
                f"compressed ({len(b['ctxs'])} of {len(b['members'])}; not compressed this step: "
                f"{missing[:4]}). Horovod compresses the parameters its optimizer updates: a "
                f"parameter the {type(self.comp).__name__} compresses but the optimizer does not "
                "update (an optimizer over part of the model, or one built after freezing what "
                "the compressor was built with) never completes the bucket -- build both from "
                "the same parameters, or exclude=[...] them; otherwise call "
                "optimizer.synchronize() / step() as Horovod does")
        if b["results"] is None:
            n = self.transport.size           # op=Average: divided in the decode itself
            b["results"] = b["codec"].decode([self.transport.wait(h) for h in b["handles"]],
                                             divide=n if self.comp.average and n > 1 else 1)
            b["flagged"] = set(b["codec"].flagged)     # not finite on some rank
        dense = b["results"].pop(e.name)
        if e.name in b["flagged"]:
            return self.engine.nonfinite_result(e, tensor.to(ctx["dtype"]))
        return dense.to(ctx["dtype"])

    def _reduce_scatter(self, step: int) -> bool:
        """Whether this step's sparse tensors take the reduce-scatter (decided once a step)."""
        if self._rs_decided[0] != step:
            layers = [r.layer for r in self.engine.table.compressed]
            self._rs_decided = (step, self.comp.collective.uses_reduce_scatter(
                self.transport.size, self.method, layers, self.engine.schedule.density))
        return self._rs_decided[1]

    def _tag(self) -> str:
        """This compressor's part of a collective's name: its first compressed parameter's
        (unique among the optimizers of a job, as Horovod's own names must be)."""
        rows = self.engine.table.compressed
        return rows[0].name if rows else "none"

    def _run_reduce_scatter(self) -> None:
        """First decompress() of a step: every compress() of the step has run on every rank
        (stock synchronize()), so all ranks exchange the same tensors, in table order."""
        pending = sorted(self._rs_pending, key=lambda c: c["entry"].layer.index)
        self._rs_pending = []
        items = [(c["entry"].layer, *c["pieces"]) for c in pending]
        sums, marks = self.comp.collective.exchange(self.method, items, self.transport,
                                                    f"hvd_rsgc.rs.{self._tag()}")
        self._rs_results = {c["name"]: (s, mk) for c, s, mk in zip(pending, sums, marks)}

    def _run_multi(self, step: int, device) -> None:
        """First decompress() of a multi-round step: the rounds run over every compressed
        tensor only if no rank saw a non-finite gradient this step (any tensor, dense ones
        too: one 1-element allreduce decides, as DDP's flags do); otherwise every compressed
        tensor's result is non-finite and the accumulators keep what they hold (the step's
        finite gradients included), so no residual is sent and then thrown away."""
        self._multi_step = step
        self._multi_cache = {}
        bad = torch.full((1,), float(self.engine.local_nonfinite), device=device)
        tag = self._tag()
        self._multi_skipped = float(self.transport.allreduce(bad, f"hvd_rsgc.multi.nonfinite.{tag}",
                                                              "sum", key=f"hvd_rsgc.multi.{tag}")) > 0
        if self._multi_skipped:
            return
        rows = self.engine.table.compressed
        outs = self.method.run([r.layer for r in rows], self.transport, self.comp.average, step)
        self._multi_cache = {r.name: o for r, o in zip(rows, outs)}

    # -- optimizer ------------------------------------------------------------------------
    def check_optimizer(self, opt) -> None:
        h = hvd()
        op = getattr(opt, "op", None)
        name = type(self.comp).__name__
        if op is not None:
            if op == h.Adasum:
                raise ValueError(f"{name} does not support op=hvd.Adasum (Adasum compresses "
                                 "parameter deltas); use op=hvd.Average")
            if op == h.Sum and self.comp.average:
                raise ValueError(f"optimizer uses op=hvd.Sum but {name}(average=True); pass "
                                 "average=False")
            if op == h.Average and not self.comp.average:
                raise ValueError(f"optimizer uses op=hvd.Average but {name}(average=False)")
            # None is the global set on both sides (Horovod's optimizer stores the global set
            # itself): a compressor left on the global set under an optimizer on a subset
            # would gather over ranks that never join
            mine = self.comp.process_set or h.global_process_set
            theirs = getattr(opt, "process_set", None) or h.global_process_set
            if mine is not theirs and (getattr(mine, "process_set_id", None) is None
                                       or mine.process_set_id != getattr(theirs, "process_set_id", None)):
                raise ValueError(f"optimizer and compressor use different process sets (optimizer: "
                                 f"ranks {getattr(theirs, 'ranks', '?')}, {name}: ranks "
                                 f"{getattr(mine, 'ranks', '?')}): pass the optimizer's process_set "
                                 f"to {name}(..., process_set=...)")
        # torch.sparse gradients are refused in decompress(), once Horovod's sparse allreduce
        # has completed on every rank: refusing here, with collectives in flight, would let a
        # fast rank exit while a slow one is still submitting (it would see "Horovod has been
        # shut down" instead of the reason)

    def synchronize(self, opt) -> None:
        if self._hooks_absent():
            self._run_local(getattr(opt, "sparse_as_dense", False), _updated(opt))
        else:
            opt.synchronize()

    def pre_step(self, opt) -> None:
        # not inside ``with opt.skip_synchronize()``: the caller synchronized already (and may
        # have changed the gradients in place since, e.g. clipped them)
        if not getattr(opt, "_requires_update", None) and self._hooks_absent() \
                and getattr(opt, "_should_synchronize", True) and not _in_state_broadcast():
            self._run_local(getattr(opt, "sparse_as_dense", False), _updated(opt))

    @staticmethod
    def _hooks_absent() -> bool:
        """Horovod registers no hooks at size 1 unless the run is elastic (its own condition:
        ``size() > 1 or HOROVOD_ELASTIC == '1'``): the compressor would never run."""
        try:
            return hvd().size() == 1 and os.environ.get("HOROVOD_ELASTIC") != "1"
        except Exception:      # noqa: BLE001 - not initialised
            return False

    def _run_local(self, sparse_as_dense: bool = False, updated: set | None = None) -> None:
        """-np 1: every gradient through compress/decompress over the local transport. Same
        order as Horovod's synchronize(): every compress() first, then every decompress();
        torch.sparse gradients as Horovod treats them (``sparse_as_dense``: compressed as
        dense, written back sparse; otherwise refused by compress()). As at -np N, only the
        parameters the optimizer updates (``updated``: ids) go through, and one without a
        gradient this step gets zeros, as Horovod's synchronize() submits them. Horovod's step() calls
        the base class's step(), which fires the pre-hook again: a gradient already processed
        (same tensor, same version) is not processed twice."""
        self.transport = self.local
        try:
            pending = []
            for e in self.engine.table.backward_order():
                p = e.param
                if not p.requires_grad or (updated is not None and id(p) not in updated):
                    continue                   # as at -np N: Horovod hooks what opt updates
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if self._local_done.get(id(p)) == (id(p.grad), p.grad._version):
                    continue
                g = p.grad.to_dense() if p.grad.is_sparse and sparse_as_dense else p.grad
                pending.append((p, *self.compress(g)))
            for p, out, ctx in pending:
                if p.grad.is_sparse:                   # what Horovod's synchronize() does
                    p.grad.zero_().add_(self.decompress(out, ctx).to_sparse())
                else:
                    p.grad.set_(self.decompress(out, ctx))
                self._local_done[id(p)] = (id(p.grad), p.grad._version)
        finally:
            self.transport = self.network
