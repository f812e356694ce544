"""What the training application needs from its process group, over plain MPI (mpi4py), with
the same names as ``horovod.torch`` (rank, size, allreduce, broadcast_object, barrier, ...).

RD-PSGD / D-PSGD (``--algorithm rdpsgd|dpsgd``) exchange parameters with their own MPI
point-to-point calls and need nothing from Horovod. Initialising Horovod anyway starts its
background thread, which negotiates over MPI every cycle and busy-polls Open MPI's progress
engine while ranks wait for one another: on a box where ranks share cores it takes CPU from
the exchange itself. So the decentralized strategies run on this group instead; it is used
only between epochs (metrics, buffers, checkpoints), never in the step.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

_ACTIVE = None          # the group this process initialised (abort_peers ends its job)


def active_size() -> int:
    """Ranks of the MPI group this process initialised (0: none)."""
    return 0 if _ACTIVE is None or _ACTIVE._comm is None else _ACTIVE.size()


def abort_peers(why: str) -> None:
    """A rank that fails outside the exchange (checkpoint, evaluation, ...) would leave the
    other ranks waiting in a collective without a timeout, and mpi4py's ``MPI_Finalize`` at
    exit would wait for them too: the job would hang. ``MPI_Abort`` ends every rank instead
    (what ``python -m mpi4py`` does for an uncaught exception). No-op outside an MPI group of
    more than one rank."""
    if active_size() < 2:
        return
    g = _ACTIVE
    print(f"hvd_rsgc: rank {g.rank()} failed ({why}); aborting the MPI job so that no rank "
          "waits for it", file=sys.stderr, flush=True)
    g._comm.Abort(1)


class MPIProcessGroup:
    Sum, Average = "sum", "average"

    def __init__(self, comm=None):
        self._comm = comm
        self._local = None

    def init(self) -> None:
        from mpi4py import MPI
        if self._comm is None:
            self._comm = MPI.COMM_WORLD
            launched = int(os.environ.get("HOROVOD_SIZE", "0") or 0)
            if launched > self._comm.Get_size():        # horovodrun --gloo: no MPI world
                raise ValueError("algorithm rdpsgd/dpsgd exchanges parameters over MPI: launch "
                                 "with mpirun or horovodrun --mpi (this job's MPI world has "
                                 f"{self._comm.Get_size()} process(es), the launcher started "
                                 f"{launched})")
        if self._local is None:
            self._local = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self._comm.Get_rank())
        global _ACTIVE
        _ACTIVE = self

    @property
    def comm(self):
        if self._comm is None:
            raise ValueError("MPIProcessGroup: call init() first")
        return self._comm

    def rank(self) -> int:
        return self.comm.Get_rank()

    def size(self) -> int:
        return self.comm.Get_size()

    def local_rank(self) -> int:
        return self._local.Get_rank()

    def local_size(self) -> int:
        return self._local.Get_size()

    def allreduce(self, t: torch.Tensor, op="average", name=None) -> torch.Tensor:
        """Sum (or average) of ``t`` over the ranks, as a new tensor on ``t``'s device; the same
        bits on every rank (MPI reduces in one order for all)."""
        from mpi4py import MPI
        if op not in (self.Sum, self.Average):
            raise ValueError(f"allreduce op must be Sum or Average, got {op!r}")
        src = t.detach().cpu().contiguous()
        half = src.dtype in (torch.float16, torch.bfloat16)     # no MPI (or numpy) type: in fp32
        a = (src.float() if half else src).numpy()
        out = np.empty_like(a)
        self.comm.Allreduce(a, out, op=MPI.SUM)
        res = torch.from_numpy(out)
        if op == self.Average:
            res = res / self.size() if res.is_floating_point() else res // self.size()
        return res.to(device=t.device, dtype=t.dtype)

    def broadcast_object(self, obj, root_rank=0, name=None):
        return self.comm.bcast(obj, root=root_rank)

    def allgather_object(self, obj, name=None) -> list:
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()

    def broadcast_parameters(self, state: dict, root_rank=0) -> None:
        """Root's tensors copied into every rank's (in place, as Horovod does)."""
        for t in state.values():
            if isinstance(t, torch.Tensor):
                buf = t.detach().cpu().contiguous()
                self.comm.Bcast(buf.numpy() if buf.dtype != torch.bfloat16 else
                                buf.view(torch.int16).numpy(), root=root_rank)
                if self.rank() != root_rank:
                    with torch.no_grad():
                        t.copy_(buf.to(t.device))

    def broadcast_optimizer_state(self, optimizer, root_rank=0) -> None:
        """The root's optimizer state (hyper-parameters and buffers) loaded on every rank."""
        state = self.comm.bcast(optimizer.state_dict() if self.rank() == root_rank else None,
                                root=root_rank)
        if self.rank() != root_rank:
            optimizer.load_state_dict(state)

    def shutdown(self) -> None:
        pass
