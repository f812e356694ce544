"""GRACE-breadth compressors (PowerSGD, signSGD, EF-signSGD, TernGrad, natural, threshold)
under horovodrun, through the stock ``hvd.DistributedOptimizer``; rank<r>.json per rank.

Per method: a few steps on worker.py's learnable task; after every step the bytes this rank
submitted to Horovod's collectives (intercepted by wirecount.py), the library's own count,
its per-layer records and whether the parameters are bit-identical across ranks; eval loss
before and after."""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import horovod.torch as hvd  # noqa: E402

import hvd_rsgc  # noqa: E402
from wirecount import WireCounter  # noqa: E402
from worker import Net, eval_loss, flat_params, make_data  # noqa: E402

MIN_NUMEL = 100
# method -> (registered name, options, lr); signSGD's step is +-lr per element: a small lr
METHODS = {
    "powersgd": ("powersgd", {"rank": 2}, 0.1),
    "signsgd": ("signsgd", {}, 0.002),
    "efsignsgd": ("efsignsgd", {}, 0.1),
    "terngrad": ("terngrad", {}, 0.1),
    "natural": ("natural", {}, 0.1),
    "threshold": ("threshold", {"threshold": 0.005}, 0.1),
}


def identical(model):
    allp = hvd.allgather(flat_params(model).unsqueeze(0), name="test.params")
    return bool(all(torch.equal(allp[0], allp[i]) for i in range(allp.shape[0])))


def train(kind, steps, counter, batch=32):
    name, options, lr = METHODS[kind]
    torch.manual_seed(0)
    model = Net()
    comp = hvd_rsgc.make_compression(name, model, min_numel=MIN_NUMEL, **options)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
                                   named_parameters=model.named_parameters(), compression=comp)
    x, y = make_data(100 + hvd.rank(), steps * batch)
    ex, ey = make_data(999, 512)
    loss0 = eval_loss(model, ex, ey)
    counter.take()
    per_step = []
    params = dict(model.named_parameters())
    agg = None
    for s in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x[s * batch:(s + 1) * batch]), y[s * batch:(s + 1) * batch]).backward()
        local = {n: params[n].grad.detach().clone() for n in comp.compressed_names} if s == 0 else None
        opt.step()
        wire = counter.take()
        st = comp.stats()
        same = identical(model)
        if local is not None:               # the aggregate the optimizer stepped with
            agg = aggregate_error(name, options, local, {n: params[n].grad for n in local})
        counter.take()
        per_step.append({"wire": {n: b for n, (k, b) in wire.items()},
                         "kinds": {n: k for n, (k, b) in wire.items()},
                         "lib_step_bytes": st["step_bytes"], "identical": same,
                         "layers": {n: {"bytes": r["bytes"], "sent_fraction": r["sent_fraction"]}
                                    for n, r in st["layers"].items()}})
    out = {"loss0": loss0, "loss1": eval_loss(model, ex, ey), "steps": per_step,
           "shapes": {n: list(p.shape) for n, p in model.named_parameters()},
           "compressed": comp.compressed_names}
    if name == "powersgd":
        out["powersgd"] = comp.stats()["powersgd"]
    out["aggregate"] = agg
    return out


def aggregate_error(name, options, local, got):
    """Step 0 (every residual zero): the averaged gradient each compressed tensor received,
    against a plain reference from every rank's raw gradient (allgathered here): signSGD the
    majority sign (sign(0) voting +1, a tie 0), EF-signSGD the mean of mean|g| * sign(g),
    threshold the mean of g where |g| > tau. None for the others (random or multi-round)."""
    if name not in ("signsgd", "efsignsgd", "threshold"):
        return None
    worst, scale, above = 0.0, 0.0, {}
    for n, g in local.items():
        if name == "threshold":             # this rank's elements past tau: 8 bytes each on the wire
            above[n] = int((g.abs() > options["threshold"]).sum())
        G = hvd.allgather(g.unsqueeze(0), name=f"test.raw.{n}")             # (P, ...)
        sgn = torch.where(G < 0, -1.0, 1.0)
        if name == "signsgd":
            ref = torch.sign(sgn.sum(0))
        elif name == "efsignsgd":
            ref = (G.abs().flatten(1).sum(1).div(G[0].numel()).view(-1, *[1] * g.dim()) * sgn).mean(0)
        else:
            ref = (G * (G.abs() > options["threshold"])).mean(0)
        worst = max(worst, float((got[n] - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    return {"max_abs_diff": worst, "ref_scale": scale, "above": above}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--kinds", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    counter = WireCounter().install()
    res = {"size": hvd.size(), "rank": hvd.rank(),
           "train": {k: train(k, args.steps, counter) for k in args.kinds.split(",")}}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
