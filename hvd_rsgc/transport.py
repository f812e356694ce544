"""The Transport role: how a compressor's messages travel. Backend-neutral interface here;
implementations live with their backend (``hvd_rsgc/horovod/transport.py`` for Horovod,
``hvd_rsgc/ddp/transport.py`` for ``torch.distributed``) and :class:`LocalTransport` (one
process, ``-np 1``) is below.

Every collective takes a stable ``name`` (Horovod pairs operations across ranks by name) and
is counted in the :class:`~hvd_rsgc.engine.ByteMeter` under ``key`` (default: the name):
the bytes *this rank submits* -- allreduce and allgather: the tensor it contributes;
broadcast: the tensor at the root, nothing elsewhere; alltoall: what it sends to other ranks.

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
        if count:
            self._count(key or name, t.numel() * t.element_size())
        return self._allreduce(t, name, op)

    def allgather_async(self, t: torch.Tensor, name: str, key=None) -> Handle:
        """Concatenate every rank's ``t`` along dim 0 (first dimensions may differ)."""
        self._count(key or name, t.numel() * t.element_size())
        return self._allgather(t, name, key or name)

    def broadcast_async(self, t: torch.Tensor, root: int, name: str, key=None) -> Handle:
        self._count(key or name, t.numel() * t.element_size() if self.rank == root else 0)
        return self._broadcast(t, root, name)

    def alltoall_async(self, t: torch.Tensor, splits: list[int], name: str, key=None) -> Handle:
        """Send ``t``'s rows ``splits[j]`` to rank j; the result is (rows received in rank order,
        the received splits)."""
        if len(splits) != self.size or sum(splits) != t.shape[0]:
            raise ValueError(f"splits {splits} must have {self.size} entries summing to {t.shape[0]}")
        row = t[0].numel() * t.element_size() if t.shape[0] else 0
        self._count(key or name, row * (sum(splits) - splits[self.rank]))
        return self._alltoall(t, splits, name, key or name)

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
