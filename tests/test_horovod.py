"""Multi-process tests under a real ``horovodrun`` (Gloo), stock ``hvd.DistributedOptimizer``.

The worker (tests/mp/worker.py) runs the scenarios on every rank and writes JSON; these tests
assert on it. Bytes are counted by intercepting Horovod's collective entry points
(tests/mp/wirecount.py), not by the library's own counter.
"""
import math
import os
import subprocess

import pytest

from support import ROOT, horovodrun, launch, results  # noqa: F401
DENSITY = 0.02
pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def np2(tmp_path_factory):
    return results(2, tmp_path_factory.mktemp("np2"))


@pytest.fixture(scope="module")
def np4(tmp_path_factory):
    return results(4, tmp_path_factory.mktemp("np4"), "--scenarios", "train,equiv",
                   "--kinds", "topk,dgc,rsdgc,randomk,qsgd", "--steps", "30")


KINDS = ["none", "fp16", "topk", "randomk", "dgc", "qsgd", "rsdgc", "rsdgc_fp16", "rsdgc_int8",
         "topk+fused", "dgc+fused", "rsdgc+fused", "rsdgc_int8+fused"]


def numel(shape):
    return math.prod(shape)


def expected_bound(kind, name, shape, layer):
    """Upper bound of bytes one rank may submit for one tensor in one step (values+indices),
    from the configuration alone. The 4-byte placeholder allreduce is listed separately."""
    n = numel(shape)
    if kind == "none":
        return 4 * n
    if kind == "fp16":
        return 2 * n
    k = math.ceil(DENSITY * n)
    if kind in ("topk", "dgc"):
        return k * (4 + 4)
    if kind == "randomk":
        return k * 4
    if kind == "qsgd":
        return 4 * math.ceil(n / 512) + math.ceil(n * 2 / 8)
    # RS-DGC: per-layer density is dynamic; the bound uses the density the layer reported and
    # whole units of S values + one int32 index (eq. 11), values fp32 or fp16; int8: S bytes +
    # a 2-byte bfloat16 scale per unit
    S = layer["unit_size"]
    units = math.ceil(math.ceil(round(layer["density"] * n, 9)) / (n / _num_units(shape, S)))
    per_unit = {"rsdgc_fp16": 2 * S + 4, "rsdgc_int8": S + 2 + 4}.get(kind, 4 * S + 4)
    return max(1, units) * per_unit


def _num_units(shape, S):
    if len(shape) == 4 and shape[2] * shape[3] > 1:
        return shape[0] * shape[1]
    h, w = shape[0], numel(shape) // shape[0]
    return math.ceil(h / 3) * math.ceil(w / 3)


