"""RD-PSGD: unit tests of the pure parts and multi-process tests under a real mpirun -np 4."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from hvd_rsgc.algorithms.rdpsgd import (bernoulli_indices, decode_gaps, encode_gaps,
                                        geometric_indices, message_bytes, mixing_matrix, ring,
                                        sparse_mix, spectral_rho, validate_mixing)

from support import ROOT, horovodrun, mpirun_python  # noqa: E402
WORKER = os.path.join(ROOT, "tests", "mp", "rd_worker.py")


# ----------------------------------------------------------------------------- unit
def test_ring_weights_and_spectral_constant():
    W = mixing_matrix(ring(8), 8)
    validate_mixing(ring(8), 8)
    assert spectral_rho(W) == pytest.approx(0.8047 ** 2, abs=2e-4)       # 0.6476 (ALGORITHMS.md)
    assert mixing_matrix(ring(2), 2).tolist() == [[0.5, 0.5], [0.5, 0.5]]


@pytest.mark.parametrize("weights,msg", [
    ({0: {0: 0.5, 1: 0.5}, 1: {1: 0.7, 0: 0.3}}, "not symmetric"),
    ({0: {0: 0.6, 1: 0.2}, 1: {1: 0.6, 0: 0.2}}, "doubly stochastic"),
    # a link one way only, within the symmetry tolerance: node 0 would wait on node 2
    ({0: {0: 1 / 3, 1: 1 / 3, 3: 1 / 3, 2: 1e-12}, 1: {1: 1 / 3, 0: 1 / 3, 2: 1 / 3},
      2: {2: 1 / 3, 1: 1 / 3, 3: 1 / 3}, 3: {3: 1 / 3, 2: 1 / 3, 0: 1 / 3}}, "node 0 and node 2 one way only"),
    ({0: {0: 1.5, 1: -0.5}, 1: {1: 1.5, 0: -0.5}}, "negative"),
    ({0: {0: 1.0}}, "at least 2"),
])
def test_bad_mixing_matrices(weights, msg):
    with pytest.raises(ValueError, match=msg):
        validate_mixing(weights, len(weights))


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, float("nan")])
def test_bad_ratio(p):
    with pytest.raises(ValueError, match="sparsity_ratio"):
        geometric_indices(100, p, torch.Generator())


def test_geometric_indices_distribution():
    g = torch.Generator().manual_seed(0)
    N, p = 200_000, 0.05
    counts = [geometric_indices(N, p, g).numel() for _ in range(20)]
    mean = sum(counts) / len(counts)
    assert abs(mean - p * N) < 4 * math.sqrt(N * p * (1 - p) / len(counts))
    idx = geometric_indices(N, p, g)
    assert (torch.diff(idx) > 0).all() and idx[0] >= 0 and idx[-1] < N
    # every position equally likely: first and second half get about the same share
    halves = [(idx < N // 2).sum().item(), (idx >= N // 2).sum().item()]
    assert abs(halves[0] - halves[1]) < 5 * math.sqrt(p * N)
    b = bernoulli_indices(N, p, g)
    assert abs(b.numel() - p * N) < 6 * math.sqrt(N * p)
    assert torch.equal(geometric_indices(50, 1.0, g), torch.arange(50))


def test_gap_encoding_roundtrip_escape_and_malformed():
    idx = torch.tensor([0, 1, 255, 256, 1000, 70000, 70001])
    enc = encode_gaps(idx)
    # gaps 1,1,254,1,744,69000,1 -> two escapes of 5 bytes
    assert enc.numel() == 5 + 2 * 5
    assert torch.equal(decode_gaps(enc, 70002), idx)
    with pytest.raises(ValueError, match="past the parameter count"):
        decode_gaps(enc, 70001)
    with pytest.raises(ValueError, match="truncated"):
        decode_gaps(enc[:-3], 10 ** 6)
    assert message_bytes(100, 2, True) == 400 + 100 + 8 + 4
    assert message_bytes(100, 2, False) == 400


def test_sparse_mix_reference():
    x = torch.arange(10.0)
    idx = torch.tensor([1, 4, 7])
    a, b = torch.full((3,), 100.0), torch.full((3,), -50.0)
    sparse_mix(x, idx, 1 / 3, [(1 / 3, a), (1 / 3, b)])
    assert x[1] == pytest.approx((1 + 100 - 50) / 3) and x[4] == pytest.approx((4 + 50) / 3)
    assert x[0] == 0 and x[9] == 9


def test_fewer_than_two_processes_is_an_error():
    pytest.importorskip("mpi4py")
    from mpi4py import MPI

    from hvd_rsgc.rdpsgd import RDPSGD
    with pytest.raises(ValueError, match="at least 2 processes"):
        RDPSGD(torch.nn.Linear(2, 2), comm=MPI.COMM_SELF)


# ----------------------------------------------------------------------------- mpirun -np 4



def mpirun(np_, out, *args, timeout=300):
    return mpirun_python(np_, WORKER, "--out", str(out), *args, timeout=timeout)


@pytest.fixture(scope="module")
def np4(tmp_path_factory):
    out = tmp_path_factory.mktemp("rd")
    p, _ = mpirun(4, out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [json.load(open(out / f"rank{r}.json")) for r in range(4)]


pytestmark_mp = pytest.mark.multiproc


@pytestmark_mp
def test_p1_equals_dpsgd_exactly(np4):
    for r in np4:
        assert r["rd_p1"]["flat"] == r["dpsgd"]["flat"]


@pytestmark_mp
def test_consensus_shrinks_with_zero_lr(np4):
    for r in np4:
        c = r["mix_only"]["consensus"]
        assert c[0] > 0.1 and c[-1] < 1e-3 * c[0]
        assert all(b <= a * (1 + 1e-9) for a, b in zip(c, c[1:]))     # never grows


@pytestmark_mp
def test_loss_falls(np4):
    for r in np4:
        assert r["rd"]["loss_avg_model"] < 0.5 * r["rd"]["loss0"]


@pytestmark_mp
def test_ring_average_is_the_sum_identical_on_every_rank(np4):
    for r in np4:
        assert [c["n"] for c in r["ring"]] == [1000, 1001, 3, 100_003]
        assert all(c["err"] < 1e-5 for c in r["ring"]), r["ring"]
    assert len({tuple(c["bits"] for c in r["ring"]) for r in np4}) == 1


@pytestmark_mp
def test_mpi_process_group_matches_mpi(np4):
    """The group decentralized runs use instead of Horovod: sums, averages, broadcasts."""
    gs = [r["group"] for r in np4]
    n = len(gs)
    for r, g in enumerate(gs):
        assert (g["rank"], g["size"], g["local"]) == (r, n, [r, n])     # one box: all local
        assert g["sum"] == [sum(range(1, n + 1)), 0.25 * sum(range(n))]
        assert g["avg"] == pytest.approx([(n + 1) / 2, 0.25 * (n - 1) / 2], rel=1e-6)
        assert g["isum"] == [sum(range(n)), 7 * n] and g["input_kept"]
        assert g["object"] == {"r": 1} and g["gathered"] == [10 * i for i in range(n)]
        # rank 0's parameters, BatchNorm buffers and momentum on every rank, bit for bit
        assert g["params"] == gs[0]["params"] and g["buffers"] == gs[0]["buffers"]
        assert g["momentum"] == gs[0]["momentum"]
    assert gs[1]["momentum"] != [0.0] * len(gs[1]["momentum"])


@pytestmark_mp
def test_batchnorm_statistics_pooled_over_ranks(np4):
    """The average model's BatchNorm statistics: re-estimated on each rank's batches (1..4 of
    them, different data), pooled by batch count, identical everywhere; dropout stays off."""
    for r in np4:
        b = r["bn"]
        assert b["ok"] and b["rng_untouched"] and b["training"] and b["momentum"] == 0.3
        assert b["mean_err"] < 1e-5 and b["var_err"] < 1e-5 * b["var_scale"]
        assert b["stats"] == np4[0]["bn"]["stats"]


@pytestmark_mp
def test_decentralized_training_does_not_start_horovod(np4):
    """RD-PSGD's training run never imports Horovod (no controller thread beside the exchange)."""
    for r in np4:
        assert r["train"] == {"horovod_loaded": False, "epochs": 1}


