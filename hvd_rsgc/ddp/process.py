"""What the training application needs from a ``torch.distributed`` process group, with the
same names as ``horovod.torch`` (rank, size, allreduce, broadcast_object, barrier, ...), so the
loop runs unchanged under ``torchrun`` (``--backend ddp``)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def backend_spec() -> str:
    """The process group's backends: with CUDA, NCCL for CUDA tensors and Gloo for CPU ones --
    NCCL alone has no backend for a CPU tensor, and the loop reduces CPU tensors (its metrics
    and counts), and ``--device cpu`` on a GPU machine runs DDP on the CPU. Gloo alone without
    CUDA, or with ``HVD_RSGC_DDP_BACKEND=gloo``."""
    if torch.cuda.is_available() and os.environ.get("HVD_RSGC_DDP_BACKEND") != "gloo":
        return "cpu:gloo,cuda:nccl"
    return "gloo"


class TorchProcessGroup:
    Sum, Average = "sum", "average"

    def init(self) -> None:
        if not dist.is_initialized():
            if "RANK" not in os.environ:
                raise ValueError("backend ddp: launch with torchrun (python -m torch.distributed.run "
                                 "--nproc_per_node N ...); RANK/WORLD_SIZE are not set")
            dist.init_process_group(backend_spec())

    def rank(self) -> int:
        return dist.get_rank()

    def size(self) -> int:
        return dist.get_world_size()

    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))

    def local_size(self) -> int:
        return int(os.environ.get("LOCAL_WORLD_SIZE", 1))

    def allreduce(self, t: torch.Tensor, op="average", name=None) -> torch.Tensor:
        if op not in (self.Sum, self.Average):
            raise ValueError(f"allreduce: op must be {self.Sum!r} or {self.Average!r}, got {op!r}")
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        if op == self.Average:
            out = out / self.size() if out.is_floating_point() else out // self.size()
        return out

    def broadcast_object(self, obj, root_rank=0, name=None):
        box = [obj]
        dist.broadcast_object_list(box, src=root_rank)
        return box[0]

    def allgather_object(self, obj, name=None) -> list:
        out = [None] * self.size()
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_parameters(self, state: dict, root_rank=0) -> None:
        for t in state.values():
            if isinstance(t, torch.Tensor):
                dist.broadcast(t, src=root_rank)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_ddp(model, **kw):
    """``DistributedDataParallel(model)`` (device ids set on CUDA)."""
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        kw.setdefault("device_ids", [dev.index])
    return torch.nn.parallel.DistributedDataParallel(model, **kw)
