"""hvd_rsgc: gradient compression for Horovod and PyTorch DDP (RS-DGC, DGC, Top-k, Random-k,
QSGD, fp16, LGC, PowerSGD, signSGD, EF-signSGD, TernGrad, natural compression, threshold;
RD-PSGD for decentralized training).

    import horovod.torch as hvd
    import hvd_rsgc
    hvd.init()
    compression = hvd_rsgc.RSDGCCompression(model, density=0.001)
    optimizer = hvd.DistributedOptimizer(hvd_rsgc.DGCSGD(model.parameters(), lr=0.1, weight_decay=1e-4),
                                         named_parameters=model.named_parameters(),
                                         compression=compression)

Where things live (a boundary test keeps it true):
``algorithms/``  pure tensor code: methods, memories, selection, NSI, layouts, densities
``engine.py``    backend-neutral per-parameter state, density schedule, byte meter, state I/O
``transport.py`` the Transport interface (+ the 1-process transport)
``compressor.py`` the public compressors' base; ``compression.py`` the compressors
``registry.py``  ``make_compression(name, model, **options)``, ``make_optimizer``
``horovod/``     the only importer of horovod;  ``ddp/`` of torch.distributed;  ``mpi/`` of mpi4py
``app/``         the training application (config, data, models, strategies, loop, reports)
"""
from .compression import (DGCCompression, EFSignSGDCompression, FP16Compression, LGCCompression,
                          NaturalCompression, NoneCompression, PowerSGDCompression,
                          QSGDCompression, RandomKCompression, RSDGCCompression,
                          SignSGDCompression, TernGradCompression, ThresholdCompression,
                          TopKCompression)
from .compressor import Compressor
from .optim import DGCSGD
from .registry import make_compression, make_optimizer, register


def __getattr__(name):
    if name == "ddp_comm_hook":        # imported on first use: torch.distributed stays unloaded
        from .ddp.hook import ddp_comm_hook
        return ddp_comm_hook
    raise AttributeError(f"module 'hvd_rsgc' has no attribute {name!r}")


__version__ = "0.2.0"
__all__ = ["RSDGCCompression", "DGCCompression", "TopKCompression", "RandomKCompression",
           "QSGDCompression", "FP16Compression", "NoneCompression", "LGCCompression",
           "PowerSGDCompression", "SignSGDCompression", "EFSignSGDCompression",
           "TernGradCompression", "NaturalCompression", "ThresholdCompression", "DGCSGD",
           "Compressor", "make_compression", "make_optimizer", "register", "ddp_comm_hook"]
