"""Horovod implementation of :class:`hvd_rsgc.transport.Transport` (async collectives on a
process set, counted by the byte meter)."""
from __future__ import annotations

from ..transport import Handle, Transport


def hvd():
    import horovod.torch as _hvd
    return _hvd


class HorovodTransport(Transport):
    def __init__(self, meter=None, process_set=None):
        super().__init__(meter)
        self._process_set = process_set

    @property
    def process_set(self):
        return self._process_set if self._process_set is not None else hvd().global_process_set

    @property
    def rank(self) -> int:
        return self.process_set.rank()

    @property
    def size(self) -> int:
        return self.process_set.size()

    def _allreduce(self, t, name, op):
        h = hvd()
        return Handle(h.allreduce_async(t, name=name, op=h.Average if op == "average" else h.Sum,
                                        process_set=self.process_set))

    def _allgather(self, t, name, key):
        return Handle(hvd().allgather_async(t, name=name, process_set=self.process_set))

    def _broadcast(self, t, root, name):
        return Handle(hvd().broadcast_async(t, root_rank=root, name=name,
                                            process_set=self.process_set))

    def _alltoall(self, t, splits, name, key):
        import torch
        h = hvd().alltoall_async(t.contiguous(), splits=torch.tensor(splits, dtype=torch.int32),
                                 name=name, process_set=self.process_set)
        return Handle(h, lambda res: (res[0], [int(x) for x in res[1]]))

    def _wait(self, pending):
        return hvd().synchronize(pending)
