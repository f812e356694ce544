"""RS-DGC's whole-group route (``kernels="grouped"``, ``algorithms/grouped.py``) against the
per-layer eager route of the same bucket codec: the same message bytes, residuals, momentum
and sent counts over several steps, for every memory it takes, every value and index dtype,
kernels, padded and unpadded tiles, 5x5 kernels and element units; groups it does not take
(inf / NaN, a unit that is not s x s) go the per-layer way; residual buffers replaced from
outside (``load_state_dict``) are taken over; the state stays within 3 fp32 words per
parameter; two ranks under ``horovodrun`` (and through the DDP hook under ``torchrun``) train
bit-identically with it, and a training run stopped and resumed ends where the uninterrupted
one does."""
import os

import pytest
import torch

from hvd_rsgc.algorithms import grouped
from hvd_rsgc.algorithms.base import make_layer
from hvd_rsgc.algorithms.bucket import BucketCodec
from hvd_rsgc.algorithms.dgc import DGC
from hvd_rsgc.algorithms.memory import ErrorFeedback, MomentumCorrection, NoMemory
from hvd_rsgc.algorithms.rsdgc import RSDGC
from hvd_rsgc.algorithms.select import SamplePlan
from hvd_rsgc.algorithms.topk import TopK

from support import MP, ROOT, assert_same_checkpoint, read_ranks, results, run_module, torchrun

# 3x3 kernels, padded and unpadded tiles (s = 3), 5x5 kernels (their own group, s = 5)
SHAPES = [(64, 64, 3, 3), (512, 96, 1, 1), (40, 31), (16, 8, 3, 3), (8, 4, 5, 5), (1000, 10),
          (63, 600), (7, 3, 5, 5)]
MEMORIES = {
    "momentum": lambda: MomentumCorrection(0.9),
    "nesterov": lambda: MomentumCorrection(0.9, nesterov=True),
    "nomask": lambda: MomentumCorrection(0.9, masking=False),
    "ef": ErrorFeedback,
    "none": NoMemory,
}


@pytest.fixture
def spy(monkeypatch):
    """Records whether each call of the grouped route took the group (True) or declined."""
    calls = []
    real = grouped.encode_group

    def wrapped(*a, **k):
        out = real(*a, **k)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(grouped, "encode_group", wrapped)
    return calls


def _run(kernels, mem, shapes=SHAPES, density=0.01, steps=3, grads_of=None, between=None,
         cls=RSDGC, **kw):
    m = cls(MEMORIES[mem](), kernels=kernels, **kw)
    layers = [make_layer(m, s, density, name=f"t{i}", index=i) for i, s in enumerate(shapes)]
    codec = BucketCodec(m, layers)
    g = torch.Generator().manual_seed(7)
    out = []
    for step in range(steps):
        if between is not None:
            between(step, layers)
        grads = {st.name: torch.randn(st.shape, generator=g) for st in layers}
        if grads_of is not None:
            grads = grads_of(step, grads)
        ctxs = {st.name: {} for st in layers}
        msgs = codec.encode(grads, ctxs)
        res = {(st.name, k): b.clone() for st in layers for k, b in st.memory.items()}
        dec = codec.decode(msgs)
        out.append(([x.clone() for x in msgs], ctxs, res, {k: v.clone() for k, v in dec.items()},
                    sorted(codec.flagged)))
    return out


def _assert_same(a, b, extra_zero=False):
    for step, (x, y) in enumerate(zip(a, b)):
        (m0, c0, r0, d0, f0), (m1, c1, r1, d1, f1) = x, y
        assert c0 == c1, step
        assert len(m0) == len(m1), step
        for p, q in zip(m0, m1):
            assert p.dtype == q.dtype and p.shape == q.shape, step
            assert torch.equal(p.view(torch.uint8), q.view(torch.uint8)), step
        if extra_zero:              # buffers the grouped route made for layers not seen yet
            assert r1.keys() <= r0.keys()
            assert all(not r0[k].any() for k in r0.keys() - r1.keys())
            r0 = {k: r0[k] for k in r1}
        assert r0.keys() == r1.keys()
        for k in r0:                                    # bit for bit, NaN included
            assert torch.equal(r0[k].view(torch.int32), r1[k].view(torch.int32)), (step, k)
        assert f0 == f1, step
        for k in d0:
            assert torch.equal(d0[k], d1[k]), (step, k)


