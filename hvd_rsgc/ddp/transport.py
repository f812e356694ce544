"""``torch.distributed`` implementation of :class:`hvd_rsgc.transport.Transport` (Gloo on CPU,
NCCL on GPU), for the DDP comm hook and for anything else that runs on a process group.

``torch.distributed`` pairs collectives by call order, not by name: every rank must issue the
same collectives in the same order (DDP's buckets are in the same order on every rank). Names
are kept for the byte meter and error messages. Allgather of tensors whose first dimension
differs per rank (sparse messages) exchanges the sizes first (8 bytes), pads to the largest and
trims; alltoall exchanges the split sizes first (8 bytes to each other rank). Both extras are
real bytes on the wire and are counted.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..transport import Handle, Transport


class TorchDistTransport(Transport):
    def __init__(self, meter=None, group=None):
        super().__init__(meter)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchDistTransport needs torch.distributed.init_process_group() first")
        self.group = group

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    def _allreduce(self, t, name, op):
        out = t.clone()
        n = self.size
        # fp16 / bf16 averages are divided before the sum, as PyTorch's fp16_compress_hook
        # does: a sum of P fp16 gradients overflows to inf where their average does not
        pre = op == "average" and n > 1 and out.dtype in (torch.float16, torch.bfloat16)
        if pre:
            out.div_(n)
        work = dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

        def finish(_):
            return out.div_(n) if op == "average" and not pre else out
        return Handle(work, finish)

    def _allgather(self, t, name, key):
        t = t.contiguous()
        n = self.size
        if n == 1:
            return Handle(None, lambda _: t.clone())
        rows = torch.tensor([t.shape[0] if t.dim() else 1], dtype=torch.int64, device=t.device)
        sizes = [torch.zeros_like(rows) for _ in range(n)]
        dist.all_gather(sizes, rows, group=self.group)          # small, blocking
        counts = [int(s) for s in sizes]
        top = max(counts)
        row = (t[0].numel() if t.shape[0] else int(torch.tensor(t.shape[1:]).prod())) \
            * t.element_size() if t.dim() else 0         # the padding of an empty message counts too
        self._count(key, rows.element_size() + (top - counts[self.rank]) * row)
        pad = t
        if t.shape[0] < top:
            pad = torch.cat([t, t.new_zeros((top - t.shape[0],) + tuple(t.shape[1:]))])
        outs = [torch.empty_like(pad) for _ in range(n)]
        work = dist.all_gather(outs, pad, group=self.group, async_op=True)

        def finish(_):
            return torch.cat([o[:c] for o, c in zip(outs, counts)])
        return Handle(work, finish)

    def _broadcast(self, t, root, name):
        out = t.clone()
        src = root if self.group is None else dist.get_global_rank(self.group, root)  # group rank -> global
        work = dist.broadcast(out, src=src, group=self.group, async_op=True)
        return Handle(work, lambda _: out)

    def _alltoall(self, t, splits, name, key):
        t = t.contiguous()
        n = self.size
        self._count(key, 8 * (n - 1))
        send = torch.tensor(splits, dtype=torch.int64, device=t.device)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)      # sizes first, blocking
        rsplits = [int(x) for x in recv]
        out = t.new_empty((sum(rsplits),) + tuple(t.shape[1:]))
        if n == 1:
            out.copy_(t)
            return Handle(None, lambda _: (out, rsplits))
        work = dist.all_to_all_single(out, t, output_split_sizes=rsplits,
                                      input_split_sizes=list(splits), group=self.group,
                                      async_op=True)
        return Handle(work, lambda _: (out, rsplits))

    def _wait(self, pending):
        if pending is not None:
            pending.wait()
        return None
