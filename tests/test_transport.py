"""The Transport role: the same conformance scenario through the 1-process transport, the
Horovod transport (real horovodrun) and the torch.distributed transport (real torchrun), each
checked against references computed from the rank numbers, and the byte meter's convention
(allreduce/allgather: what this rank contributes; broadcast: the root only; alltoall: rows sent
to other ranks)."""
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "mp"))
from support import ROOT, horovodrun, torchrun  # noqa: E402
from transport_worker import exercise  # noqa: E402

from hvd_rsgc.engine import ByteMeter  # noqa: E402
from hvd_rsgc.transport import LocalTransport  # noqa: E402

WORKER = os.path.join(ROOT, "tests", "mp", "transport_worker.py")


def expected(P, r, backend="horovod"):
    rows_sent = sum(j + 1 for j in range(P)) - (r + 1)
    by_key = {"t.avg": 20, "t.sum": 20, "t.gather": 12 * (r + 1), "t.bcast": 16 if r == P - 1 else 0,
              "t.a2a": 8 * rows_sent, "t.async1": 20, "t.async2": 12 * (r + 1)}
    if backend == "torch" and P > 1:     # size exchanges and padding to the largest message
        for k in ("t.gather", "t.async2"):
            by_key[k] += 8 + 12 * (P - 1 - r)
        by_key["t.a2a"] += 8 * (P - 1)
    return {
        "avg": [10 * (P + 1) / 2 + i for i in range(5)],
        "sum": [float(10 * P * (P + 1) // 2 + P * i) for i in range(5)],
        "gather": [[float(100 * i + 3 * j + c) for c in range(3)] for i in range(P) for j in range(i + 1)],
        "bcast": [float(i * P) for i in range(4)],
        "a2a": [[float(1000 * i + 10 * r + 2 * k + c) for c in range(2)]
                for i in range(P) for k in range(r + 1)],
        "a2a_splits": [r + 1] * P,
    }, by_key


def check(res, P, r, backend="horovod"):
    want, by_key = expected(P, r, backend)
    for k, v in want.items():
        assert res[k] == v, (k, r, res[k], v)
    assert res["async_gather"] == want["gather"] and res["async_avg"] == want["avg"]
    assert res["per_key"] == by_key and res["bytes"] == sum(by_key.values())


def test_local_transport():
    meter = ByteMeter()
    res = exercise(LocalTransport(meter), 1, 0)
    res.update(bytes=meter.totals["bytes"], per_key={k: v["bytes"] for k, v in meter.last.items()})
    check(res, 1, 0)


def _read(out, P):
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(P)]


@pytest.mark.multiproc
@pytest.mark.parametrize("P", [2, 3])
def test_horovod_transport(tmp_path, P):
    cmd = [horovodrun(), "-np", str(P), "--gloo", sys.executable, WORKER, "--out", str(tmp_path),
           "--backend", "horovod"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for res in _read(tmp_path, P):
        assert res["size"] == P
        check(res, P, res["rank"])


@pytest.mark.multiproc
@pytest.mark.parametrize("P", [2, 3])
def test_torch_distributed_transport(tmp_path, P):
    p, _ = torchrun(P, WORKER, "--out", str(tmp_path), "--backend", "torch")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for res in _read(tmp_path, P):
        assert res["size"] == P
        # the fp16 average of 40000 on every rank is 40000 (the sum, 80000+, is past fp16's range)
        assert res.pop("avg16") == [40000.0] * 3, res
        res["per_key"].pop("t.avg16")
        res["bytes"] -= 6
        check(res, P, res["rank"], "torch")


def test_alltoall_refuses_bad_splits():
    with pytest.raises(ValueError, match="splits"):
        LocalTransport().alltoall(torch.zeros(3, 2), [2], "x")