@pytest.mark.parametrize("kind", KINDS)
def test_np2_training_identical_params_loss_falls_sparse_bytes(np2, kind):
    kind, _, fused = kind.partition("+")
    for rank_res in np2:
        r = rank_res["train"][kind + ("+" + fused if fused else "")]
        assert r["identical"], f"{kind}: parameters differ across ranks"
        assert r["memory_finite"]
        # loss falls on the learnable task (1-bit QSGD is noisy: a smaller margin)
        assert r["loss1"] < r["loss0"] * (0.95 if kind != "qsgd" else 0.99), (kind, r["loss0"], r["loss1"])
        assert all(s["grads_none"] for s in r["steps"]), "zero_grad() did not set grads to None"
        shapes, compressed = r["shapes"], set(r["compressed"])
        if kind in ("none", "fp16"):
            assert not compressed
        else:
            assert compressed == {"conv1.weight", "conv2.weight", "proj.weight", "fc.weight"}
        for step in r["steps"]:
            wire = step["wire"]
            # the library's own count agrees with the intercepted one
            assert step["lib_step_bytes"] == sum(wire.values())
            for name, shape in shapes.items():
                n = numel(shape)
                if name not in compressed:
                    want = 2 * n if kind == "fp16" else 4 * n
                    assert wire[name] == want, (name, wire.get(name))
                    continue
                bound = expected_bound(kind, name, shape, r["layers"][name])
                if kind == "randomk":                    # values through the stock allreduce
                    assert wire[name] == bound
                    assert f"hvd_rsgc.{name}" not in wire
                    continue
                assert wire[name] == 4, "placeholder allreduce must be one element"
                if fused:                                # checked per bucket below
                    assert f"hvd_rsgc.{name}" not in wire
                    continue
                sparse = wire[f"hvd_rsgc.{name}"]
                if kind == "qsgd":
                    assert sparse == bound
                elif kind == "dgc":                      # the sampled threshold: at most k
                    assert 0 < sparse <= bound, (kind, name, sparse, bound)
                    assert sparse < 4 * n / 5, (kind, name, sparse, n)
                else:                                    # exact top-k: k units, no more, no less
                    assert sparse == bound, (kind, name, sparse, bound)
            if fused:
                # one allgather per bucket (per unit size) carries all compressed tensors: the
                # sum of the per-tensor bounds holds for it, and there are fewer messages
                buckets = [n for n in wire if n.startswith("hvd_rsgc.bucket")]
                assert 0 < len(buckets) < len(compressed), buckets
                total = sum(wire[n] for n in buckets)
                want = sum(expected_bound(kind, c, shapes[c], r["layers"][c]) for c in compressed)
                if kind == "dgc":
                    assert 0 < total <= want, (kind, total, want)
                else:                                    # exact top-k: every layer's k units
                    assert total == want, (kind, total, want)
                continue
            if kind.startswith("rsdgc"):
                # dynamic per-layer densities: the values sent in all (units counted from the
                # bytes, each unit S values + its index) are the configured global density's
                # rho*M (eq. 4-5), within the starvation floor (0.1*rho*N_l) and one unit of
                # rounding per layer
                M = sum(numel(shapes[c]) for c in compressed)
                S = {c: r["layers"][c]["unit_size"] for c in compressed}
                per_unit = {c: {"rsdgc_fp16": 2 * S[c] + 4, "rsdgc_int8": S[c] + 6}.get(kind, 4 * S[c] + 4)
                            for c in compressed}
                sent = {c: step["wire"][f"hvd_rsgc.{c}"] for c in compressed}
                assert all(b % per_unit[c] == 0 for c, b in sent.items()), (sent, per_unit)
                values = sum(b // per_unit[c] * S[c] for c, b in sent.items())
                assert abs(values - DENSITY * M) <= 0.1 * DENSITY * M + sum(S.values()), (values, M)


def test_np2_rsdgc_sends_fewer_bytes_than_dense(np2):
    r = np2[0]["train"]
    dense = sum(r["none"]["steps"][-1]["wire"].values())
    for kind in ("topk", "dgc", "rsdgc", "randomk", "qsgd"):
        assert sum(r[kind]["steps"][-1]["wire"].values()) < dense / 10, kind


def test_np2_density_one_reproduces_dense_training(np2):
    for rank_res in np2:
        eq = rank_res["equiv"]
        for kind, v in eq.items():
            assert v["identical"]
            assert v["max_abs_diff"] <= 1e-6 * max(1.0, v["ref_scale"]), (kind, v)


def test_np2_backward_passes_per_step(np2):
    for rank_res in np2:
        b = rank_res["bpps"]
        assert b["identical"]
        assert set(b["compress_calls"].values()) == {4}      # 4 steps x 2 passes -> 4 compressions
        for kind, v in b["dense_equiv"].items():             # both passes' gradients, summed
            assert v["max_abs_diff"] <= 1e-6 * max(1.0, v["ref_scale"]), (kind, v)


def test_np2_parameter_without_gradient_on_some_steps(np2):
    for rank_res in np2:
        m = rank_res["missing"]
        assert m["compressed"] and m["identical"] and m["steps"] == 6 and m["as_zeros"], m


def test_np1_parameter_without_gradient_on_some_steps(tmp_path):
    """-np 1, where Horovod registers no hooks and the compressor runs in the step's pre-hook:
    a parameter the optimizer updates but which has no gradient on a step gets zeros, as
    Horovod's synchronize() submits at -np N. The fused default's bucket used to miss it, and
    that step and every later one raised."""
    m = results(1, tmp_path, "--scenarios", "missing")[0]["missing"]
    assert m["compressed"] and m["steps"] == 6
    assert m["as_zeros"], m             # the same bits as a run given those zeros by hand


def test_np2_double_momentum_is_an_error_on_every_rank(np2):
    for rank_res in np2:
        assert "double momentum" in rank_res["momentum"]["error"]


def test_np2_nonfinite_gradient_raises_on_every_rank_residual_clean(np2):
    for rank_res in np2:
        nf = rank_res["nonfinite"]
        assert len(nf["raised"]) == 1 and "non-finite gradient" in nf["raised"][0]
        assert nf["memory_finite"] and nf["params_finite"]


def test_np2_skip_policy_skips_the_step_on_every_rank_and_training_goes_on(tmp_path):
    """Reliability: after a non-finite gradient the job can go on (nonfinite="skip")."""
    rs = results(2, tmp_path, "--scenarios", "skip,fp16big")
    for r in rs:
        for kind, x in r["skip"].items():
            assert x["skipped"] == [2], (kind, x)
            assert x["nan_grad"] and x["identical"] and x["params_finite"] and x["memory_finite"], (kind, x)
            assert x["stats_skipped"] == 1, (kind, x)
            if kind.startswith("lgc"):      # one of six steps' rounds did not run; none lost
                assert x["kept"] is True and x["rounds"] == 5, (kind, x)
            elif kind != "fp16":            # what each rank sent in the skipped step came back
                assert isinstance(x["given_back"], int), (kind, x)
        # defect 1: a finite fp16 gradient whose fp16 sum overflows is no "non-finite gradient"
        assert r["fp16big"] == {"error": None, "params_finite": True}, r["fp16big"]
        # Random-k's fp16 values, each in range, summed past it: saturated at 65504 / P per rank
        assert r["fp16big_randomk"] == {"error": None, "params_finite": True}, r["fp16big_randomk"]
    for kind in ("rsdgc", "topk", "randomk", "rsdgc@conv2", "dgc@fc", "topk+perlayer@fc",
                 "rsdgc+rs@conv2", "qsgd_ef@fc", "efsignsgd@fc"):
        # tensors checked: rank 0's four, and rank 1's finite ones where one tensor held NaN
        assert [r["skip"][kind]["given_back"] for r in rs] == ([4, 0] if "@" not in kind else [4, 3]), kind


def test_np2_loss_scaler_training_equals_the_unscaled_run(tmp_path):
    """Mixed precision: a GradScaler's scale moves (doubling after good steps, halving at an
    overflow step that every rank skips); the residuals and momentum follow it
    (``set_grad_scaler``), so the run equals the unscaled one bit for bit. Without that, what
    the residuals carry from before a change would be weighted 2x or 0.5x."""
    for r in results(2, tmp_path, "--scenarios", "amp"):
        for kind, x in r["amp"].items():
            assert x["skipped"] == x["skipped_plain"] == [3], (kind, x)
            assert x["scales"] == [1024.0, 1024.0, 2048.0, 2048.0, 1024.0, 1024.0, 2048.0, 2048.0], (kind, x)
            # the buffers are in the last step's scale (the scaler's doubling after it is
            # applied at the next step's first tensor, also after a resume)
            assert x["saved_scale"] == 2048.0, (kind, x)
            assert x["equal"], (kind, x)


def test_np2_sparse_gradient_is_refused_clearly_on_every_rank(tmp_path):
    """Reliability defect 4: nn.Embedding(sparse=True) at -np 2 gave every rank
    TypeError: 'NoneType' object is not subscriptable."""
    for r in results(2, tmp_path, "--scenarios", "sparse"):
        err = r["sparse"]["error"]
        assert err and "torch.sparse" in err and "sparse_as_dense=True" in err, err


@pytest.mark.parametrize("np_", [1, 2])
def test_sparse_as_dense_compresses_the_embedding_like_its_dense_twin(tmp_path, np_):
    """What the refusal above recommends works: with sparse_as_dense=True Horovod compresses
    p.grad.to_dense() (a new tensor; at -np 1 the binding does it the same way)."""
    for r in results(np_, tmp_path, "--scenarios", "sparse_as_dense"):
        x = r["sparse_as_dense"]
        assert x["identical"] and x["max_diff_dense_twin"] <= 1e-6, x
        assert x["compressed"] == ["0.weight", "2.weight"], x


@pytest.mark.parametrize("kind", ["topk", "dgc", "rsdgc", "randomk", "qsgd"])
def test_np4_oversubscribed(np4, kind):
    for rank_res in np4:
        r = rank_res["train"][kind]
        assert r["identical"]
        assert r["loss1"] < r["loss0"] * (0.97 if kind != "qsgd" else 0.995), (kind, r["loss0"], r["loss1"])
        for step in r["steps"]:
            assert step["lib_step_bytes"] == sum(step["wire"].values())
    for rank_res in np4:
        for kind, v in rank_res["equiv"].items():
            assert v["max_abs_diff"] <= 1e-6 * max(1.0, v["ref_scale"]), (kind, v)


def test_rank_failure_ends_job_within_timeout(tmp_path):
    proc, elapsed = launch(2, tmp_path, "--scenarios", "die", timeout=120)
    assert proc.returncode != 0
    assert elapsed < 120


def test_mpi_controller(tmp_path):
    """The same equivalence scenario under Horovod's MPI controller (mpirun underneath)."""
    for res in results(2, tmp_path, "--scenarios", "equiv", controller="--mpi", timeout=300):
        eq = res["equiv"]
        assert all(v["identical"] and v["max_abs_diff"] <= 1e-6 for v in eq.values()), eq


def test_check_build_lists_pytorch_gloo_mpi():
    out = subprocess.run([horovodrun(), "--check-build"], capture_output=True, text=True, timeout=60).stdout
    for line in ("[X] PyTorch", "[X] MPI", "[X] Gloo"):
        assert line in out, out


@pytest.mark.parametrize("kind", ["topk", "dgc", "rsdgc", "rsdgc_int8"])
def test_np2_fused_trains_bit_identically_to_per_tensor(np2, kind):
    """At -np 2 with op=Average (the default): the bucketed path (one allgather per bucket, the
    sum divided in place in its decode buffer) and the per-tensor path train to the same
    parameters, bit for bit, on every rank."""
    for r in np2:
        a, b = r["train"][kind], r["train"][kind + "+fused"]
        assert a["identical"] and b["identical"]
        assert a["params_sha"] == b["params_sha"], kind


def test_deterministic_groups_follow_backward_order_and_the_cap():
    """``horovod/deterministic.groups``: trainable parameters only, reverse registration order
    (the order backward produces them), consecutive groups of <= group_mb MiB, a larger
    parameter alone; bad input named."""
    import torch.nn as nn

    import hvd_rsgc.horovod.deterministic as det
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 1024), nn.Linear(1024, 8))
    model[0].bias.requires_grad_(False)
    mib = 2 ** 20
    gs = det.groups(model, group_mb=0.3)             # weights: 0.25, 1.0, 0.03 MiB
    flat = [p for g in gs for p in g]
    assert flat == [p for p in reversed(list(model.parameters())) if p.requires_grad]
    assert [[tuple(p.shape) for p in g] for g in gs] == [
        [(8,), (8, 1024), (1024,)], [(1024, 256)], [(256, 256)]]
    for g in gs:
        assert len(g) == 1 or sum(p.numel() * 4 for p in g) <= 0.3 * mib
    assert det.groups(model.named_parameters(), group_mb=0.3) == gs      # (name, param) pairs too
    assert len(det.groups(model)) == 1                                    # 8 MiB: one group
    for bad in (0, -1.0, "1", True):
        with pytest.raises(ValueError, match="group_mb"):
            det.groups(model, group_mb=bad)
    with pytest.raises(ValueError, match="no trainable"):
        det.groups([p.detach() for p in model.parameters()])


def test_deterministic_enable_after_init_is_an_error(monkeypatch):
    import horovod.torch as hvd

    import hvd_rsgc.horovod.deterministic as det
    monkeypatch.delenv(det.ENV, raising=False)
    hvd.init()
    with pytest.raises(RuntimeError, match="before hvd.init"):
        det.enable()
    assert det.ENV not in os.environ
