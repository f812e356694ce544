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
    for s in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x[s * batch:(s + 1) * batch]), y[s * batch:(s + 1) * batch]).backward()
        opt.step()
        wire = counter.take()
        st = comp.stats()
        same = identical(model)
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
    return out


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