def _gaps(missing, bad):
    """``grads_of`` for :func:`_run`: the ``missing`` layers have no gradient at step 1, and at
    step 2 each ``(layer, index, value)`` of ``bad`` is written into its gradient."""
    def grads_of(step, grads):
        if step == 1:
            for name in missing:
                grads.pop(name)
        if step == 2:
            for name, index, value in bad:
                grads[name][index] = value
        return grads
    return grads_of


@pytest.mark.parametrize("mem", ["momentum", "nesterov", "nomask", "ef"])
@pytest.mark.parametrize("dtypes", ["fp32", "fp16", "int8", "int64", "int8-int64"])
def test_grouped_equals_per_layer_route(spy, mem, dtypes):
    kw = {"value_dtype": {"fp16": torch.float16, "int8": torch.int8,
                          "int8-int64": torch.int8}.get(dtypes, torch.float32),
          "index_dtype": torch.int64 if "int64" in dtypes else torch.int32}
    _assert_same(_run("grouped", mem, **kw), _run("eager", mem, **kw))
    assert spy and all(spy)                     # the whole-group route ran every time


@pytest.mark.parametrize("cls,mem", [(RSDGC, "momentum"), (RSDGC, "nesterov"), (RSDGC, "ef"),
                                     (TopK, "ef"), (DGC, "momentum")])
def test_grouped_multi_tensor_calls_take_only_dense_tensors(spy, monkeypatch, cls, mem):
    """Every ``torch._foreach_*`` call of the route gets dense tensors, each with its partner's
    strides: on a GPU one strided tensor (a padded tile's view of the flat buffer) sends the
    whole call, every layer of the group, to per-tensor kernels (ATen's
    ``can_use_fast_route``). The padded tiles of SHAPES are updated apart, and still give the
    per-layer route's bits (``test_grouped_equals_per_layer_route``)."""
    seen = []

    def check(name, real):
        def wrapped(*args, **kw):
            lists = [a for a in args if isinstance(a, (list, tuple)) and a
                     and all(isinstance(t, torch.Tensor) for t in a)]
            for lst in lists:
                for j, t in enumerate(lst):
                    assert t.is_contiguous(), (name, j, tuple(t.shape), t.stride())
                    assert t.stride() == lists[0][j].stride(), (name, j)
            seen.append(name)
            return real(*args, **kw)
        return wrapped
    for name in ("_foreach_add_", "_foreach_add", "_foreach_mul_", "_foreach_copy_",
                 "_foreach_sub_", "_foreach_norm"):
        monkeypatch.setattr(torch, name, check(name, getattr(torch, name)))
    shapes = SHAPES if cls is RSDGC else [(64, 64, 3, 3), (40, 31), (1000, 10), (7, 3, 5, 5)]
    _run("grouped", mem, shapes=shapes, cls=cls)
    assert spy and all(spy) and "_foreach_norm" in seen
    if cls is RSDGC:            # the padded tiles (40, 31), (1000, 10) go apart, the rest together
        lays = [make_layer(cls(MEMORIES[mem]()), s, 0.01, name=f"t{i}", index=i)
                for i, s in enumerate(SHAPES[:4])]
        keys = {"momentum": ["u", "v"], "nesterov": ["u", "v"], "ef": ["e"]}[mem]
        flat = torch.zeros(sum(st.layout.storage_shape[0] * st.layout.storage_shape[1]
                               for st in lays))
        views, off = [], 0
        for st in lays:
            n = st.layout.storage_shape[0] * st.layout.storage_shape[1]
            views.append(st.layout.target_view(flat[off:off + n]))
            off += n
        srcs = [st.layout.source_view(torch.zeros(st.shape), None) for st in lays]
        assert grouped.fast_split({k: views for k in keys}, srcs, [0, 1, 2, 3]) == ([0, 1, 3], [2])


