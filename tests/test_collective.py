"""The sparse reduce-scatter (issue #15, ``hvd_rsgc/algorithms/collective.py``).

* P ranks as threads over one board (``support.ThreadTransport``): the result against a plain
  reference written here (dense sums, regions from a Python histogram, per-owner top-b), ranks
  identical, residual conservation (what all ranks hold + what was applied = what they had),
  ``reselect=None`` equal to the allgather path, per-rank volumes within Ok-Topk's bound;
* under ``horovodrun -np 4`` (``tests/mp/worker.py``): training through the stock optimizer
  with ``communicator="reduce_scatter"``, parameters bit-identical on every rank, bytes counted
  at Horovod's alltoall / allgather, and ``reselect=None`` equal to the allgather path.
"""
import math
from fractions import Fraction

import pytest
import torch

from hvd_rsgc import RSDGCCompression, TopKCompression, QSGDCompression
from hvd_rsgc.algorithms.base import from_wire, make_layer, scatter_sum, to_wire
from hvd_rsgc.algorithms.collective import SparseCollective
from hvd_rsgc.algorithms.memory import ErrorFeedback
from hvd_rsgc.algorithms.rsdgc import RSDGC
from hvd_rsgc.algorithms.topk import TopK

from support import results, run_threads

P = 4


def grads_for(rank, shapes, step=0):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [torch.randn(s, generator=g) * (1 + rank) for s in shapes]


def run_rs(make_method, shapes, density, reselect, steps=1, size=P, nonfinite_rank=None):
    """Every rank: fresh method + layers, ``steps`` exchanges; returns per rank
    (sums per step, accumulated residual before each step's marks, residual after, stats).
    ``nonfinite_rank``: that rank's gradients count as non-finite (it sends no unit)."""

    def rank_main(r, tr):
        m = make_method()
        layers = [make_layer(m, s, density, name=f"t{i}", index=i) for i, s in enumerate(shapes)]
        coll = SparseCollective("reduce_scatter", reselect, bins_per_rank=8)
        out = []
        for step in range(steps):
            items = []
            for st, g in zip(layers, grads_for(r, shapes, step)):
                rows, vals = m.pick(st, g, r != nonfinite_rank)
                items.append((st, rows, vals))
            acc = [memory_of(st).clone() for st in layers]
            sums, marks = coll.exchange(m, items, tr, f"rs{step}")
            for mk in marks:
                mk.apply()
            out.append({"sums": sums, "acc": acc, "items": items,
                        "res": [memory_of(st).clone() for st in layers], "stats": dict(coll.last),
                        "bytes": tr.meter.totals["bytes"]})
        return out
    return run_threads(size, rank_main)


def memory_of(st):
    return st.memory["e"] if "e" in st.memory else st.memory["v"]


