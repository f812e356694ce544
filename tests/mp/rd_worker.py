"""RD-PSGD scenarios under a real MPI launch (mpirun -np 4); each rank writes rank<r>.json."""
import argparse
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from mpi4py import MPI

from hvd_rsgc.rdpsgd import RDPSGD

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def net():
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))


def data(seed, n=256):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(4, 20, generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, 4, (n,), generator=g)
    return protos[y] + 0.8 * torch.randn(n, 20, generator=g), y


def flat(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def train(p, steps=40, lr=0.1, seed_init=0, send_indices=False, sync_every=1):
    torch.manual_seed(seed_init)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if lr > 0 else None
    rd = RDPSGD(model, sparsity_ratio=p, send_indices=send_indices, sync_every=sync_every, seed=3,
                timeout=20)
    x, y = data(100 + rank)
    ex, ey = data(999, 512)
    loss0 = F.cross_entropy(model(ex), ey).item()
    cons, bytes_per_round, masks_ok, counts = [], [], True, []
    for s in range(steps):
        xb, yb = x[(s * 16) % 256:(s * 16) % 256 + 16], y[(s * 16) % 256:(s * 16) % 256 + 16]
        model.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        if rd.mix():
            bytes_per_round.append(rd.last_round_bytes)
            counts.append(int(rd.last_indices.numel()))
            if send_indices:
                masks_ok &= all(torch.equal(v, rd.last_indices) for v in rd.received_indices.values())
        if opt:
            opt.step()
        cons.append(rd.consensus_distance())
    avg = rd.average_parameters()
    m2 = net()
    with torch.no_grad():
        for q, a in zip(m2.parameters(), avg):
            q.copy_(a)
    # masks identical on both ends: every rank reports a hash of each round's mask
    return {"loss0": loss0, "loss_avg_model": F.cross_entropy(m2(ex), ey).item(),
            "consensus": cons, "bytes": bytes_per_round, "counts": counts, "masks_ok": masks_ok,
            "neighbours": rd.neighbours, "numel": rd.numel, "flat": flat(model).tolist(),
            "mask_hashes": [int(rd.round_indices(r).sum()) for r in range(3)]}


def dense_dpsgd(steps=15, lr=0.1):
    """Reference D-PSGD (Lian et al.): allgather every node's full vector, x <- sum_j W_ij x_j
    (self weight first, then neighbours in increasing rank: the same summation order)."""
    from hvd_rsgc.algorithms.rdpsgd import ring
    W = ring(size)[rank]
    torch.manual_seed(0)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = data(100 + rank)
    for s in range(steps):
        xb, yb = x[(s * 16) % 256:(s * 16) % 256 + 16], y[(s * 16) % 256:(s * 16) % 256 + 16]
        model.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        v = flat(model)
        allv = comm.allgather(v.numpy().copy())
        new = v * W[rank]
        for j in sorted(k for k in W if k != rank):
            new = new + torch.from_numpy(allv[j]) * W[j]
        off = 0
        with torch.no_grad():
            for q in model.parameters():
                q.copy_(new[off:off + q.numel()].view_as(q))
                off += q.numel()
        opt.step()
    return {"flat": flat(model).tolist()}


def ring_average():
    """ring_sum against the fp64 sum of every rank's vector (gathered), for lengths that do
    and do not split evenly (and shorter than the ring); the result's bits on every rank."""
    torch.manual_seed(0)
    rd = RDPSGD(net(), sparsity_ratio=0.5, timeout=20)
    out = []
    for n in (1000, 1001, 3, 100_003):
        v = torch.randn(n, generator=torch.Generator().manual_seed(50 + rank))
        ref = sum(torch.from_numpy(a).double() for a in comm.allgather(v.numpy().copy()))
        got = rd.ring_sum(v.clone())
        out.append({"n": n, "err": float((got.double() - ref).abs().max()),
                    "bits": int(got.view(torch.int32).long().sum())})
    return out


def process_group():
    """MPIProcessGroup (what decentralized training runs on instead of Horovod): each call
    against the same operation done with mpi4py directly."""
    from hvd_rsgc.mpi.process import MPIProcessGroup
    g = MPIProcessGroup()
    g.init()
    out = {"rank": g.rank(), "size": g.size(), "local": [g.local_rank(), g.local_size()]}
    v = torch.tensor([rank + 1.0, 0.25 * rank], dtype=torch.float64)
    out["sum"] = g.allreduce(v, op=g.Sum).tolist()
    out["avg"] = g.allreduce(v.float(), op=g.Average).tolist()
    out["isum"] = g.allreduce(torch.tensor([rank, 7]), op=g.Sum).tolist()
    out["input_kept"] = v.tolist() == [rank + 1.0, 0.25 * rank]
    torch.manual_seed(100 + rank)                      # a different model and momentum per rank
    model = nn.Sequential(nn.Linear(20, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = data(rank, 32)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    g.broadcast_parameters(model.state_dict(), root_rank=0)
    g.broadcast_optimizer_state(opt, root_rank=0)
    out["params"] = flat(model).tolist()
    out["buffers"] = [b.tolist() for b in model.buffers()]
    out["momentum"] = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1)
                                 for p in model.parameters()]).tolist()
    out["object"] = g.broadcast_object({"r": rank}, root_rank=1)
    out["gathered"] = g.allgather_object(rank * 10)
    g.barrier()
    return out