@pytest.mark.parametrize("density", [0.001, 0.25])
@pytest.mark.parametrize("dtypes", ["fp32", "fp16", "int8-int64"])
def test_grouped_topk_equals_per_layer_route(spy, density, dtypes):
    """Top-k (element units, |e| scores) through the same route: the per-layer route's bytes,
    residuals and sums, at a sparse density and at the warm-up's 0.25."""
    kw = {"value_dtype": {"fp16": torch.float16, "int8-int64": torch.int8}.get(dtypes, torch.float32),
          "index_dtype": torch.int64 if "int64" in dtypes else torch.int32}
    shapes = [(64, 64, 3, 3), (512, 96, 1, 1), (40, 31), (300_000,), (1000, 10)]
    _assert_same(_run("grouped", "ef", shapes, density, cls=TopK, **kw),
                 _run("eager", "ef", shapes, density, cls=TopK, **kw))
    assert spy and all(spy)


@pytest.mark.parametrize("density", [0.001, 0.01, 0.25])
@pytest.mark.parametrize("dtypes", ["fp32", "int8-int64"])
def test_grouped_dgc_equals_per_layer_route(spy, density, dtypes):
    """DGC (sampled thresholds, the re-adjust loop: thresholds lowered, more than 1.3x k
    narrowed to the exact top k; momentum factor masking) through the route: the per-layer
    route's bytes, residuals and sums, so the same sample offsets drawn in the same order."""
    kw = {"value_dtype": torch.int8 if "int8" in dtypes else torch.float32,
          "index_dtype": torch.int64 if "int64" in dtypes else torch.int32}
    shapes = [(64, 64, 3, 3), (512, 96, 1, 1), (40, 31), (300_000,), (1000, 10), (7,)]
    _assert_same(_run("grouped", "momentum", shapes, density, steps=4, cls=DGC, **kw),
                 _run("eager", "momentum", shapes, density, steps=4, cls=DGC, **kw))
    assert spy and all(spy)


@pytest.mark.parametrize("density", [0.001, 0.25])
def test_grouped_rsdgc_sampled_selection(spy, density):
    _assert_same(_run("grouped", "momentum", density=density, selection="sampled", steps=4),
                 _run("eager", "momentum", density=density, selection="sampled", steps=4))
    assert spy and all(spy)


