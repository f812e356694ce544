"""A multi-round method's (LGC) accumulators across one step, for the non-finite skip tests of
both bindings (worker.py under horovodrun, ddp_worker.py under torchrun)."""
import torch


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
