"""Compressor state across a skipped step, for the non-finite skip tests of both bindings
(worker.py under horovodrun, ddp_worker.py under torchrun): a multi-round method's (LGC)
accumulators, and what a single-round method sent in the skipped step (``given_back``)."""
import torch

from hvd_rsgc.algorithms.layout import Workspace


def watch(comp, params: dict):
    """Before backward: each compressed layer's accumulator ``v`` copied, and a hook on its
    parameter that keeps the gradient the compressor is given (registered after any hook that
    alters it). Returns ``(before, caught, hooks)``; remove the hooks after backward."""
    before = {e.name: e.layer.memory["v"].clone() for e in comp.engine.table.compressed}
    caught: dict = {}
    hooks = [params[n].register_hook(lambda g, n=n: caught.__setitem__(n, g.clone()))
             for n in before]
    return before, caught, hooks


def kept(comp, before: dict, caught: dict) -> bool:
    """After the step: every accumulator holds exactly what it held plus this rank's gradient
    where that was finite, else what it held (nothing of it sent and thrown away)."""
    return all(torch.equal(e.layer.memory["v"],
                           before[e.name] + caught[e.name].reshape(-1).float()
                           if bool(torch.isfinite(caught[e.name]).all()) else before[e.name])
               for e in comp.engine.table.compressed)


def given_back(comp, before, after, grads):
    """After a skipped step, this rank's state holds all of its gradient of that step: the
    residual is ``v1 + (m*u1 + g)`` (error feedback: ``e1 + g``), the units it sent in the
    skipped step included, and ``u`` is ``m*u1 + g`` or 0 where momentum masking zeroed a sent
    unit (to rounding: the kernels may fuse the multiply-add). ``before`` / ``after``:
    state_dicts around the step; ``grads``: this rank's raw gradients of it (a non-finite
    one's layer is left out). Returns the number of tensors checked, or what differed."""
    checked = 0
    for e in comp.engine.table.compressed:
        g = grads[e.name]
        b, a = before["layers"][e.name]["memory"], after["layers"][e.name]["memory"]
        if not bool(torch.isfinite(g).all()) or not b:
            continue
        key = "v" if "v" in a else "e"
        gs = e.layer.layout.storage(g.float(), Workspace()).reshape(a[key].shape)
        if key == "v":
            m = comp.momentum
            u = torch.add(gs, b["u"], alpha=m)
            tol = 1e-6 * (m * b["u"].abs() + gs.abs()) + 1e-12      # the operands' rounding
            if not bool(((a["v"] - b["v"] - u).abs() <= tol + 1e-6 * b["v"].abs()).all()):
                return f"{e.name}: v differs by {(a['v'] - b['v'] - u).abs().max().item():.3g}"
            if not bool((((a["u"] - u).abs() <= tol) | (a["u"] == 0)).all()):
                return f"{e.name}: u differs"
        # a dense method (QSGD, EF-signSGD) subtracted and added back values of the tensor's
        # own scale: rounding to that scale
        elif not bool(((a["e"] - b["e"] - gs).abs()
                       <= 1e-5 * (b["e"].abs().max() + gs.abs().max()) + 1e-12).all()):
            return f"{e.name}: e differs by {(a['e'] - b['e'] - gs).abs().max().item():.3g}"
        checked += 1
    return checked