@pytest.mark.parametrize("kind", ["bf16", "sparse"])
@pytest.mark.parametrize("cls", [DGC, RSDGC])
def test_grouped_sampled_selection_breaks_ties_as_the_per_layer_route(spy, kind, cls):
    """Gradients with repeated values (bf16-rounded; mostly zeros) where more than 1.3x k
    candidates pass the threshold: both routes keep the largest and, among equal values, the
    lower rows (the per-layer route kept whichever torch.topk chose)."""
    def grads_of(step, grads):
        for k, v in grads.items():
            if kind == "bf16":
                grads[k] = v.bfloat16().float()
            else:
                keep = torch.zeros_like(v).view(-1)
                keep[: max(1, keep.numel() // 200)] = 1.0
                grads[k] = v * keep.view_as(v)
        return grads
    kw = {} if cls is DGC else {"selection": "sampled"}
    shapes = [(1000, 10), (300, 20), (64, 64, 3, 3)]
    _assert_same(_run("grouped", "momentum", shapes, 0.01, steps=3, grads_of=grads_of, cls=cls, **kw),
                 _run("eager", "momentum", shapes, 0.01, steps=3, grads_of=grads_of, cls=cls, **kw))
    assert spy and all(spy)


@pytest.mark.parametrize("cls", [DGC, RSDGC, TopK])
def test_grouped_route_under_a_float64_default_dtype(spy, cls):
    """torch.set_default_dtype(torch.float64) in the user's script: the route's own buffers are
    fp32 (they followed the default, and the group failed after its residuals were touched)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        mem = "ef" if cls is TopK else "momentum"
        shapes = [(64, 64, 3, 3), (40, 31), (1000, 10)]
        a = _run("grouped", mem, shapes, 0.01, steps=2, cls=cls)
        b = _run("eager", mem, shapes, 0.01, steps=2, cls=cls)
    finally:
        torch.set_default_dtype(old)
    _assert_same(a, b)
    assert spy and all(spy)
    assert all(r.dtype == torch.float32 for step in a for r in step[2].values())


def test_grouped_dgc_missing_layers_non_finite_and_warmup_density(spy):
    """DGC: a layer without a gradient draws no sample offset and keeps its residual; a step
    with NaN takes the per-layer route (flag rows; the offsets it draws are the per-layer
    route's own) and the next the group route again; the warm-up's density change (new k,
    new sampling plans, as the engine sets them) between steps."""
    grads_of = _gaps(["t1", "t3"], [("t0", (3, 2, 1, 1), float("nan"))])

    def between(step, layers):
        if step in (3, 4):
            d = 0.25 if step == 3 else 0.0625
            for st in layers:
                st.density = d
                st.plan = SamplePlan.make(st.numel, d)        # what DGC.on_density sets
                st.k = st.plan.num_selects                    # what DGC.units_for gives
    shapes = [(64, 64, 3, 3), (512, 96, 1, 1), (40, 31), (300_000,), (1000, 10)]
    a = _run("grouped", "momentum", shapes, 0.001, steps=6, cls=DGC, grads_of=grads_of,
             between=between)
    b = _run("eager", "momentum", shapes, 0.001, steps=6, cls=DGC, grads_of=grads_of,
             between=between)
    _assert_same(a, b)
    assert a[2][4] == ["t0"] and a[3][1]["t3"]["sent_units"] > 10_000
    assert False in spy and spy.count(True) == 5


def test_grouped_sampled_readjust_stops_after_ten_rounds(spy):
    """A sample whose threshold passes far too few entries (its top entry as the threshold,
    heavy-tailed gradients): ten rounds of lowering, then what passes is sent, on both routes."""
    n, ns = 30_000, 15_000

    def between(step, layers):
        layers[1].plan = SamplePlan(n=n, density=0.5, stride=7, num_samples=n // 7,
                                    top_k_samples=1, num_selects=ns)
        layers[1].k = ns

    def grads_of(step, grads):
        gen = torch.Generator().manual_seed(step)
        u = torch.rand(n, generator=gen)
        grads["t1"] = torch.exp(-20 * u) * torch.sign(torch.randn(n, generator=gen))
        return grads
    shapes = [(1000, 10), (n,)]
    a = _run("grouped", "momentum", shapes, 0.01, steps=2, cls=DGC, between=between, grads_of=grads_of)
    b = _run("eager", "momentum", shapes, 0.01, steps=2, cls=DGC, between=between, grads_of=grads_of)
    _assert_same(a, b)
    sent = [step[1]["t1"]["sent_units"] for step in a]
    assert all(0 < x < 0.8 * ns for x in sent), sent      # still too few after the tenth round
    assert spy and all(spy)


def test_grouped_declines_a_memory_it_does_not_keep(spy):
    """Top-k without error feedback (nothing kept) takes the per-layer route, unchanged."""
    shapes = [(64, 64, 3, 3), (1000, 10)]
    _assert_same(_run("grouped", "none", shapes, cls=TopK), _run("eager", "none", shapes, cls=TopK))
    assert spy and not any(spy)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_grouped_every_beta_and_element_units(spy, beta):
    _assert_same(_run("grouped", "momentum", beta=beta), _run("eager", "momentum", beta=beta))
    _assert_same(_run("grouped", "momentum", neighbourhood=False, shapes=[(64, 32, 3, 3), (300, 20)]),
                 _run("eager", "momentum", neighbourhood=False, shapes=[(64, 32, 3, 3), (300, 20)]))
    assert spy and all(spy)


def test_grouped_missing_layers_dynamic_k_non_finite_and_warmup_density(spy):
    """A layer without a gradient keeps its residual; k changes between steps (dynamic
    density, the warm-up's 0.25); a step with NaN takes the per-layer route (flag rows) and
    the next one the group route again, on the same residuals."""
    grads_of = _gaps(["t1", "t4"], [("t0", (3, 2, 1, 1), float("nan")), ("t5", (0, 0), float("inf"))])

    def between(step, layers):
        if step == 3:
            for st in layers:
                st.k = max(1, st.layout.num_units // 4)
    a = _run("grouped", "momentum", steps=5, grads_of=grads_of, between=between)
    b = _run("eager", "momentum", steps=5, grads_of=grads_of, between=between)
    _assert_same(a, b)
    assert a[2][4] == ["t0", "t5"]              # flagged through the per-layer route
    assert False in spy and spy.count(True) >= 4 * 2


def test_grouped_takes_over_replaced_buffers(spy):
    """Residuals replaced from outside between steps (as ``load_state_dict`` does: a new
    ``memory`` dict) are what the next step accumulates into."""
    def between(step, layers):
        if step == 2:
            for st in layers[:3]:
                st.memory = {"u": st.memory["u"].clone(), "v": st.memory["v"].clone() + 0.5}
    _assert_same(_run("grouped", "momentum", steps=4, between=between),
                 _run("eager", "momentum", steps=4, between=between))
    assert spy and all(spy)


def test_grouped_layers_without_buffers_yet(spy):
    """A layer whose residual does not exist yet (never had a gradient, as the engine leaves
    it) gets a zero one in the flat buffer; once it has a gradient it accumulates as usual."""
    def between(step, layers):
        if step == 0:
            for st in layers[2:4]:
                st.memory, st.memory_ready = {}, False

    def grads_of(step, grads):
        if step == 0:
            grads.pop("t2")
            grads.pop("t3")
        return grads

    def ready(step, layers):
        between(step, layers)
        if step == 1:                           # what the engine does before a first gradient
            for st in layers[2:4]:
                if not st.memory_ready:
                    st.memory = MEMORIES["momentum"]().init(st.layout.storage_shape, "cpu",
                                                            torch.float32)
                    st.memory_ready = True
    _assert_same(_run("grouped", "momentum", steps=3, between=ready, grads_of=grads_of),
                 _run("eager", "momentum", steps=3, between=ready, grads_of=grads_of),
                 extra_zero=True)
    assert spy and all(spy)


def test_grouped_declines_units_that_are_not_square_blocks(spy):
    """1x9 / 3x3 kernels share a unit size (9) but not a shape: that group goes the per-layer
    way, the 3x3-only group the grouped one."""
    shapes = [(8, 4, 1, 9), (16, 8, 3, 3), (20, 20, 1, 7)]
    _assert_same(_run("grouped", "momentum", shapes=shapes), _run("eager", "momentum", shapes=shapes))
    assert spy.count(False) == 3 * 2            # S=9 (mixed) and S=7, every step


def test_grouped_plans_go_with_their_codec():
    """The cached per-group tables are counted in the workspace and dropped with the codec
    (DDP rebuilds its buckets once: no stale tables kept)."""
    import gc
    m = RSDGC(MomentumCorrection(0.9), kernels="grouped")
    before = m.workspace.nbytes()
    for _ in range(3):
        layers = [make_layer(m, s, 0.01, name=f"t{i}", index=i) for i, s in enumerate(SHAPES)]
        codec = BucketCodec(m, layers)
        codec.encode({st.name: torch.randn(st.shape) for st in layers}, {st.name: {} for st in layers})
        grown = m.workspace.nbytes()
        assert len(m.workspace._kept) == 2 and grown > before       # groups S = 9 and S = 25
        del codec, layers
        gc.collect()
        assert not m.workspace._kept


def test_grouped_state_words_per_parameter(monkeypatch):
    from hvd_rsgc import bench
    monkeypatch.setattr(bench, "resnet50_shapes", lambda: [(256, 128, 3, 3), (64,), (301, 200),
                                                           (512, 256, 1, 1)])
    rows = {r["method"]: r for r in bench.bench_compress(density=0.01, repeats=2,
                                                          names=["rsdgc-fused-grouped",
                                                                 "topk-fused-grouped",
                                                                 "dgc-fused-grouped"])}
    r = rows["rsdgc-fused-grouped"]
    assert 2.0 < r["words_per_param"] <= 3.0 and r["bytes"] > 0        # u, v + workspace
    r = rows["topk-fused-grouped"]
    assert 1.0 < r["words_per_param"] <= 2.01 and r["bytes"] > 0       # e + |e|
    r = rows["dgc-fused-grouped"]
    assert 2.0 < r["words_per_param"] <= 3.0 and r["bytes"] > 0        # u, v + |v|, mask


def test_grouped_kernels_bit_identical_ranks_np2(tmp_path):
    kinds = ("rsdgc+fused", "rsdgc_int8+fused", "topk+fused", "dgc+fused")     # buckets: where the route runs
    res = results(2, tmp_path, "--scenarios", "train", "--kinds", ",".join(kinds), "--steps", "4",
                  "--options", '{"kernels": "grouped"}', timeout=600)
    for kind in kinds:
        for r in res:
            t = r["train"][kind]
            assert t["identical"] and t["loss1"] < t["loss0"], kind
            for step in t["steps"]:            # the meter: the bytes Horovod's collectives moved
                assert step["lib_step_bytes"] == sum(step["wire"].values()) > 0, kind
        assert res[0]["train"][kind]["params_sha"] == res[1]["train"][kind]["params_sha"]


@pytest.mark.multiproc
def test_grouped_resume_is_bit_exact(tmp_path):
    """The training app with ``--kernels grouped`` stopped after 2 epochs and resumed ends with
    the parameters and every rank's residuals of the uninterrupted run, bit for bit (the
    residuals live in the flat buffers, are saved from them and loaded back into them)."""
    common = ["hvd_rsgc.train", "--config", os.path.join(ROOT, "examples", "configs", "synthetic.yaml"),
              "--out_dir", str(tmp_path), "--epochs", "3", "--max_steps_per_epoch", "3",
              "--progress", "false", "--compression", "rsdgc", "--kernels", "grouped",
              "--compression_warmup_epochs", "1"]
    run_module(2, common + ["--run_name", "full"], tmp_path)
    run_module(2, common + ["--run_name", "split", "--stop_after", "2"], tmp_path)
    run_module(2, ["hvd_rsgc.train", "--resume", str(tmp_path / "split")], tmp_path)
    a, b, shards = assert_same_checkpoint(tmp_path / "full", tmp_path / "split", 2, ranks=2)
    assert [h["top1"] for h in a["history"]] == [h["top1"] for h in b["history"]]
    assert any(t.any() for lay in shards[0]["compression"]["layers"].values()
               for t in lay["memory"].values())        # residuals were kept, and compared


@pytest.mark.multiproc
def test_grouped_kernels_through_the_ddp_hook(tmp_path):
    """Through the DDP comm hook (DDP's own buckets, torchrun with 2 processes): parameters
    identical on both ranks after every step, loss falls, the byte meter equals what
    torch.distributed was handed."""
    p, _ = torchrun(2, os.path.join(MP, "ddp_worker.py"), "--out", str(tmp_path), "--scenarios",
                    "train", "--kinds", "rsdgc,topk,dgc", "--steps", "5", "--options",
                    '{"kernels": "grouped"}', timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for r in read_ranks(tmp_path, 2):
        for kind in ("rsdgc", "topk", "dgc"):
            x = r["train"][kind]
            assert all(x["identical"]) and x["wire"] == x["lib"], (kind, x)
            assert x["after"] < x["before"], kind
