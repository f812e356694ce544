"""The Transport role: how a compressor's messages travel. Backend-neutral interface here;
implementations live with their backend (``hvd_rsgc/horovod/transport.py`` for Horovod,
``hvd_rsgc/ddp/transport.py`` for ``torch.distributed``) and :class:`LocalTransport` (one
process, ``-np 1``) is below.

Every collective takes a stable ``name`` (Horovod pairs operations across ranks by name) and
is counted in the :class:`~hvd_rsgc.engine.ByteMeter` under ``key`` (default: the name):
the bytes *this rank submits* -- allreduce and allgather: the tensor it contributes;
broadcast: the tensor at the root, nothing elsewhere; alltoall: what it sends to other ranks.
The meter also counts what this rank *receives* (``step_received_bytes``): allgather and
alltoall measured from the results (other ranks' rows), broadcast the tensor off the root, and
allreduce as a ring delivers it, ``2(P-1)/P`` of the tensor (a model: the backend's algorithm
is not visible here).

Async calls return a :class:`Handle`; ``wait(handle)`` returns the result. A blocking form of
each call is provided. Methods that need several dependent rounds (LGC, PowerSGD) run them
through a transport, so their logic stays pure code under ``algorithms/``.
"""
from __future__ import annotations

from typing import Any

import torch

OPS = ("average", "sum")


class Handle:
    """A pending collective: the backend's handle (or the finished result) and a finisher."""

    __slots__ = ("pending", "finish")

    def __init__(self, pending: Any, finish=None):
        self.pending = pending
        self.finish = finish


class Transport:
    """Base class: subclasses implement the ``_*`` primitives; this class counts bytes."""

    rank: int = 0
    size: int = 1

    def __init__(self, meter=None):
        self.meter = meter

    # -- counted public calls ------------------------------------------------------------
    def allreduce_async(self, t: torch.Tensor, name: str, op: str = "average", key=None,
                        count: bool = True) -> Handle:
        """``count=False``: the caller records these bytes itself, per tensor (a fused
        allreduce of several tensors)."""
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        nbytes = t.numel() * t.element_size()
        if count:
            self._count(key or name, nbytes)
        n = self.size        # received: what a ring allreduce delivers to each rank, 2(P-1)/P
        return self._received(self._allreduce(t, name, op), lambda out: 2 * nbytes * (n - 1) // n)

    def allgather_async(self, t: torch.Tensor, name: str, key=None) -> Handle:
        """Concatenate every rank's ``t`` along dim 0 (first dimensions may differ)."""
        own = t.numel() * t.element_size()
        self._count(key or name, own)
        return self._received(self._allgather(t, name, key or name),
                              lambda out: out.numel() * out.element_size() - own)

    def broadcast_async(self, t: torch.Tensor, root: int, name: str, key=None) -> Handle:
        nbytes = t.numel() * t.element_size()
        self._count(key or name, nbytes if self.rank == root else 0)
        return self._received(self._broadcast(t, root, name),
                              lambda out: 0 if self.rank == root else nbytes)

    def alltoall_async(self, t: torch.Tensor, splits: list[int], name: str, key=None) -> Handle:
        """Send ``t``'s rows ``splits[j]`` to rank j; the result is (rows received in rank order,
        the received splits)."""
        if len(splits) != self.size or sum(splits) != t.shape[0]:
            raise ValueError(f"splits {splits} must have {self.size} entries summing to {t.shape[0]}")
        row = int(torch.Size(t.shape[1:]).numel()) * t.element_size()
        self._count(key or name, row * (sum(splits) - splits[self.rank]))
        me = self.rank
        return self._received(self._alltoall(t, splits, name, key or name),
                              lambda out: row * (sum(out[1]) - out[1][me]))

    def _received(self, h: Handle, nbytes) -> Handle:
        """Count what this rank received once the collective finished (``nbytes(result)``)."""
        meter, inner = self.meter, h.finish

        def finish(out):
            res = inner(out) if inner is not None else out
            if meter is not None:
                meter.add_received(nbytes(res))
            return res
        return Handle(h.pending, finish)

    def wait(self, h: Handle):
        out = self._wait(h.pending)
        return h.finish(out) if h.finish is not None else out

    def allreduce(self, t, name, op="average", key=None):
        return self.wait(self.allreduce_async(t, name, op, key))

    def allgather(self, t, name, key=None):
        return self.wait(self.allgather_async(t, name, key))

    def broadcast(self, t, root, name, key=None):
        return self.wait(self.broadcast_async(t, root, name, key))

    def alltoall(self, t, splits, name, key=None):
        return self.wait(self.alltoall_async(t, splits, name, key))

    def _count(self, key: str, nbytes: int) -> None:
        if self.meter is not None:
            self.meter.add(key, nbytes)

    # -- primitives ----------------------------------------------------------------------
    def _allreduce(self, t, name, op) -> Handle:
        raise NotImplementedError

    def _allgather(self, t, name, key) -> Handle:
        """``key``: where a backend counts bytes it adds (size exchanges, padding)."""
        raise NotImplementedError

    def _broadcast(self, t, root, name) -> Handle:
        raise NotImplementedError

    def _alltoall(self, t, splits, name, key) -> Handle:
        raise NotImplementedError

    def _wait(self, pending):
        return pending


class LocalTransport(Transport):
    """One process: every collective returns its input (a copy where the backend would have
    produced a fresh tensor). Used at ``-np 1``, where Horovod runs no collective at all."""

    rank, size = 0, 1

    def _allreduce(self, t, name, op):
        return Handle(t.clone())

    def _allgather(self, t, name, key):
        return Handle(t)

    def _broadcast(self, t, root, name):
        if root != 0:
            raise ValueError(f"broadcast root {root} out of range for a 1-process transport")
        return Handle(t)

    def _alltoall(self, t, splits, name, key):
        return Handle((t, list(splits)))