@pytestmark_mp
def test_masks_identical_on_both_ends(np4):
    assert len({tuple(r["rd"]["mask_hashes"]) for r in np4}) == 1
    assert all(r["paper"]["masks_ok"] for r in np4)
    assert [r["rd"]["neighbours"] for r in np4] == [[1, 3], [0, 2], [1, 3], [0, 2]]


@pytestmark_mp
def test_byte_counts(np4):
    for r in np4:
        rd = r["rd"]
        N, p = rd["numel"], 0.3
        for m, b in zip(rd["counts"], rd["bytes"]):
            assert b == 2 * 4 * m                       # two neighbours, fp32 values, no indices
        assert abs(sum(rd["counts"]) / len(rd["counts"]) - p * N) < 4 * math.sqrt(N * p)
        # paper mode: + 8-bit gaps (escapes) + 4-byte count, per neighbour
        gen = torch.Generator()
        from hvd_rsgc.algorithms.select import splitmix_seed
        for rnd, (m, b) in enumerate(zip(r["paper"]["counts"], r["paper"]["bytes"])):
            idx = geometric_indices(N, p, gen.manual_seed(splitmix_seed(3, rnd)))
            assert idx.numel() == m
            assert b == 2 * (4 * m + encode_gaps(idx).numel() + 4)
        assert len(r["sync4"]["bytes"]) == 2            # 8 steps, sync every 4


