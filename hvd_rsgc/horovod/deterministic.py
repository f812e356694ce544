"""Bit-reproducible runs under Horovod: every allreduce buffer fixed, step after step, run after run.

Why a run drifts without it: Horovod's background loop fuses whichever tensors happen to be
ready in a cycle into one buffer. Which tensors share a buffer -- and so where an element sits
in it, which decides the order in which a ring of P >= 3 ranks sums that element -- depends on
timing, and floating-point addition is not associative. Two runs of one seed then differ in
the last bits after the first step, and training amplifies that (measured on VGG-19 with 4
ranks: a different model after 40 steps; README, "Reproducible runs").

The fix keeps fusion: the trainable parameters are cut into fixed groups (8 MiB) in the order
backward produces their gradients (reverse registration order, like DDP's buckets), each group is
allreduced as one unit when its last gradient is ready, and ``HOROVOD_DISABLE_GROUP_FUSION=1``
stops Horovod from fusing a group with anything else. Allgathers (the sparse methods'
messages) are exact whatever their fusion, so they need nothing.

    import hvd_rsgc.horovod.deterministic as det
    det.enable()                                  # before hvd.init()
    hvd.init()
    opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                   compression=comp, groups=det.groups(model))
"""
from __future__ import annotations

import os

import torch

ENV = "HOROVOD_DISABLE_GROUP_FUSION"
DEFAULT_GROUP_MB = 8.0     # measured (README, "Reproducible runs"): 8 MiB groups cost ~3% an epoch
                           # against Horovod's own fusion, 25 MiB (DDP's bucket cap) ~17%, 64 ~20%


def enable() -> None:
    """Set ``HOROVOD_DISABLE_GROUP_FUSION=1`` for this process; Horovod reads it in ``hvd.init()``,
    so this must come first (an error says so otherwise)."""
    from . import horovod_torch
    hvd = horovod_torch()
    if hvd.is_initialized() and os.environ.get(ENV) != "1":
        raise RuntimeError(f"deterministic.enable() must run before hvd.init(): Horovod read "
                           f"{ENV} when it started (or launch with {ENV}=1 in the environment)")
    os.environ[ENV] = "1"


def groups(model_or_params, group_mb: float = DEFAULT_GROUP_MB) -> list[list[torch.nn.Parameter]]:
    """The trainable parameters of ``model_or_params`` (a module, or an iterable of parameters
    or of ``(name, parameter)`` pairs) in reverse registration order, cut into consecutive
    groups of at most ``group_mb`` MiB (a larger parameter is a group of its own); the
    ``groups=`` argument of ``hvd.DistributedOptimizer``. The same model gives the same groups
    on every rank and in every run."""
    if not isinstance(group_mb, (int, float)) or isinstance(group_mb, bool) or not group_mb > 0:
        raise ValueError(f"group_mb must be a positive number of MiB, got {group_mb!r}")
    if isinstance(model_or_params, torch.nn.Module):
        params = list(model_or_params.parameters())
    else:
        params = [p[1] if isinstance(p, tuple) else p for p in model_or_params]
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("groups: no trainable parameters")
    cap = group_mb * 2**20
    out: list[list[torch.nn.Parameter]] = []
    size = 0.0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if out and size + nbytes <= cap:
            out[-1].append(p)
            size += nbytes
        else:
            out.append([p])
            size = nbytes
    return out
