"""PyTorch DDP backend: every hvd_rsgc compressor as a DDP communication hook.

    ddp = DistributedDataParallel(model)
    comp = hvd_rsgc.RSDGCCompression(model, density=0.001)      # any registered compressor
    ddp.register_comm_hook(state=comp, hook=hvd_rsgc.ddp_comm_hook)
    opt = hvd_rsgc.make_optimizer(comp, model.parameters(), lr=0.1)   # DGCSGD for DGC / RS-DGC

For each of DDP's gradient buckets (several parameters in one flat buffer, the hook's input and
output), in the bucket's parameter order, which is the same on every rank:

1. every parameter's gradient goes through the engine (memory, density schedule, non-finite
   check, clipping) as with Horovod (with ``fused=True`` the bucket's encode checks them);
2. dense tensors (1-D, small, excluded; ``dense_dtype`` on the wire) and one health flag per
   parameter travel in ONE allreduce per bucket;
3. sparse methods' messages (values + indices) are allgathered per tensor (or, with
   ``communicator="reduce_scatter"``, go through ONE balanced sparse reduce-scatter + allgather
   for the bucket: ``algorithms/collective.py``; with ``fused=True``, ONE message and one
   allgather per unit size for the bucket: ``algorithms/bucket.py``), values-allreduce
   methods (Random-k) allreduce their k values -- all through the ``torch.distributed``
   transport, counted by the byte meter;
4. the bucket's averaged (or summed) gradient is written into a fresh buffer, the future's value.

Multi-round methods (LGC) need every compressed tensor of the step: their buckets only
accumulate, and their futures complete when DDP hands over the last bucket
(``bucket.is_last()``), before DDP waits on them. ``no_sync()`` skips the hook (gradients
accumulate locally and go out at the next synchronised step); ``gradient_as_bucket_view=True``
and static graphs work unchanged. A non-finite gradient follows the compressor's ``nonfinite``
policy on every rank (``raise``: ``FloatingPointError`` naming the parameter; ``skip``: NaN
gradients and ``comp.step_nonfinite``).
"""
import torch
import torch.distributed as dist

from ..engine import ROUNDS_SKIPPED
from .transport import TorchDistTransport

FLAG_OK, FLAG_NONFINITE = 0.0, 1.0


