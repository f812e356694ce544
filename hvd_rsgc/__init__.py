"""hvd_rsgc: gradient compression for Horovod (RS-DGC, DGC, Top-k, Random-k, QSGD, fp16).

    import horovod.torch as hvd
    from hvd_rsgc import RSDGCCompression, DGCSGD
    hvd.init()
    compression = RSDGCCompression(model, density=0.001)
    optimizer = hvd.DistributedOptimizer(DGCSGD(model.parameters(), lr=0.1, weight_decay=1e-4),
                                         named_parameters=model.named_parameters(),
                                         compression=compression)

Layout: ``hvd_rsgc/algorithms/`` is pure tensor code (NSI lives in ``algorithms/nsi.py``);
``hvd_rsgc/adapter.py`` is the only module that talks to Horovod.
"""
from .compression import (DGCCompression, FP16Compression, NoneCompression, QSGDCompression,
                          RandomKCompression, RSDGCCompression, TopKCompression)
from .lgc import LGCCompression
from .optim import DGCSGD

__version__ = "0.1.0"
__all__ = ["RSDGCCompression", "DGCCompression", "TopKCompression", "RandomKCompression",
           "QSGDCompression", "FP16Compression", "NoneCompression", "LGCCompression", "DGCSGD"]
