"""The only package that imports Horovod: the compression binding for the stock
``hvd.DistributedOptimizer`` (``binding.py``), the Horovod transport (``transport.py``) and fixed
allreduce groups for bit-reproducible runs (``deterministic.py``)."""


def horovod_torch():
    """``horovod.torch``, imported on first use (the application reaches Horovod through here)."""
    import horovod.torch as hvd
    return hvd
