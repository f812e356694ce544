"""Count the bytes each rank submits to Horovod's collectives, independently of hvd_rsgc.

Wraps every ``horovod_torch_{allreduce,allgather,broadcast,alltoall,grouped_*}_async_*`` entry
point of Horovod's C extension (``horovod.torch.mpi_ops.mpi_lib``): whatever Python path a
collective takes (the stock optimizer, ``hvd.allgather_async``, ...), its input tensor passes
through one of these. Allreduce/allgather/alltoall count the whole input tensor; broadcast
counts on the root only (see ../shared/ALGORITHMS.md section 7).
"""
import collections

import horovod.torch.mpi_ops as mpi_ops

KINDS = ("grouped_allreduce", "grouped_allgather", "allreduce", "allgather", "broadcast",
         "alltoall", "reducescatter", "grouped_reducescatter")


class WireCounter:
    def __init__(self):
        self.records = []          # (kind, name, bytes)
        self.own = 0               # alltoall bytes addressed to this rank itself (since take)
        self.last_own = 0          # ... up to the last take()
        self._installed = []

    def install(self):
        lib = mpi_ops.mpi_lib
        for attr in dir(lib):
            if not attr.startswith("horovod_torch_") or "_async_" not in attr:
                continue
            kind = attr[len("horovod_torch_"):].split("_async_")[0]
            if kind not in KINDS:
                continue
            orig = getattr(lib, attr)
            setattr(lib, attr, self._wrap(kind, orig))
            self._installed.append((attr, orig))
        assert self._installed, "no Horovod collective entry points found to intercept"
        return self

    def uninstall(self):
        lib = mpi_ops.mpi_lib
        for attr, orig in self._installed:
            setattr(lib, attr, orig)
        self._installed = []

    def _wrap(self, kind, fn):
        def wrapper(*args):
            tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            name = next((a.decode() for a in args if isinstance(a, bytes)), "<noname>")
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            if kind == "broadcast":
                root = args[2]
                if root != mpi_ops.rank():
                    nbytes = 0
            if kind == "alltoall" and args[1].numel() and tensors[0].shape[0]:
                # (tensor, splits, ...): splits[r] rows go to rank r; this rank's own never
                # leave it (global ranks: the tests' process set is the global one)
                t = tensors[0]
                row = t.numel() // t.shape[0] * t.element_size()
                self.own += int(args[1][mpi_ops.rank()]) * row
            self.records.append((kind, name, nbytes))
            return fn(*args)
        return wrapper

    def take(self):
        """Records since the last take(), summed by name -> {name: (kind, bytes)}."""
        out = collections.OrderedDict()
        for kind, name, nbytes in self.records:
            k0, b0 = out.get(name, (kind, 0))
            out[name] = (k0, b0 + nbytes)
        self.records = []
        self.last_own, self.own = self.own, 0
        return out
