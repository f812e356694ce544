"""The DDP backend: every registered compressor as a DDP comm hook, under a real torchrun
(Gloo, 2 and 4 processes). Parameters bit-identical across ranks after every step; bytes
counted by wrapping torch.distributed's collectives equal the library's byte meter; density 1
reproduces plain DDP; loss falls; no_sync + gradient_as_bucket_view + static graph; resume is
bit-exact; the double-momentum check applies."""
import os

import pytest

from support import MP, assert_same_checkpoint, read_ranks, torchrun

WORKER = os.path.join(MP, "ddp_worker.py")
pytestmark = pytest.mark.multiproc
KINDS = ["none", "fp16", "topk", "randomk", "dgc", "qsgd", "rsdgc", "rsdgc-int8", "lgc-rar",
         "powersgd", "signsgd", "efsignsgd", "terngrad", "natural", "threshold",
         "rsdgc-nobias"]     # no dense tensor in a bucket: the meter's step opens at the bucket


def run(np_, out, *args):
    p, _ = torchrun(np_, WORKER, "--out", str(out), *args, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return read_ranks(out, np_)


@pytest.fixture(scope="module")
def np2(tmp_path_factory):
    return run(2, tmp_path_factory.mktemp("ddp2"))


@pytest.mark.parametrize("kind", KINDS)
def test_ddp_hook_identical_loss_falls_bytes_counted(np2, kind):
    for r in np2:
        x = r["train"][kind]
        assert all(x["identical"]), x["identical"]
        assert x["after"] < x["before"], (x["before"], x["after"])
        assert x["wire"] == x["lib"], (x["wire"], x["lib"])           # meter == what torch.distributed got
        if kind in ("topk", "randomk", "dgc", "rsdgc", "rsdgc-int8"):
            assert x["wire"][-1] < x["dense"] / 5, (x["wire"][-1], x["dense"])
        if kind == "rsdgc-int8":          # S + 2 + 4 bytes per unit instead of 4S + 4
            rs = np2[0]["train"]["rsdgc"]["wire"][-1]
            assert x["wire"][-1] < 0.6 * rs, (x["wire"][-1], rs)
        if kind == "fp16":
            assert x["wire"][-1] < 0.6 * x["dense"]
        if kind in ("signsgd", "efsignsgd", "terngrad", "powersgd"):      # bit-packed / low rank
            assert x["wire"][-1] < x["dense"] / 8, (kind, x["wire"][-1], x["dense"])


@pytest.mark.parametrize("kind", ["topk", "dgc", "rsdgc"])
def test_ddp_buckets_train_bit_identically_to_per_tensor(np2, kind):
    """The DDP hook's bucketed default (one message per DDP bucket, the averaged sum written
    straight into the bucket's output) and the per-tensor path (fused=False) reach the same
    parameters, bit for bit, on every rank."""
    for r in np2:
        assert r["train"][kind]["sha"] == r["train"][kind + "-pt"]["sha"], kind


def test_ddp_density_one_reproduces_plain_ddp(np2):
    for r in np2:
        assert r["equiv"]["max_diff"] == 0.0
        # no_sync() micro-batches into bucket views: both reduced, as plain DDP reduces them
        assert r["equiv"]["max_diff_nosync"] == 0.0 and r["equiv"]["nosync_moved"] > 0, r["equiv"]


def test_ddp_no_sync_bucket_views_static_graph(np2):
    for r in np2:
        for label in ("nosync_views", "static"):
            x = r["nosync"][label]
            assert all(x["identical"]) and x["steps"] == 6, (label, x)


def test_ddp_resume_is_bit_exact(np2):
    for r in np2:
        assert r["resume"]["equal"]
        assert r["resume_lgc_ps"]["equal"]      # LGC-PS's autoencoder sized from DDP's group


def test_ddp_double_momentum_is_refused(np2):
    for r in np2:
        assert r["momentum"] and "double momentum" in r["momentum"]


def test_ddp_loss_scaler_training_equals_the_unscaled_run(tmp_path):
    """Mixed precision under DDP: a GradScaler's scale doubles and halves (rank 1's overflow
    step, skipped by every rank); with set_grad_scaler the run equals the unscaled one bit for
    bit (buckets and per tensor)."""
    for r in run(2, tmp_path, "--scenarios", "amp", "--kinds", "none"):
        for kind, x in r["amp"].items():
            assert x["skipped"] == x["skipped_plain"] == [3], (kind, x)
            assert x["scales"] == [1024.0, 1024.0, 2048.0, 2048.0, 1024.0, 1024.0, 2048.0, 2048.0], (kind, x)
            assert x["equal"], (kind, x)


def test_ddp_nonfinite_gradient_skip_and_raise(tmp_path):
    """One layer's gradient is NaN on rank 1 at step 2 (buckets: the flag row of the message;
    per tensor and dense: the flag in the bucket's allreduce). skip: every rank skips exactly
    that step, gets NaN for that tensor, keeps its state finite and trains on identically;
    raise: every rank's backward raises, naming the parameter."""
    for r in run(2, tmp_path, "--scenarios", "nonfinite", "--kinds", "none"):
        for kind, x in r["nonfinite"].items():
            if kind.endswith("!"):
                assert x["raised"] and "non-finite gradient" in x["raised"] \
                    and "conv2.weight" in x["raised"] and x["step"] == 2, (kind, x)
                continue
            assert x["raised"] is None and x["skipped"] == [2], (kind, x)
            assert x["nan_grad"] and all(x["identical"]) and len(x["identical"]) == 5, (kind, x)
            assert x["params_finite"] and x["memory_finite"] and x["stats_skipped"] == 1, (kind, x)
            # the meter == torch.distributed's bytes, the NaN step included (the rank sending
            # an empty message still sends the padding up to the other rank's rows)
            assert all(w == lib for w, lib in x["wire"]), (kind, x["wire"])
            if kind.startswith("lgc"):      # one of six steps' rounds did not run; none lost
                assert x["kept"] is True and x["rounds"] == 5, (kind, x)
            elif kind != "fp16":            # what each rank sent in the skipped step came back
                # (every compressed tensor of rank 0, rank 1's but the NaN one)
                assert x["given_back"] == 4 - r["rank"], (kind, x)


def test_ddp_parameter_no_rank_used_loses_nothing(tmp_path):
    """DDP(find_unused_parameters=True) leaves the gradient of a parameter that no rank used
    untouched (None) and drops the hook's result for it: what each rank sent of that
    parameter must come back into its residual at the optimizer's step (it used to be lost,
    about 1% of the residual's mass a step for Top-k), the parameter must not move, the
    local momentum of a dense tensor of it (DGC, RS-DGC) must not decay, and the ranks stay
    bit-identical. Buckets, per tensor, the reduce-scatter; Top-k, RS-DGC, DGC."""
    for r in run(2, tmp_path, "--scenarios", "unused", "--kinds", "none"):
        for kind, x in r["unused"].items():
            assert x["given_back"] == [1, 1], (kind, x)
            assert x["still"] == [True, True], (kind, x)
            # fc3.bias, sent dense: DGC's and RS-DGC's local momentum of it was checked too
            assert x["momentum_checked"] == (0 if kind.startswith("topk") else 2), (kind, x)
            assert all(x["identical"]) and len(x["identical"]) == 5, (kind, x)
            # a second step() after zero_grad() (a second optimizer's) gives nothing back again
            assert x["not_twice"] == [True] * 5, (kind, x)


def test_ddp_four_processes(tmp_path):
    for r in run(4, tmp_path, "--scenarios", "train", "--kinds", "rsdgc,topk,dgc", "--steps", "6"):
        for kind, x in r["train"].items():
            assert all(x["identical"]) and x["wire"] == x["lib"], (kind, x)


def test_ddp_on_a_process_group_keeps_every_collective_in_it(tmp_path):
    """DDP(process_group=G) with the compressor on G (process_set=G): two groups of 2 ranks
    train apart, each bit-identical inside (the hook used to run on the default group)."""
    for r in run(4, tmp_path, "--scenarios", "groups", "--kinds", "rsdgc,topk-pt,dgc,fp16,powersgd"):
        for kind, x in r["groups"].items():
            assert x["same_in_group"] and x["groups_apart"] and x["group_size"] == 2, (kind, x)
            assert x["refused"] and "process_set" in x["refused"] and "ProcessGroup" in x["refused"], x


def test_ddp_four_processes_reduce_scatter(tmp_path):
    """communicator="reduce_scatter": one balanced sparse reduce-scatter + allgather per DDP
    bucket (issue #15); ranks identical, loss falls, meter == torch.distributed's bytes."""
    for r in run(4, tmp_path, "--scenarios", "train", "--kinds", "rsdgc,topk,dgc", "--steps", "6",
                 "--options", '{"communicator": "reduce_scatter"}'):
        for kind, x in r["train"].items():
            assert all(x["identical"]) and x["wire"] == x["lib"], (kind, x)
            assert x["after"] < x["before"], kind
            assert x["collective"] and x["collective"]["kept_units"] <= x["collective"]["owner_units"]


def test_training_cli_backend_ddp_resumes_bit_exactly(tmp_path):
    """``torchrun ... -m hvd_rsgc.train --backend ddp``: a run stopped after 1 of 2 epochs and
    resumed ends with the same model and residuals as the run done in one go."""
    synth = os.path.join(os.path.dirname(MP), "..", "examples", "configs", "synthetic.yaml")
    common = ["-m", "hvd_rsgc.train", "--config", synth, "--out_dir", str(tmp_path), "--epochs", "2",
              "--max_steps_per_epoch", "3", "--progress", "false", "--compression", "rsdgc",
              "--backend", "ddp", "--synthetic_train", "96", "--synthetic_val", "32"]
    for extra in (["--run_name", "full"], ["--run_name", "split", "--stop_after", "1"],
                  ["--resume", str(tmp_path / "split")]):
        args = common + extra if extra[0] != "--resume" else ["-m", "hvd_rsgc.train", *extra]
        p, _ = torchrun(2, *args, cwd=str(tmp_path))
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    a, _, _ = assert_same_checkpoint(tmp_path / "full", tmp_path / "split", 1, ranks=2)
    assert a["config"]["backend"] == "ddp"
    assert a["history"][-1]["compression_ratio"] > 10


def test_ddp_four_processes_fused_buckets(tmp_path):
    """fused=True: one message per DDP bucket (per unit size); ranks identical, loss falls,
    meter == torch.distributed's bytes."""
    for r in run(4, tmp_path, "--scenarios", "train", "--kinds", "rsdgc,topk,dgc", "--steps", "6",
                 "--options", '{"fused": true}'):
        for kind, x in r["train"].items():
            assert all(x["identical"]) and x["wire"] == x["lib"], (kind, x)
            assert x["after"] < x["before"], kind


def test_process_group_has_a_backend_for_cpu_tensors_on_a_gpu_machine(monkeypatch):
    """``--backend ddp`` on a GPU machine: the loop reduces CPU tensors (metrics, counts) and
    ``--device cpu`` runs DDP on the CPU; a group of NCCL alone has no backend for them (it
    failed at the end of the first epoch). Unknown reduce ops are refused by name."""
    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import BackendConfig

    from hvd_rsgc.ddp.process import TorchProcessGroup, backend_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("HVD_RSGC_DDP_BACKEND", raising=False)
    assert BackendConfig(dist.Backend(backend_spec())).get_device_backend_map() \
        == {"cpu": "gloo", "cuda": "nccl"}
    monkeypatch.setenv("HVD_RSGC_DDP_BACKEND", "gloo")
    assert backend_spec() == "gloo"
    with pytest.raises(ValueError, match="op must be 'sum' or 'average', got 'max'"):
        TorchProcessGroup().allreduce(torch.ones(1), op="max")
