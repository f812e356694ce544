"""Transport conformance, launched by tests/test_transport.py under horovodrun (Horovod
transport) or torchrun (torch.distributed transport): every collective against a reference
computed from the rank numbers, and the byte meter against the documented convention."""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from hvd_rsgc.engine import ByteMeter  # noqa: E402


def exercise(t, P, r):
    res = {}
    # every element its own value: a transport that permutes or shifts elements shows
    x = torch.arange(5, dtype=torch.float32) + 10 * (r + 1)
    res["avg"] = t.allreduce(x, "t.avg").tolist()
    res["sum"] = t.allreduce(x, "t.sum", op="sum").tolist()
    assert torch.equal(x, torch.arange(5, dtype=torch.float32) + 10 * (r + 1)), \
        "allreduce changed its input"
    g = torch.arange(3 * (r + 1), dtype=torch.float32).view(-1, 3) + 100 * r   # rows differ per rank
    res["gather"] = t.allgather(g, "t.gather").tolist()
    b = torch.arange(4, dtype=torch.float32) * (r + 1)
    res["bcast"] = t.broadcast(b, P - 1, "t.bcast").tolist()
    rows = torch.cat([torch.arange(2 * (j + 1), dtype=torch.float32).view(-1, 2) + 1000 * r + 10 * j
                      for j in range(P)])                   # j + 1 rows for rank j
    out, rsplits = t.alltoall(rows, [j + 1 for j in range(P)], "t.a2a")
    res["a2a"], res["a2a_splits"] = out.tolist(), rsplits
    h1 = t.allreduce_async(x, "t.async1")                  # several in flight, waited in reverse
    h2 = t.allgather_async(g, "t.async2")
    res["async_gather"] = t.wait(h2).tolist()
    res["async_avg"] = t.wait(h1).tolist()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--backend", choices=("horovod", "torch"), required=True)
    a = ap.parse_args()
    meter = ByteMeter()
    if a.backend == "horovod":
        import horovod.torch as hvd

        from hvd_rsgc.horovod.transport import HorovodTransport
        hvd.init()
        t = HorovodTransport(meter)
    else:
        import torch.distributed as dist

        from hvd_rsgc.ddp.transport import TorchDistTransport
        dist.init_process_group("gloo")
        t = TorchDistTransport(meter)
    P, r = t.size, t.rank
    res = exercise(t, P, r)
    if a.backend == "torch":            # DDP's fp16 average, divided before the sum
        res["avg16"] = t.allreduce(torch.full((3,), 40000.0, dtype=torch.float16), "t.avg16").tolist()
    res.update(size=P, rank=r, bytes=meter.totals["bytes"],
               per_key={k: v["bytes"] for k, v in meter.last.items()})
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"rank{r}.json"), "w") as f:
        json.dump(res, f)
    if a.backend == "torch":
        # every rank done before Gloo is torn down: a rank exiting while a peer's Gloo thread
        # still talks to it aborted once ("terminate called without an active exception")
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
