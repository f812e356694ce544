"""DGC-style SGD: momentum only on the weight-decay term.

With momentum correction (DGC, RS-DGC) the aggregated gradient G already carries momentum, so
the optimizer must not apply momentum to it again (deep-gradient-compression optim/sgd.py):

    d = wd * w;  buf = m*buf + d;  (nesterov: d = d + m*buf, else d = buf);  w -= lr * (d + G)

``lr`` has a default only because Horovod re-creates the optimizer from its param groups
(each group carries its own lr). With ``momentum=0`` or ``weight_decay=0`` it is plain SGD on G. The compressors' optimizer check
refuses ``torch.optim.SGD(momentum>0)`` next to a momentum-correcting compressor, and refuses
this optimizer next to a compressor that does no momentum correction.
"""
from __future__ import annotations

import torch

from .algorithms.memory import check_momentum


class DGCSGD(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        check_momentum(momentum)
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, m, wd, nest = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if wd != 0:
                    dw = p.mul(wd)
                    if m != 0:
                        st = self.state[p]
                        buf = st.get("momentum_buffer")
                        if buf is None:
                            buf = st["momentum_buffer"] = dw.clone()
                        else:
                            buf.mul_(m).add_(dw)
                        dw = dw.add(buf, alpha=m) if nest else buf
                    d = d.add(dw)
                p.add_(d, alpha=-lr)
        return loss
