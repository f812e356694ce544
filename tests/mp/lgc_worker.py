"""LGC scenarios under horovodrun (stock DistributedOptimizer); rank<r>.json per rank."""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import horovod.torch as hvd  # noqa: E402

from hvd_rsgc import LGCCompression  # noqa: E402
from worker import Net, identical_across_ranks, make_data  # noqa: E402
from wirecount import WireCounter  # noqa: E402

WARM, AE, S3 = 5, 60, 40


def run(mode, counter, bs=32):
    torch.manual_seed(0)
    model = Net()
    comp = LGCCompression(model, mode=mode, density=0.02, warmup_steps=WARM, ae_steps=AE,
                          min_numel=100)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                   named_parameters=model.named_parameters(), compression=comp)
    steps = WARM + AE + S3
    x, y = make_data(100 + hvd.rank(), steps * bs)
    ex, ey = make_data(999, 512)
    stages, wire, evals = [], [], {}
    counter.take()
    curve = []                 # (step, held-out loss) every 5 steps
    for s in range(steps):
        stages.append(comp.stage())
        if s == WARM + AE:
            # stage 3 with the lr a schedule would have decayed to by now: at 0.05 the loss
            # swings 0.3-1.0 from step to step on this task, which hides whether the codes
            # still carry the gradient (garbage codes make it rise, not settle)
            for grp in opt.param_groups:
                grp["lr"] = 0.01
        opt.zero_grad()
        F.cross_entropy(model(x[s * bs:(s + 1) * bs]), y[s * bs:(s + 1) * bs]).backward()
        opt.step()
        wire.append({n: b for n, (k, b) in counter.take().items()})
        if s % 5 == 4:
            with torch.no_grad():
                curve.append((s + 1, F.cross_entropy(model(ex), ey).item()))
    # smoothed: the mean of the last four points before stage 3 and of the last four in it
    before = [v for t, v in curve if t <= WARM + AE][-4:]
    evals["stage3_start"] = sum(before) / len(before)
    evals["end"] = sum(v for _, v in curve[-4:]) / 4
    evals["curve"] = curve
    # held-out round trip: fresh gradients of every rank under common indices (rank 0's top-k)
    model.zero_grad()
    hx, hy = make_data(5000 + hvd.rank(), 64)
    F.cross_entropy(model(hx), hy).backward()
    grads = [p.grad.reshape(-1) for n, p in model.named_parameters() if n in comp.compressed_names]
    idx = torch.cat([torch.topk(g.abs(), k).indices for g, k in zip(grads, comp.ks)])
    idx = hvd.broadcast(idx, root_rank=0, name="test.idx")
    xs = torch.cat([g[i] for g, i in zip(grads, torch.split(idx, comp.ks))])
    scale = hvd.allreduce((xs.norm() / comp.K ** 0.5).reshape(1), name="test.scale")
    X = hvd.allgather((xs / scale).unsqueeze(0), name="test.X")
    ae = comp._ae
    with torch.no_grad():
        if mode == "rar":
            target = X.mean(0)
            rec = ae.reconstruct_rar(ae.encoder(X).mean(0, keepdim=True), comp.K)[0]
        else:
            from hvd_rsgc.algorithms.lgc import side_dense, side_signal
            sides = torch.stack([side_dense(*side_signal(X[n], comp.k_inno), comp.K) for n in range(X.shape[0])])
            target = X
            rec = ae.reconstruct_ps(ae.encoder(X[comp.leader:comp.leader + 1]), sides)
    roundtrip = {"ae_mse": F.mse_loss(rec, target).item(),
                 "zeros_mse": target.pow(2).mean().item(),
                 "mean_mse": (target - target.mean()).pow(2).mean().item()}
    st = comp.stats()["lgc"]
    return {"stages": stages, "wire": wire, "evals": evals, "identical": identical_across_ranks(model),
            "ae_loss": st["ae_loss"], "K": comp.K, "code_size": comp.code_size, "k_inno": comp.k_inno,
            "roundtrip": roundtrip, "bytes_by_stage": st["bytes_per_step_by_stage"],
            "state_keys": sorted(comp.state_dict()["lgc"].keys())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--modes", default="rar,ps")
    a = ap.parse_args()
    hvd.init()
    torch.set_num_threads(1)
    counter = WireCounter().install()
    res = {"size": hvd.size(), "rank": hvd.rank()}
    for m in a.modes.split(","):
        res[m] = run(m, counter)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"rank{hvd.rank()}.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