def batchnorm_pooled():
    """recompute_batchnorm over ranks bringing different data and different numbers of
    batches, against a float64 reference from the raw features: per rank the mean of its
    batch means and of its batch variances, pooled with each rank weighted by its batches."""
    from hvd_rsgc.app.strategies import recompute_batchnorm
    from hvd_rsgc.mpi.process import MPIProcessGroup
    g = MPIProcessGroup()
    g.init()
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, momentum=0.3), nn.Dropout(0.5),
                          nn.Linear(5, 3))
    gen = torch.Generator().manual_seed(30 + rank)
    xs = [torch.randn(8, 6, generator=gen) * (1 + rank) + rank for _ in range(rank + 1)]
    rng = torch.get_rng_state()
    ok = recompute_batchnorm(model, iter(xs), g)
    with torch.no_grad():
        h = [model[0](x).double() for x in xs]
    mine = (len(h), torch.stack([a.mean(0) for a in h]).mean(0).tolist(),
            torch.stack([a.var(0) for a in h]).mean(0).tolist())
    every = comm.allgather(mine)
    n = sum(e[0] for e in every)
    mean = sum(e[0] * torch.tensor(e[1], dtype=torch.float64) for e in every) / n
    second = sum(e[0] * (torch.tensor(e[2], dtype=torch.float64) + torch.tensor(e[1], dtype=torch.float64) ** 2)
                 for e in every) / n
    bn = model[1]
    return {"ok": ok, "mean_err": float((bn.running_mean.double() - mean).abs().max()),
            "var_err": float((bn.running_var.double() - (second - mean ** 2)).abs().max()),
            "var_scale": float((second - mean ** 2).abs().max()),
            "rng_untouched": torch.equal(rng, torch.get_rng_state()), "training": model.training,
            "momentum": bn.momentum, "stats": bn.running_mean.tolist() + bn.running_var.tolist()}


def train_cli_in_process(out_dir):
    """One short RD-PSGD run of the training application in this process: Horovod must not
    have been imported (its background thread would compete with the MPI exchange)."""
    from hvd_rsgc.app.config import load_config
    from hvd_rsgc.app.train import run
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                   "examples", "configs", "synthetic.yaml"),
                      {"algorithm": "rdpsgd", "sparsity_ratio": 0.5, "epochs": 1,
                       "max_steps_per_epoch": 2, "out_dir": out_dir, "run_name": "inproc",
                       "progress": False})
    summary = run(cfg, quiet=True)
    return {"horovod_loaded": any(m == "horovod" or m.startswith("horovod.") for m in sys.modules),
            "epochs": summary["epochs"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--scenario", default="all")
    a = ap.parse_args()
    res = {"size": size, "rank": rank}
    if a.scenario == "die":
        torch.manual_seed(0)
        model = net()
        rd = RDPSGD(model, sparsity_ratio=0.5, timeout=8)
        for s in range(100):
            if s == 2 and rank == 1:
                import time
                time.sleep(600)          # alive but silent: its neighbours must not hang
            rd.mix()
        return
    if a.scenario == "mismatch":
        torch.manual_seed(0)
        try:                                 # a per-rank seed: refused before any exchange
            RDPSGD(net(), sparsity_ratio=0.5, seed=rank, timeout=20)
            res["construct"] = None
        except ValueError as e:
            res["construct"] = str(e)
        rd = RDPSGD(net(), sparsity_ratio=0.5, seed=3, timeout=20)
        if rank == 1:                         # out of step after the start: other masks
            rd.seed = 4
        try:
            rd.mix()
            res["mix"] = None
        except RuntimeError as e:
            res["mix"] = str(e)
        comm.Barrier()
    if a.scenario == "all":
        res["dpsgd"] = dense_dpsgd(steps=15)
        res["rd_p1"] = train(1.0, steps=15)
        res["rd"] = train(0.3, steps=60)
        res["paper"] = train(0.3, steps=5, send_indices=True)
        # lr = 0: only mixing; different random init per rank -> consensus must shrink
        res["mix_only"] = train(0.5, steps=30, lr=0.0, seed_init=rank)
        res["sync4"] = train(0.5, steps=8, sync_every=4)
        res["ring"] = ring_average()
        res["group"] = process_group()
        res["bn"] = batchnorm_pooled()
        res["train"] = train_cli_in_process(a.out)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    sys.exit(main())