def ddp_comm_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook; ``state`` is the compressor (``register_comm_hook(state=comp, ...)``).
    (No ``from __future__ import annotations`` in this module: DDP checks these annotations.)"""
    return state.ddp.bucket(bucket)


class DDPBinding:
    def __init__(self, comp, group=None):
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise ValueError(
                f"process_set: as a DDP comm hook {type(comp).__name__} needs the "
                "torch.distributed ProcessGroup that DDP uses (DistributedDataParallel(..., "
                f"process_group=G) -> process_set=G), got {type(group).__name__}")
        self.comp = comp
        self.engine = comp.engine
        self.method = comp.method
        self.transport = TorchDistTransport(self.engine.meter, group)
        self._pending: list = []                 # multi-round: buckets waiting for the last one
        self._codecs: dict = {}                  # fused=True: one BucketCodec per DDP bucket
        self.engine.keep_for_unused = True

    def bucket(self, bucket) -> "torch.futures.Future[torch.Tensor]":
        eng, m = self.engine, self.method
        buf = bucket.buffer()
        params = bucket.parameters()
        grads = bucket.gradients()
        entries = []
        for p in params:
            if not eng.table.owns(p):
                raise ValueError(f"DDP bucket {bucket.index()} holds a parameter (shape "
                                 f"{tuple(p.shape)}) that {type(self.comp).__name__}(model, ...) "
                                 "does not own: pass the same model to the compressor and to DDP")
            entries.append(eng.table.of(p))
        n = self.transport.size
        multi = m is not None and getattr(m, "rounds", "single") == "multi"
        wire_dtype = eng.dense_dtype or buf.dtype
        fb = torch.empty((), dtype=wire_dtype).element_size()      # one flag per parameter
        dense_parts, flags, works, rs_items = [], [], [], []
        rs = (m is not None and not multi and m.communicator == "allgather"
              and self.comp.collective.uses_reduce_scatter(
                  n, m, [r.layer for r in eng.table.compressed], eng.schedule.density))
        fused = (m is not None and not multi and not rs and self.comp.fused
                 and m.communicator == "allgather")
        fz_grads, fz_ctxs, fz_idx = {}, {}, []
        for i, (e, g) in enumerate(zip(entries, grads)):
            # a bucket's codec checks its gradients (in the native update pass; a non-finite
            # one travels as a flag row of the message): no sum and no host sync per tensor;
            # a dense tensor is checked once reduced (eng.dense_result below), except in a
            # multi-round step, where every flag decides whether the rounds run (_finish_multi)
            finite, gc = eng.begin(e, g, n, check=(e.sparse and not fused) or (not e.sparse and multi))
            flags.append(FLAG_OK if finite else FLAG_NONFINITE)
            if not e.sparse:
                w = eng.wire_dense(g)
                dense_parts.append(w.reshape(-1))
                eng.record(e, w.numel() * w.element_size() + fb, g)
                continue
            if multi:
                if finite:
                    m.accumulate(e.layer, gc)
                eng.record(e, fb, g)
                continue
            # per-rank random draws (TernGrad, natural); the world (an allreduced fp16 sum)
            ctx = {"rank": self.transport.rank, "size": n}
            if fused:
                fz_grads[e.name] = gc
                fz_ctxs[e.name] = ctx
                fz_idx.append(i)
                continue
            if rs:
                rows, values = m.pick(e.layer, gc, finite)
                eng.record(e, fb, g, int(rows.numel()))
                rs_items.append((i, e.layer, rows, values))
                continue
            if finite:
                msg = m.encode(e.layer, gc, ctx)
                eng.hold_sent(e.layer, msg, ctx)   # a skipped step hands it back
            else:
                msg = m.empty_message(e.layer, g.device)
                ctx["sent_units"] = 0
            eng.record(e, fb, g, ctx.get("sent_units"))
            name = f"hvd_rsgc.{e.name}"
            if m.communicator == "allreduce":
                if not finite:
                    msg.fill_(float("nan"))
                h = self.transport.allreduce_async(msg, name, "average" if self.comp.average else "sum",
                                                   key=e.name)
            else:
                h = self.transport.allgather_async(msg, name, key=e.name)
            works.append((i, h, ctx))
        fz_handles, codec = [], None
        if fz_idx:             # one message per unit-size group for the whole DDP bucket
            codec = self._codec(bucket.index(), [entries[i] for i in fz_idx])
            msgs = codec.encode(fz_grads, fz_ctxs)
            eng.hold(lambda only=None, codec=codec, msgs=msgs: codec.give_back(msgs, only),
                     [entries[i].name for i in fz_idx])
            # recorded before the allgathers count their bytes: the first record of a step
            # opens the meter's step (a bucket without dense tensors had its bytes wiped)
            for i in fz_idx:
                eng.record(entries[i], fb, grads[i], fz_ctxs[entries[i].name].get("sent_units"))
            for msg, g in zip(msgs, codec.groups):
                fz_handles.append(self.transport.allgather_async(
                    msg, f"hvd_rsgc.ddp.bucket{bucket.index()}.s{g.S}", key=f"hvd_rsgc.ddp.bucket{bucket.index()}"))
        flat = torch.cat(dense_parts + [torch.tensor(flags, dtype=wire_dtype, device=buf.device)])
        op = "average" if self.comp.average else "sum"
        dense_h = self.transport.allreduce_async(flat, f"hvd_rsgc.ddp.bucket{bucket.index()}", op,
                                                 count=False)
        # the result goes into the bucket's own buffer, as DDP's allreduce hook returns it:
        # every gradient of it was read above (encode, the dense allreduce's copy), and a
        # fresh bucket-sized tensor would page-fault on every page each step
        out = buf
        views, starts, off = [], [], 0
        for g in grads:
            views.append(out[off:off + g.numel()].view_as(g))
            starts.append(off)
            off += g.numel()
        if off != buf.numel():
            raise RuntimeError(f"DDP bucket {bucket.index()}: gradients cover {off} of "
                               f"{buf.numel()} buffer elements")
        reduced = self.transport.wait(dense_h)
        bad = (reduced[-len(entries):] != FLAG_OK).tolist()      # one host sync per bucket
        done = {i: h for i, h, _ in works}
        fz_out, fz_direct = {}, False
        if codec is not None:                  # op=Average: divided in the decode itself
            gathered = [self.transport.wait(h) for h in fz_handles]
            divide = n if self.comp.average and n > 1 else 1
            # straight into the bucket's buffer where the codec can (native kernels, fp32 CPU
            # bucket): no decode buffer and no copy of it into the bucket
            fz_direct = codec.decode_into(gathered, out, {entries[i].name: starts[i] for i in fz_idx},
                                          divide)
            if not fz_direct:
                fz_out = codec.decode(gathered, divide=divide)
        fz_set = set(fz_idx) if fz_direct else set()
        rs_out = {}
        if rs_items:        # one balanced sparse reduce-scatter + allgather for the bucket
            sums, marks = self.comp.collective.exchange(
                m, [it[1:] for it in rs_items], self.transport,
                f"hvd_rsgc.ddp.bucket{bucket.index()}.rs")
            rs_out = {it[0]: (sm, mk, it[2], it[3]) for it, sm, mk in zip(rs_items, sums, marks)}
        ctxs = {i: c for i, _, c in works}
        d_off = 0
        for i, (e, g) in enumerate(zip(entries, grads)):
            if not e.sparse:
                part = reduced[d_off:d_off + g.numel()].view_as(g)
                d_off += g.numel()
                views[i].copy_(eng.dense_result(e, part, g.dtype) if not bad[i]
                               else eng.nonfinite_result(e, g))
                continue
            if multi:
                continue
            if i in fz_set or e.name in fz_out:        # averaged in the decode
                if e.name in codec.flagged:            # not finite on some rank
                    views[i].copy_(eng.nonfinite_result(e, g))
                elif i not in fz_set:                   # not decoded in place above
                    views[i].copy_(fz_out[e.name])
                continue
            if i in rs_out:
                dense, mk, *picked = rs_out[i]
                if bad[i]:
                    views[i].copy_(eng.nonfinite_result(e, g))
                    continue
                mk.apply()
                eng.hold(lambda only=None, mk=mk, picked=picked: mk.give_back(*picked), [e.name])
                if self.comp.average and n > 1:
                    dense.div_(n)
                views[i].copy_(dense.to(g.dtype))
                continue
            res = self.transport.wait(done[i])
            if bad[i] or (m.communicator == "allreduce" and not torch.isfinite(res).all()):
                views[i].copy_(eng.nonfinite_result(e, g))
                continue
            dense = m.decode(e.layer, res, n, ctxs[i])
            if m.communicator != "allreduce" and self.comp.average and n > 1:
                dense.div_(n)
            views[i].copy_(dense.to(g.dtype))
        fut = torch.futures.Future()
        if not multi:
            fut.set_result(out)
            if bucket.is_last():
                eng.end_step()
            return fut
        self._pending.append((fut, out, views, entries, bad))
        if bucket.is_last():
            self._finish_multi()
            eng.end_step()
        return fut

    def pre_step(self) -> None:
        """The optimizer's step (``Compressor._pre_step``): a parameter that went through this
        step's hook but has no gradient was used by no rank (DDP's ``find_unused_parameters``
        / static graphs leave such a ``.grad`` untouched, dropping the hook's result), so what
        this rank sent of it goes back into its residual, and a dense tensor's local momentum
        (DGC, RS-DGC) is restored: nothing sent is lost. (With
        ``zero_grad(set_to_none=False)`` such a gradient is a zero tensor, indistinguishable
        from a used one.)"""
        self.engine.give_back_unused(lambda e: e.param.grad is None)

    def _codec(self, index: int, entries):
        from ..algorithms.bucket import BucketCodec
        key = (index, tuple(e.name for e in entries))
        codec = self._codecs.get(key)
        if codec is None:
            # DDP rebuilt its buckets (after the first iteration): the codec of the bucket that
            # had this index goes, with its workspaces and flat buffers (the residuals live in
            # the layers' state and move into the new codec's buffers)
            for old in [k for k in self._codecs if k[0] == index]:
                del self._codecs[old]
            codec = self._codecs[key] = BucketCodec(self.method, [e.layer for e in entries])
        return codec

    def _finish_multi(self) -> None:
        """Run a multi-round method over every compressed tensor of the step, then complete
        the futures of all buckets of the step."""
        pending, self._pending = self._pending, []
        eng, m = self.engine, self.method
        rows = eng.table.compressed
        by_name = {}
        if any(b for *_, bad in pending for b in bad):
            for _, _, views, entries, _ in pending:
                for v, e in zip(views, entries):
                    if e.sparse:
                        v.copy_(eng.nonfinite_result(e, v, ROUNDS_SKIPPED))
        else:
            outs = m.run([r.layer for r in rows], self.transport, self.comp.average,
                         max(r.layer.step for r in rows))
            by_name = {r.name: o for r, o in zip(rows, outs)}
            for _, _, views, entries, _ in pending:
                for v, e in zip(views, entries):
                    if e.sparse:
                        v.copy_(by_name[e.name].to(v.dtype))
        for fut, out, *_ in pending:
            fut.set_result(out)