@pytestmark_mp
def test_dead_neighbour_ends_job_within_timeout(tmp_path):
    p, elapsed = mpirun(4, tmp_path, "--scenario", "die", timeout=120)
    assert p.returncode != 0
    assert elapsed < 90
    assert "no answer from" in p.stdout + p.stderr


@pytestmark_mp
def test_ranks_out_of_step_are_named_not_mixed(tmp_path):
    """Ranks that would draw different masks: a per-rank seed is refused at construction on
    every rank; masks out of step later (a seed changed on rank 1) are caught by the receive
    counts -- a shorter message would otherwise leave uninitialised values in the mix."""
    p, _ = mpirun(4, tmp_path, "--scenario", "mismatch", timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(4)]
    for r in res:
        assert "seed differs between ranks ([0, 1, 2, 3], by rank)" in r["construct"], r
    # ring of 4: rank 1's neighbours are 0 and 2; rank 3 exchanges with 0 and 2 only
    assert res[3]["mix"] is None
    for r in (0, 1, 2):
        assert "masks out of step" in res[r]["mix"] and "mixing round 0" in res[r]["mix"], res[r]
    assert "neighbour 1" in res[0]["mix"] and "neighbour 1" in res[2]["mix"]


class _OneProcess:
    """The process-group calls ``evaluate`` makes, for one process."""
    Sum = Average = "sum"

    def rank(self):
        return 0

    def size(self):
        return 1

    def allreduce(self, t, op=None, name=None):
        return t.clone()


def _evaluate_saved(state, rec):
    from hvd_rsgc.app.config import load_config
    from hvd_rsgc.app.data import build_datasets
    from hvd_rsgc.app.models import build_model
    from hvd_rsgc.app.train import evaluate
    from hvd_rsgc.app.metrics import summarize
    cfg = load_config(os.path.join(ROOT, "examples", "configs", "synthetic.yaml"))
    _, val, classes = build_datasets(cfg.data, cfg.run.seed)
    model = build_model(cfg.optim.model, len(classes), cfg.data.image_size)
    model.load_state_dict(state)
    cm, _ = evaluate(model, val, cfg, _OneProcess(), len(classes))
    return summarize(cm)["oa"]