def reference(items_by_rank, layers, budget_factor, bins_per_rank, score, size=P):
    """Plain re-computation: group rows, histogram regions, dense per-owner sums, top-b by
    ``score(summed unit, group-global row)``."""
    offs = [0]
    for st in layers:
        offs.append(offs[-1] + st.layout.num_units)
    U, S = offs[-1], layers[0].layout.unit_size
    nb = bins_per_rank * size
    hist = [0] * nb
    contrib = {}                                   # global row -> list of (rank, values)
    for r, items in enumerate(items_by_rank):
        for j, (_st, rows, vals) in enumerate(items):
            for row, v in zip(rows.tolist(), vals):
                gr = row + offs[j]
                hist[gr * nb // U] += 1
                contrib.setdefault(gr, []).append((r, v))
    tot, cum, bounds = sum(hist), 0, [0]
    targets = [math.ceil(tot * j / size) for j in range(1, size)]
    cums = []
    for h in hist:
        cum += h
        cums.append(cum)
    for t in targets:
        b = next(i for i, c in enumerate(cums) if c >= t)
        bounds.append(min(U, -(-(b + 1) * U // nb)))
    bounds.append(U)
    K = sum(st.k for st in layers)
    final = {}
    for j in range(size):
        rows = sorted(gr for gr in contrib if bounds[j] <= gr < bounds[j + 1])
        # the owner's share of the budget follows its candidates (entries, duplicates counted)
        cand = sum(len(contrib[gr]) for gr in rows)
        budget = math.ceil(Fraction(budget_factor) * K * cand / tot) if tot else 0
        sums = {}
        for gr in rows:
            acc = torch.zeros(S)
            for _, v in contrib[gr]:                # rank order, as the owner adds them
                acc += v
            sums[gr] = acc
        if len(rows) > budget:
            sc = torch.stack([score(sums[gr], gr) for gr in rows])
            keep = sorted(rows[i] for i in torch.topk(sc, budget).indices.tolist())
        else:
            keep = rows
        final.update({gr: sums[gr] for gr in keep})
    dense = []
    for j, st in enumerate(layers):
        u = torch.zeros(st.layout.num_units, S)
        for gr, v in final.items():
            if offs[j] <= gr < offs[j + 1]:
                u[gr - offs[j]] = v
        dense.append(st.layout.from_units(u))
    return dense, final, offs


SHAPES = [(64, 40), (300,), (8, 16, 3, 3)]         # three element-unit tensors, one group


def topk_method():
    return TopK(ErrorFeedback())


def test_reduce_scatter_matches_reference_ranks_identical_and_conserves():
    density = 0.05
    res = run_rs(topk_method, SHAPES, density, 1.0)
    items_by_rank = [res[r][0]["items"] for r in range(P)]
    layers = [st for st, _, _ in items_by_rank[0]]
    dense, final, offs = reference(items_by_rank, layers, 1.0, 8, lambda v, gr: v.abs().sum())
    for r in range(P):
        for j in range(len(SHAPES)):
            assert torch.equal(res[r][0]["sums"][j], dense[j]), (r, j)          # same order, same bits
            assert torch.equal(res[r][0]["sums"][j], res[0][0]["sums"][j])   # bit-identical ranks
    # the owners re-selected: something was dropped, the final set has about k units
    k_total = sum(st.k for st in layers)
    union = len({gr for items in items_by_rank for j, (_, rows, _) in enumerate(items)
                 for gr in (rows + offs[j]).tolist()})
    assert len(final) <= P * math.ceil(k_total / P) < union
    # conservation: sum over ranks of (residual after) + applied sum == sum of accumulated
    for j in range(len(SHAPES)):
        before = sum(res[r][0]["acc"][j] for r in range(P))
        after = sum(res[r][0]["res"][j] for r in range(P))
        applied = layers[j].layout.to_units(res[0][0]["sums"][j])
        assert torch.allclose(after + applied, before, atol=1e-5)
        # a rank's residual is zero exactly at its own rows that reached the final set
        for r in range(P):
            rows = items_by_rank[r][j][1]
            in_final = torch.tensor([int(x) + offs[j] in final for x in rows], dtype=torch.bool)
            assert not res[r][0]["res"][j][rows[in_final]].any()
            if (~in_final).any():
                assert res[r][0]["res"][j][rows[~in_final]].abs().min() > 0
    # volume: each rank received < 6k(P-1)/P units, and less than the allgather's k(P-1)
    for r in range(P):
        st = res[r][0]["stats"]
        recv = st["alltoall_recv_rows"] + st["allgather_recv_rows"]
        assert recv <= 6 * k_total * (P - 1) / P
        assert recv < k_total * (P - 1)


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.int8])
def test_reduce_scatter_lossy_values_conserve(value_dtype):
    """fp16 / int8 values through the reduce-scatter: ranks bit-identical, and nothing lost --
    each sender keeps its own rounding error, each owner the error of re-encoding its kept
    sums, so the ranks' residuals + the applied sum == the ranks' accumulated gradients."""
    res = run_rs(lambda: TopK(ErrorFeedback(), value_dtype=value_dtype), SHAPES, 0.05, 1.0, steps=2)
    for step in range(2):
        layers = [st for st, _, _ in res[0][step]["items"]]
        for j in range(len(SHAPES)):
            for r in range(P):
                assert torch.equal(res[r][step]["sums"][j], res[0][step]["sums"][j])
            before = sum(res[r][step]["acc"][j] for r in range(P))
            after = sum(res[r][step]["res"][j] for r in range(P))
            applied = layers[j].layout.to_units(res[0][step]["sums"][j])
            assert torch.allclose(after + applied, before, atol=1e-4), (step, j)


def test_int8_values_with_nothing_to_send_neither_crash_nor_hang():
    """int8 values where a rank or an owner has no unit: an owner region left empty (3 units,
    4 ranks) and a rank whose gradients were not finite (it picks nothing). Encoding an empty
    unit set raised (a (0, 1) bfloat16 scale has stride 0, which view(int8) refuses) on that
    rank alone, while its peers waited in the next collective."""
    wire, sent = to_wire(torch.zeros(0, 9), torch.int8)
    assert wire.shape == (0, 11) and wire.dtype == torch.int8 and sent.shape == (0, 9)
    v = torch.randn(5, 9)
    wire, sent = to_wire(v, torch.int8)                   # the non-empty encoding unchanged
    assert torch.equal(from_wire(wire, 9), sent) and (sent - v).abs().max() < v.abs().max() / 100
    for shapes, bad in (([(3,)], None), (SHAPES, 1)):
        res = run_rs(lambda: TopK(ErrorFeedback(), value_dtype=torch.int8), shapes, 0.34, 1.0,
                     nonfinite_rank=bad)
        for r in range(P):
            for j in range(len(shapes)):
                assert torch.equal(res[r][0]["sums"][j], res[0][0]["sums"][j]), (shapes, r, j)
        assert any(res[0][0]["sums"][j].any() for j in range(len(shapes)))
        if bad is not None:
            assert res[bad][0]["items"][0][1].numel() == 0


def test_owners_share_the_budget_by_their_candidates_when_they_cluster():
    """Every rank's top units in the same few rows of one tensor: the histogram cannot split
    one bin, so one owner's region holds every candidate and the others none. With a budget of
    K / P per owner the update shrank to K / P units; shared by candidates, it keeps K."""
    shape = (4096,)

    def rank_main(r, tr):
        m = topk_method()
        st = make_layer(m, shape, 16 / 4096, name="t0", index=0)
        g = torch.zeros(shape)
        g[:16] = torch.arange(1, 17, dtype=torch.float32) * (1 + r)   # the same 16 rows everywhere
        g[16:] = 1e-3 * torch.randn(4080, generator=torch.Generator().manual_seed(r))
        rows, vals = m.pick(st, g)
        coll = SparseCollective("reduce_scatter", 1.0, bins_per_rank=8)
        sums, marks = coll.exchange(m, [(st, rows, vals)], tr, "rs")
        return {"rows": rows.tolist(), "sum": sums[0], "stats": dict(coll.last)}
    res = list(run_threads(P, rank_main).values())
    assert all(sorted(r["rows"]) == list(range(16)) for r in res)
    for r in res:
        assert torch.equal(r["sum"], res[0]["sum"])
        assert r["stats"]["final_units"] == 16, r["stats"]
    want = torch.zeros(shape)
    want[:16] = torch.arange(1, 17, dtype=torch.float32) * sum(1 + r for r in range(P))
    assert torch.allclose(res[0]["sum"], want)


def test_reselect_none_equals_the_allgather_path():
    density = 0.03
    res = run_rs(topk_method, SHAPES, density, None, steps=2)
    for step in range(2):
        items = [res[r][step]["items"] for r in range(P)]
        for j in range(len(SHAPES)):
            st = items[0][j][0]
            vals = torch.cat([items[r][j][2] for r in range(P)])
            rows = torch.cat([items[r][j][1] for r in range(P)])
            ref = scatter_sum(st.layout, vals, rows, torch.float32)
            for r in range(P):
                assert torch.equal(res[r][step]["sums"][j], ref)
                # nothing dropped: every row this rank sent is gone from its residual
                assert not res[r][step]["res"][j][items[r][j][1]].any()


def test_two_unit_sizes_rsdgc_nsi_reselection():
    """RS-DGC: 3x3 kernels (S=9) and 5x5 kernels (S=25) form two groups; owners re-select by
    the NSI of the summed units (mean |v| and std over the real cells)."""
    shapes = [(6, 4, 3, 3), (4, 4, 5, 5), (30, 20)]
    res = run_rs(lambda: RSDGC(ErrorFeedback()), shapes, 0.1, 1.0)
    assert res[0][0]["stats"]["groups"] == 2
    by_rank = [res[r][0]["items"] for r in range(P)]
    for S, idx in ((9, [0, 2]), (25, [1])):
        items = [[by_rank[r][j] for j in idx] for r in range(P)]
        layers = [it[0] for it in items[0]]
        counts = []
        for st in layers:
            c = st.layout.valid_counts(None, torch.float32)
            counts.append(c if c is not None else torch.full((st.layout.num_units,), float(S)))

        allc = torch.cat(counts)
        beta = 0.5

        def score_row(v, gr, allc=allc, beta=beta):
            n = allc[gr]
            mu = v.abs().sum() / n
            mean = v.sum() / n
            var = (v * v).sum() / n - mean * mean
            return beta * mu + (1 - beta) * var.clamp_min(0).sqrt()
        dense, _, _ = reference(items, layers, 1.0, 8, score_row)
        for r in range(P):
            for jj, j in enumerate(idx):
                assert torch.allclose(res[r][0]["sums"][j], dense[jj], atol=1e-5), (S, j)


def test_volume_flat_in_P_and_allgather_grows():
    """Received units per rank: reduce-scatter stays near 2k(P-1)/P as P grows; the allgather
    path would receive k(P-1)."""
    shapes = [(200, 100)]
    recv = {}
    for size in (2, 4, 8):
        res = run_rs(topk_method, shapes, 0.01, 1.0, size=size)
        k = 200
        st = res[0][0]["stats"]
        got = max(res[r][0]["stats"]["alltoall_recv_rows"] + res[r][0]["stats"]["allgather_recv_rows"]
                  for r in range(size))
        assert got <= 6 * k * (size - 1) / size, (size, got, st)
        recv[size] = got
    assert recv[8] < 2.2 * recv[2]                  # allgather: k(P-1) grows 7x from P=2 to 8


def test_auto_and_bad_input():
    m = topk_method()
    layers = [make_layer(m, (1000, 200), 0.01)]
    coll = SparseCollective("auto")
    assert not coll.uses_reduce_scatter(2, m, layers, 0.01)          # P below auto_min_ranks
    assert coll.uses_reduce_scatter(8, m, layers, 0.01)              # 2000 units * 8 B * 7 >= 64 KiB
    assert not coll.uses_reduce_scatter(8, m, layers, 0.0001)        # too few bytes to matter
    assert not SparseCollective("allgather").uses_reduce_scatter(8, m, layers, 0.01)
    assert not SparseCollective("reduce_scatter").uses_reduce_scatter(1, m, layers, 0.01)
    with pytest.raises(ValueError, match="communicator"):
        SparseCollective("ring")
    with pytest.raises(ValueError, match="reselect"):
        SparseCollective("reduce_scatter", reselect=0)
    model = torch.nn.Linear(64, 64)
    with pytest.raises(ValueError, match="communicator"):
        TopKCompression(model, communicator="alltoall")
    with pytest.raises(TypeError, match="communicator"):       # not an option of QSGD
        QSGDCompression(model, communicator="reduce_scatter")
    RSDGCCompression(model, communicator="auto")                     # accepted


def test_horovod_np4_reduce_scatter_trains_identically(tmp_path):
    opts = '{"communicator": "reduce_scatter"}'
    res = results(P, tmp_path, "--scenarios", "train", "--kinds", "topk,rsdgc,dgc", "--steps", "5",
                  "--options", opts)
    for kind in ("topk", "rsdgc", "dgc"):
        runs = [r["train"][kind] for r in res]
        assert all(t["identical"] for t in runs), kind                  # bit-identical ranks
        assert len({t["params_sha"] for t in runs}) == 1
        assert runs[0]["loss1"] < runs[0]["loss0"], kind
        for t in runs:
            c = t["collective"]
            assert c["groups"] >= 1 and c["kept_units"] < c["owner_units"]      # owners re-selected
            for step in t["steps"][1:]:
                kinds = set(step["kinds"].values())
                # the pieces went through Horovod's own alltoall and allgather; the library
                # counts what goes to other ranks: the intercepted alltoall input less this
                # rank's own region (its split, read at the call), which never leaves it
                assert {"alltoall", "allgather"} <= kinds, kinds
                wire = sum(step["wire"].values())
                assert step["alltoall_own"] > 0
                assert step["lib_step_bytes"] == wire - step["alltoall_own"], (kind, step)


def test_horovod_np4_reselect_none_equals_allgather(tmp_path):
    """Without re-selection the reduce-scatter delivers exactly the allgather path's sums; the
    runs agree to float rounding (Horovod fuses the dense tensors differently from run to run,
    which changes their ring's summation order: bit-identity holds across ranks, not runs)."""
    a = results(P, tmp_path / "rs", "--scenarios", "train", "--kinds", "topk,rsdgc", "--steps", "3",
                "--options", '{"communicator": "reduce_scatter", "reselect": null, "dump": true}')
    b = results(P, tmp_path / "ag", "--scenarios", "train", "--kinds", "topk,rsdgc", "--steps", "3",
                "--options", '{"dump": true}')
    for kind in ("topk", "rsdgc"):
        pa = torch.tensor(a[0]["train"][kind]["params"])
        pb = torch.tensor(b[0]["train"][kind]["params"])
        assert pa.shape == pb.shape
        assert torch.allclose(pa, pb, rtol=1e-5, atol=1e-6), (kind, (pa - pb).abs().max())
        c = a[0]["train"][kind]["collective"]
        assert c["kept_units"] == c["owner_units"]


def test_bench_collective_bytes_follow_the_formulas(tmp_path):
    """``python -m hvd_rsgc.bench collective`` (P processes here): the bytes each rank received,
    measured at the transport, within 3% of docs/COLLECTIVES.md's formulas; the reduce-scatter
    receives less than the allgather at P = 4; the times are per-round ratios to dense."""
    import json
    import subprocess
    import sys
    from support import ROOT, _env
    p = subprocess.run([sys.executable, "-m", "hvd_rsgc.bench", "collective", "--ranks", "4",
                        "--numel", "262144", "--steps", "2", "--out", str(tmp_path), "--methods",
                        "dense fp32 allreduce;Top-k allgather;Top-k reduce-scatter;RS-DGC reduce-scatter"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env=_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = {r["method"]: r for r in json.load(open(tmp_path / "collective.json"))["rows"]}
    for r in rows.values():
        assert abs(r["recv_bytes"] - r["formula_bytes"]) <= 0.03 * r["formula_bytes"], r
    assert rows["Top-k reduce-scatter"]["recv_bytes"] < 0.6 * rows["Top-k allgather"]["recv_bytes"]
    assert (tmp_path / "collective.md").exists()
    # timed round-robin: one ratio to the dense exchange of the same round per round
    assert rows["dense fp32 allreduce"]["x_dense"] == [1.0, 1.0]
    for r in rows.values():
        assert len(r["x_dense"]) == 2 and all(x > 0 for x in r["x_dense"]), r


def test_bench_collective_leaves_a_cluster_it_did_not_start_up():
    """``bench collective --cluster`` on a cluster that is already up (scripts/cluster.sh up,
    or bench tta --keep) uses it and leaves it up; it took it down at the end."""
    from hvd_rsgc.app.bench_collective import use_cluster

    class Fake:
        def __init__(self, up, n):
            self.up_, self.n, self.calls = up, n, []

        def is_up(self):
            return self.up_

        def size(self):
            return self.n

        def shape(self, which, bw):
            self.calls.append(("shape", bw))

        def up(self, n, bw, extra=()):
            self.calls.append(("up", n))
    big = Fake(True, 8)
    assert use_cluster(big, 4, "1gbit") is False and big.calls == [("shape", "1gbit")]
    small = Fake(True, 2)
    assert use_cluster(small, 4, "1gbit") is True and small.calls == [("up", 4)]
    assert use_cluster(Fake(False, 0), 4, "1gbit") is True


def test_training_cli_communicator_reduce_scatter_np4(tmp_path):
    """``--communicator reduce_scatter`` through the training CLI (4 ranks, RS-DGC): trains,
    compresses, and the run records the setting."""
    import json
    import os
    from support import ROOT, run_module
    synth = os.path.join(ROOT, "examples", "configs", "synthetic.yaml")
    recs = {}
    for comm in ("reduce_scatter", "allgather"):
        run_module(4, ["hvd_rsgc.train", "--config", synth, "--out_dir", str(tmp_path), "--run_name", comm,
                       "--compression", "rsdgc", "--communicator", comm, "--epochs", "2",
                       "--max_steps_per_epoch", "3", "--progress", "false", "--density", "0.01"], tmp_path)
        recs[comm] = [json.loads(line) for line in (tmp_path / comm / "metrics.jsonl").read_text().splitlines()]
    rs = recs["reduce_scatter"]
    assert len(rs) == 2
    assert 0 < rs[-1]["bytes_per_worker"] < rs[-1]["dense_bytes_per_worker"] / 5
    assert "communicator: reduce_scatter" in (tmp_path / "reduce_scatter" / "config.yaml").read_text()
    # the option took effect: the reduce-scatter's sends (alltoall to the other owners, the
    # owner's share, the histogram) differ from the allgather's k units per tensor
    assert rs[-1]["bytes_per_worker"] != recs["allgather"][-1]["bytes_per_worker"]