@pytestmark_mp
def test_training_cli_rdpsgd_under_mpirun(tmp_path):
    p, _ = mpirun_python(4, "-m", "hvd_rsgc.train", "--config",
                         os.path.join(ROOT, "examples", "configs", "synthetic.yaml"), "--algorithm",
                         "rdpsgd", "--sparsity_ratio", "0.2", "--out_dir", str(tmp_path), "--run_name",
                         "rd", "--epochs", "1", "--max_steps_per_epoch", "4", "--progress", "false",
                         cwd=str(tmp_path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rec = json.loads((tmp_path / "rd" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["consensus_distance"] is not None and rec["consensus_distance"] > 0
    # p = 0.2 of the parameters to 2 neighbours per round: about 5x fewer bytes than dense
    assert 3.5 < rec["compression_ratio"] < 7
    shards = []
    for r in range(4):                                   # every rank's own model in its shard
        sh = torch.load(tmp_path / "rd" / "checkpoints" / f"epoch0000.rank{r:03d}.pt", weights_only=True)
        assert "model" in sh and sh["rdpsgd"]["rounds"] == 4
        shards.append(sh["model"])
    # the main checkpoint holds the model that was evaluated: the average of the ranks' models
    # with BatchNorm statistics re-estimated for it (not the ranks' averaged statistics)
    main = torch.load(tmp_path / "rd" / "checkpoints" / "epoch0000.pt", weights_only=True)["model"]
    params = [k for k in main if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for k in params:
        avg = sum(sh[k].double() for sh in shards) / 4
        assert torch.allclose(main[k].double(), avg, atol=1e-6), k
    assert shards[0][params[0]].ne(shards[1][params[0]]).any()        # the ranks did differ
    var = [k for k in main if k.endswith("running_var")]
    assert var and all(not torch.allclose(main[k], shards[0][k]) for k in var[:3])
    assert _evaluate_saved(main, rec) == pytest.approx(rec["top1"], abs=1.01 / 256)  # batching: +-1 image


@pytestmark_mp
def test_rdpsgd_under_gloo_launch_is_refused(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [horovodrun(), "-np", "2", "--gloo", sys.executable, "-m", "hvd_rsgc.train", "--config",
           os.path.join(ROOT, "examples", "configs", "synthetic.yaml"), "--algorithm", "rdpsgd",
           "--out_dir", str(tmp_path), "--epochs", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert p.returncode != 0 and "launch with mpirun or horovodrun --mpi" in p.stdout + p.stderr


@pytestmark_mp
def test_rdpsgd_resume_is_bit_exact(tmp_path):
    """1 + 1 epochs (stop, then --resume) equals 2 epochs: every rank's own model."""
    common = ["--config", os.path.join(ROOT, "examples", "configs", "synthetic.yaml"), "--algorithm",
              "rdpsgd", "--sparsity_ratio", "0.3", "--out_dir", str(tmp_path), "--epochs", "2",
              "--max_steps_per_epoch", "3", "--progress", "false"]
    for args in (common + ["--run_name", "full"], common + ["--run_name", "split", "--stop_after", "1"],
                 ["--resume", str(tmp_path / "split")]):
        p, _ = mpirun_python(2, "-m", "hvd_rsgc.train", *args, cwd=str(tmp_path))
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for r in range(2):
        a = torch.load(tmp_path / "full" / "checkpoints" / f"epoch0001.rank{r:03d}.pt", weights_only=True)
        b = torch.load(tmp_path / "split" / "checkpoints" / f"epoch0001.rank{r:03d}.pt", weights_only=True)
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (r, k)
        assert a["rdpsgd"] == b["rdpsgd"]


_FAIL_IN_CHECKPOINT = """
import sys
import hvd_rsgc.app.checkpoint as ckpt
def save_main(*a, **k):                      # rank 0 only: its peers wait in the barrier after it
    raise OSError(28, "cannot write checkpoint 'x': no space left on the device")
ckpt.save_main = save_main
from hvd_rsgc.app.train import main
main(sys.argv[1:])
"""


@pytestmark_mp
def test_rank_failing_outside_the_exchange_ends_the_job(tmp_path):
    """Rank 0 fails writing its checkpoint while rank 1 waits in the barrier after it: the job
    must end (MPI_Abort) instead of both waiting forever (rank 1 in the barrier, rank 0 in
    mpi4py's MPI_Finalize), and say why."""
    script = tmp_path / "fail.py"
    script.write_text(_FAIL_IN_CHECKPOINT)
    p, elapsed = mpirun_python(2, str(script), "--config",
                               os.path.join(ROOT, "examples", "configs", "synthetic.yaml"),
                               "--algorithm", "rdpsgd", "--out_dir", str(tmp_path), "--run_name", "rd",
                               "--epochs", "2", "--max_steps_per_epoch", "2", "--progress", "false",
                               timeout=240, cwd=str(tmp_path))
    out = p.stdout + p.stderr
    assert p.returncode != 0 and elapsed < 120, (elapsed, out[-3000:])
    assert "no space left on the device" in out and "aborting the MPI job" in out, out[-3000:]


def test_bench_rdpsgd_times_round_robin_and_counts_the_bytes(monkeypatch):
    """``python -m hvd_rsgc.bench rdpsgd``: every round times each variant once, in turn (the
    speed-ups are per-round ratios, not medians of separate stretches of time), and the bytes
    are 4 per sent value, plus the 8-bit gaps when indices are sent."""
    from hvd_rsgc import bench
    from hvd_rsgc.algorithms.rdpsgd import encode_gaps, geometric_indices
    calls = []
    real = bench._once

    def spy(fn, device):
        calls.append(fn.__name__)
        return real(fn, device)
    monkeypatch.setattr(bench, "_once", spy)
    rows = bench.bench_rdpsgd(numel=50_000, ratios=(0.1,), repeats=3, loop_sample=500)
    assert calls == ["<lambda>", "<lambda>", "vec", "masked", "loop"] * 3
    m = geometric_indices(50_000, 0.1, torch.Generator().manual_seed(0))
    r = rows[0]
    assert (r["bytes_shared_seed"], r["bytes_dense"]) == (4 * m.numel(), 200_000)
    assert r["bytes_8bit_idx"] == 4 * m.numel() + encode_gaps(m).numel() + 4
    assert r["mask/vec"] > 0 and r["loop/vec"] > 0 and r["bern/geo"] > 0


def test_mpi_process_group_reduces_half_types(tmp_path):
    """The gossip runs' process group (mpi4py): bf16 / fp16 tensors have no MPI type (bf16
    raised TypeError); they are reduced in fp32 and handed back in their own dtype."""
    script = tmp_path / "w.py"
    script.write_text(
        "import torch\n"
        "from hvd_rsgc.mpi.process import MPIProcessGroup\n"
        "g = MPIProcessGroup(); g.init(); r = g.rank()\n"
        "for dt in (torch.bfloat16, torch.float16):\n"
        "    s = g.allreduce(torch.full((3,), r + 1.5, dtype=dt), op=g.Sum)\n"
        "    a = g.allreduce(torch.full((3,), r + 1.5, dtype=dt), op=g.Average)\n"
        "    assert s.dtype == dt and a.dtype == dt, (s.dtype, a.dtype)\n"
        "    assert s.tolist() == [4.0] * 3 and a.tolist() == [2.0] * 3, (s, a)\n"
        "print('ok', r)\n")
    p, _ = mpirun_python(2, str(script), timeout=120, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.count("ok") == 2, p.stdout[-2000:] + p.stderr[-2000:]
