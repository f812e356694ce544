"""The native CPU kernels (``algorithms/native.py``, ``kernels="native"`` / ``"auto"``) against
the eager route and references written here:

* every sparse method (RS-DGC, DGC, Top-k) x every memory (momentum correction, Nesterov,
  error feedback, none) x every layout (3x3 / 5x5 kernels, padded and unpadded tiles,
  elements): the same rows over several steps, values and residuals equal to float rounding
  (bit for bit where no FMA is involved: Nesterov, error feedback, no memory); padded cells of
  the storage never written;
* the NSI scores of the fused loop == the NSI of the (U, S) unit matrix, edge tiles included;
* block extremes == ``amax`` / ``amin`` and the compaction == ``(|x| >= t).nonzero()`` with
  NaN, infinities, signed zeros and tails;
* buckets with native kernels == the per-tensor path with native kernels, bit for bit;
* ``"auto"`` without a compiler falls back to eager with a warning, ``"native"`` then raises
  naming the compiler; ranks starting together build the library once.
"""
import os
import subprocess
import sys

import pytest
import torch

from hvd_rsgc.algorithms import native
from hvd_rsgc.algorithms.base import make_layer, unpack_sparse
from hvd_rsgc.algorithms.dgc import DGC
from hvd_rsgc.algorithms.layout import make_layout
from hvd_rsgc.algorithms.memory import ErrorFeedback, MomentumCorrection, NoMemory
from hvd_rsgc.algorithms.nsi import nsi_scores
from hvd_rsgc.algorithms.rsdgc import RSDGC
from hvd_rsgc.algorithms.select import BLOCK, AtLeast
from hvd_rsgc.algorithms.topk import TopK

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler")

MEMORIES = {
    "momentum": lambda: MomentumCorrection(0.9),
    "nesterov": lambda: MomentumCorrection(0.9, nesterov=True),
    "ef": ErrorFeedback,
    "none": NoMemory,
}
EXACT = ("nesterov", "ef", "none")      # no a + m*b, so no FMA in PyTorch's vector add
SHAPES = [((64, 32, 3, 3), 0.01), ((8, 4, 5, 5), 0.05), ((13, 20), 0.1), ((2, 5), 0.5),
          ((300, 600), 0.002), ((512, 1024, 1, 1), 0.001), ((200_000,), 0.001)]


def _methods(memory, kernels):
    mem = MEMORIES[memory]()
    return {"rsdgc": RSDGC(mem, beta=0.5, kernels=kernels),
            "rsdgc-beta1": RSDGC(MEMORIES[memory](), beta=1.0, kernels=kernels),
            "dgc": DGC(MEMORIES[memory](), seed=2, kernels=kernels),
            "topk": TopK(MEMORIES[memory](), kernels=kernels)}


@pytest.mark.parametrize("memory", list(MEMORIES))
def test_native_equals_eager(memory):
    g = torch.Generator().manual_seed(11)
    eager, nat = _methods(memory, "eager"), _methods(memory, "native")
    assert all(m.kernels == "native" for m in nat.values())
    for name in eager:
        for shape, density in SHAPES:
            a, b = eager[name], nat[name]
            sa, sb = make_layer(a, shape, density), make_layer(b, shape, density)
            L = sa.layout
            for step in range(3):
                grad = torch.randn(shape, generator=g)
                va, ra = unpack_sparse(a.encode(sa, grad, {}), L.unit_size, torch.int32, L.num_units)
                vb, rb = unpack_sparse(b.encode(sb, grad, {}), L.unit_size, torch.int32, L.num_units)
                where = (name, memory, shape, step)
                assert torch.equal(ra, rb), where
                for key in sa.memory:
                    x, y = sa.memory[key], sb.memory[key]
                    if memory in EXACT:
                        assert torch.equal(x, y), where
                    else:
                        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), where
                assert torch.allclose(va, vb, rtol=1e-5, atol=1e-6), where
                if L.kind == "tile" and sb.memory:                 # padded cells never written
                    pad = torch.ones(L.storage_shape, dtype=torch.bool)
                    L.target_view(pad).fill_(False)
                    assert not any(t[pad].any() for t in sb.memory.values()), where


def test_native_scores_equal_unit_matrix_nsi():
    g = torch.Generator().manual_seed(12)
    for shape in [(64, 32, 3, 3), (13, 20), (2, 5), (300, 600), (7, 3, 5, 5), (1, 40)]:
        L = make_layout(torch.Size(shape), True, 1)
        for memory in ("momentum", "ef"):
            for beta in (0.5, 1.0, 0.0):
                m = RSDGC(MEMORIES[memory](), beta=beta, kernels="native")
                st = make_layer(m, shape, 0.1)
                for _ in range(2):
                    out = torch.full((L.num_units,), float("nan"))
                    acc = native.accumulate_scores(m.memory, st, torch.randn(shape, generator=g), beta, out)
                    ref = nsi_scores(L.units_of(acc), beta, L.valid_counts())
                    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), (shape, memory, beta)


def test_native_extremes_and_compaction_equal_eager():
    g = torch.Generator().manual_seed(13)
    for n in (BLOCK * 300, BLOCK * 4000 + 37, 1_000_003):
        x = torch.randn(n, generator=g)
        x[torch.randint(0, n, (50,), generator=g)] = float("nan")
        x[:6] = torch.tensor([0.0, -0.0, 3.0, -3.0, float("-inf"), float("inf")])
        nb = n // BLOCK
        hi, lo = torch.empty(nb), torch.empty(nb)
        native.extremes(x, BLOCK, True, hi, lo)
        w = x[: nb * BLOCK].view(nb, BLOCK)
        assert torch.allclose(hi, w.amax(1), equal_nan=True, rtol=0, atol=0)
        assert torch.allclose(lo, w.amin(1), equal_nan=True, rtol=0, atol=0)
        for magnitude in (True, False):
            f = AtLeast(x, magnitude, expected=0.001, native=True)
            assert f.blocked and f.native
            imp = x.abs() if magnitude else x
            for t in (3.0, 2.5, 4.0, 100.0, 0.0, -1.0, float("inf")):
                ref = (imp >= t).nonzero().view(-1)
                got = f(torch.tensor(t))
                assert got.dtype == torch.int64 and torch.equal(got, ref), (n, magnitude, t)


def test_native_update_then_extremes_of_the_residual():
    """DGC's pre-pass: the extremes handed to the filter are those of the updated residual."""
    m = DGC(MomentumCorrection(0.9), kernels="native")
    st = make_layer(m, (1 << 18,), 0.001)
    g = torch.Generator().manual_seed(14)
    for _ in range(3):
        acc, pre = m.native_pass(st, torch.randn(1 << 18, generator=g))
        nb = acc.numel() // BLOCK
        w = st.memory["v"].view(-1)[: nb * BLOCK].view(nb, BLOCK)
        assert torch.equal(pre[0][:nb], w.amax(1)) and torch.equal(pre[1][:nb], w.amin(1))
        m.memory.mark_sent(st.memory, m.select(st, acc, pre), None, st.layout)


def test_native_buckets_equal_native_per_tensor():
    from test_kernels import assert_buckets_equal_per_tensor
    shapes = [(16, 8, 3, 3), (40, 31), (8, 4, 5, 5), (12, 6, 1, 1), (300,), (64, 600)]
    cases = [(lambda: TopK(ErrorFeedback(), kernels="native"), 0.05),
             (lambda: RSDGC(MomentumCorrection(0.9), kernels="native"), 0.05),
             (lambda: DGC(MomentumCorrection(0.9), seed=3, kernels="native"), 0.1)]
    assert_buckets_equal_per_tensor(cases, shapes)


def test_ranks_with_different_kernels_decode_the_same_sums():
    """A rank's kernels change what it sends, never how the gathered messages are summed."""
    from hvd_rsgc.algorithms.bucket import BucketCodec
    shapes = [(16, 8, 3, 3), (40, 31), (64, 600)]
    kinds = ["native", "eager", "native"]
    ms = [RSDGC(MomentumCorrection(0.9), kernels=k) for k in kinds]
    layers = [[make_layer(m, s, 0.05, name=f"t{i}", index=i) for i, s in enumerate(shapes)] for m in ms]
    codecs = [BucketCodec(m, lay) for m, lay in zip(ms, layers)]
    g = torch.Generator().manual_seed(15)
    for _ in range(3):
        msgs = [c.encode({st.name: torch.randn(st.shape, generator=g) for st in lay},
                         {st.name: {} for st in lay}) for c, lay in zip(codecs, layers)]
        gathered = [torch.cat([m[j] for m in msgs]) for j in range(len(codecs[0].groups))]
        sums = [c.decode(gathered) for c in codecs]
        for name in sums[0]:
            assert torch.equal(sums[0][name], sums[1][name]) and torch.equal(sums[1][name], sums[2][name])


def test_compressors_default_to_native_on_cpu():
    from hvd_rsgc import DGCCompression, RSDGCCompression, TopKCompression
    model = torch.nn.Linear(64, 64)
    for cls in (RSDGCCompression, DGCCompression, TopKCompression):
        assert cls(model).method.kernels == "native"
        assert cls(model, kernels="eager").method.kernels == "eager"
        with pytest.raises(ValueError, match="kernels"):
            cls(model, kernels="fast")
    with pytest.raises(ValueError, match="kernels"):
        TopKCompression(model, kernels="compiled")          # an RS-DGC NSI option only


def _run(code, env):
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


def test_without_a_compiler_auto_falls_back_and_native_names_the_error(tmp_path):
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "HVD_RSGC_CACHE": str(tmp_path / "c")}
    code = ("import warnings, torch\n"
            "from hvd_rsgc import RSDGCCompression\n"
            "m = torch.nn.Linear(64, 64)\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    print(RSDGCCompression(m).method.kernels)\n"
            "    print('WARN', any('eager' in str(x.message) for x in w))\n"
            "try:\n"
            "    RSDGCCompression(m, kernels='native')\n"
            "except RuntimeError as e:\n"
            "    print('ERR', e)\n")
    p = _run(code, env)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "eager" and lines[1] == "WARN True", p.stdout
    assert lines[2].startswith("ERR hvd_rsgc native kernels unavailable") and "no-such-cc" in lines[2]


def test_ranks_starting_together_build_once(tmp_path):
    env = {**os.environ, "HVD_RSGC_CACHE": str(tmp_path / "c")}
    code = ("from hvd_rsgc.algorithms import native\n"
            "import torch\n"
            "from hvd_rsgc.algorithms.memory import MomentumCorrection\n"
            "from hvd_rsgc.algorithms.rsdgc import RSDGC\n"
            "from hvd_rsgc.algorithms.base import make_layer\n"
            "m = RSDGC(MomentumCorrection(0.9), kernels='native')\n"
            "st = make_layer(m, (64, 32, 3, 3), 0.01)\n"
            "print(m.encode(st, torch.ones(64, 32, 3, 3), {}).shape[0])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert {o[0].strip() for o in outs} == {"21"}           # ceil(0.01 * 18432 / 9) kernels
    built = sorted(x.name for x in (tmp_path / "c").iterdir() if x.suffix == ".so")
    assert len(built) == 1 and built[0].startswith("native-"), built


def test_buffers_the_loops_cannot_read_take_the_eager_route():
    """A residual loaded from a checkpoint as fp64 or non-contiguous is not handed to C."""
    g = torch.Generator().manual_seed(16)
    shape = (64, 32, 3, 3)
    for bad in ("float64", "strided"):
        a, b = RSDGC(MomentumCorrection(0.9), kernels="eager"), RSDGC(MomentumCorrection(0.9), kernels="native")
        sa, sb = make_layer(a, shape, 0.01), make_layer(b, shape, 0.01)
        for st in (sa, sb):
            for key in st.memory:
                t = torch.randn(st.memory[key].shape, generator=torch.Generator().manual_seed(1))
                st.memory[key] = t.double() if bad == "float64" else t.t().contiguous().t()
        assert not native.applies(b.memory, torch.ones(shape), sb.memory, sb.layout.numel)
        grad = torch.randn(shape, generator=g)
        assert torch.equal(a.encode(sa, grad, {}), b.encode(sb, grad, {})), bad


def test_a_method_with_only_select_gets_the_native_update():
    """``Threshold`` defines only ``select``: with kernels="native" the base class's native pass
    updates its residual, and it sends what the eager route sends."""
    from hvd_rsgc.algorithms.threshold import Threshold
    g = torch.Generator().manual_seed(17)
    a = Threshold(ErrorFeedback(), threshold=2.5, kernels="eager")
    b = Threshold(ErrorFeedback(), threshold=2.5, kernels="native")
    sa, sb = make_layer(a, (300, 200), 1.0), make_layer(b, (300, 200), 1.0)
    for _ in range(3):
        grad = torch.randn(300, 200, generator=g)
        assert torch.equal(a.encode(sa, grad, {}), b.encode(sb, grad, {}))
        assert torch.equal(sa.memory["e"], sb.memory["e"])


def _group_vs_layers(make, shapes, density, steps=3, grads_of=None, monkeypatch=None):
    """The same method twice, bucket codecs; one takes the per-layer route (``encode_group``
    switched off): messages, residuals and ctxs of every step."""
    from hvd_rsgc.algorithms.bucket import BucketCodec
    runs = []
    for group_route in (True, False):
        m = make()
        if not group_route:
            m.encode_group = lambda *a: None
        layers = [make_layer(m, s, density, name=f"t{i}", index=i) for i, s in enumerate(shapes)]
        codec = BucketCodec(m, layers)
        g = torch.Generator().manual_seed(5)
        out = []
        for step in range(steps):
            grads = {st.name: torch.randn(st.shape, generator=g) for st in layers}
            if grads_of is not None:
                grads = grads_of(step, grads, layers)
            ctxs = {st.name: {} for st in layers}
            msgs = codec.encode(grads, ctxs)
            out.append(([x.clone() for x in msgs], ctxs,
                        [b.clone() for st in layers for b in st.memory.values()]))
        runs.append(out)
    return runs


def _assert_same(runs):
    for (m0, c0, r0), (m1, c1, r1) in zip(*runs):
        assert c0 == c1
        assert len(m0) == len(m1)
        for a, b in zip(m0, m1):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        for a, b in zip(r0, r1):                # bit for bit (NaN included)
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))


# layers large enough for the block-maximum threshold (>= 256 blocks of 64 units, k <= 1/8 of
# them) beside small ones, kernels, padded and unpadded tiles, 5x5 kernels, elements
GROUP_SHAPES = [(256, 256, 3, 3), (512, 1024, 1, 1), (40, 31), (16, 8, 3, 3), (8, 4, 5, 5),
                (1000, 10), (300_000,), (64, 600)]


GROUP_METHODS = {"rsdgc": lambda mem, **kw: RSDGC(mem, kernels="native", **kw),
                 "rsdgc-beta1": lambda mem, **kw: RSDGC(mem, beta=1.0, kernels="native", **kw),
                 "topk": lambda mem, **kw: TopK(mem, kernels="native", **kw),
                 "dgc": lambda mem, **kw: DGC(mem, seed=3, kernels="native", **kw),
                 "rsdgc-sampled": lambda mem, **kw: RSDGC(mem, selection="sampled", seed=3,
                                                          kernels="native", **kw)}


@pytest.mark.parametrize("method", list(GROUP_METHODS))
@pytest.mark.parametrize("memory", ["momentum", "nesterov", "ef", "nomask", "int64", "fp16", "int8",
                                    "int8-int64"])
def test_group_encode_equals_per_layer_route(method, memory):
    """A bucket group in three C calls (``native.encode_group``: RS-DGC's NSI, Top-k's
    magnitudes) == the per-layer route with native kernels: the same message bytes,
    residuals, momentum and sent counts, over steps (the residual grows), for every memory,
    both index widths and every value dtype."""
    kw = {}
    if memory == "nomask":
        mem = lambda: MomentumCorrection(0.9, masking=False)       # noqa: E731
    elif memory == "int64":
        mem, kw = (lambda: MomentumCorrection(0.9)), {"index_dtype": torch.int64}
    elif memory in ("fp16", "int8", "int8-int64"):    # the rounding stays in the residual
        mem = MEMORIES["momentum"] if method != "topk" else MEMORIES["ef"]
        kw = {"value_dtype": torch.float16 if memory == "fp16" else torch.int8}
        if memory == "int8-int64":
            kw["index_dtype"] = torch.int64
    else:
        mem = MEMORIES[memory]
    called = []
    real = native.encode_group

    def spy(*a, **k):
        out = real(*a, **k)
        called.append(out is not None)
        return out
    native.encode_group, saved = spy, native.encode_group
    try:
        runs = _group_vs_layers(lambda: GROUP_METHODS[method](mem(), **kw), GROUP_SHAPES, 0.001)
    finally:
        native.encode_group = saved
    assert called and all(called)               # the group route ran, every time
    _assert_same(runs)
    # the group route ran: one message per unit size, with the rows the per-layer one chose
    assert sum(c["sent_units"] for c in runs[0][0][1].values()) > 0


def test_group_encode_missing_layers_dynamic_k_and_nan():
    """Absent layers send nothing and keep their residual; gradients holding inf / NaN send
    nothing, keep their inf / NaN entries out of the residual and travel as flag rows; k changing between steps (dynamic density); a
    residual holding NaN / inf gives NaN scores, which take torch.topk's order as per layer.
    All == the per-layer route (``_encode_layers``)."""
    seen = {}

    def grads_of(step, grads, layers):
        if step == 1:
            grads.pop("t0")
            grads.pop("t4")
        if step == 2:                            # not finite: flagged, only finite entries kept
            grads["t2"][0, 0] = float("inf")
            grads["t1"][3, 7] = float("nan")
            seen["before"] = [b.clone() for st in layers[1:3] for b in st.memory.values()]
            seen["layers"] = layers
        if step == 3:                            # a residual holding NaN / inf: NaN scores,
            for st in layers:                    # the block-maximum route meets a NaN
                if st.name in ("t0", "t2", "t6"):
                    for b in st.memory.values():
                        b.view(-1)[5] = float("nan") if st.name != "t2" else float("inf")
        for st in layers:                        # k moves (dynamic density)
            st.k = max(1, st.k + (1 if step % 2 else -1) * (st.index + 1))
        return grads

    for make in (lambda: RSDGC(MomentumCorrection(0.9), kernels="native"),
                 lambda: TopK(ErrorFeedback(), kernels="native"),
                 lambda: DGC(MomentumCorrection(0.9), seed=4, kernels="native"),
                 lambda: RSDGC(MomentumCorrection(0.9), selection="sampled", seed=4,
                               kernels="native")):
        runs = _group_vs_layers(make, GROUP_SHAPES, 0.001, steps=5, grads_of=grads_of)
        _assert_same(runs)
        assert runs[0][1][1]["t0"]["sent_units"] == 0
        msgs, ctxs, state = runs[0][2]
        assert ctxs["t1"].get("nonfinite") and ctxs["t2"].get("nonfinite")
        assert ctxs["t1"]["sent_units"] == ctxs["t2"]["sent_units"] == 0
        assert not any(ctxs[f"t{i}"].get("nonfinite") for i in (0, 3, 4, 5, 6, 7))
        # their residuals after step 2: finite, the entries of the non-finite gradient entries
        # as they were, the finite entries accumulated (the group route's run; the per-layer run == it)
        from hvd_rsgc.algorithms.bucket import BucketCodec
        codec = BucketCodec(make(), seen["layers"])
        n_state = len(seen["layers"][0].memory)
        after = state[n_state:n_state + len(seen["before"])]
        per = len(seen["layers"][1].memory)
        for i, (a, b) in enumerate(zip(after, seen["before"])):
            st = seen["layers"][1 if i < per else 2]
            spot = torch.zeros(st.shape, dtype=torch.bool)
            spot[(3, 7) if i < per else (0, 0)] = True            # where the gradient was not finite
            spot = st.layout.source_view(spot, None)
            assert bool(torch.isfinite(a).all())
            assert torch.equal(st.layout.target_view(a)[spot], st.layout.target_view(b)[spot])
            assert not torch.equal(a, b)
        # one flag row per such layer in its group's message: row = group units + position
        flags = []
        for g, msg in zip(codec.groups, msgs):
            _, rows = unpack_sparse(msg, g.S, codec.method.index_dtype, g.units + len(g.layers))
            flags += [g.layers[int(r) - g.units].name for r in rows if r >= g.units]
        assert sorted(flags) == ["t1", "t2"]


@pytest.mark.parametrize("kernels", ["native", "eager"])
@pytest.mark.parametrize("memory", ["momentum", "nesterov", "ef"])
def test_accumulate_finite_leaves_non_finite_entries_out(kernels, memory):
    """A gradient holding inf / NaN (bucket route): its finite entries go into the residual by
    the memory's formula, the others leave it as it was; on a padded tile layout (RS-DGC),
    element layouts (Top-k, with and without block extremes: every native update loop) and a
    kernel layout."""
    mem = {"momentum": lambda: MomentumCorrection(0.9),
           "nesterov": lambda: MomentumCorrection(0.9, nesterov=True),
           "ef": ErrorFeedback}[memory]
    gen = torch.Generator().manual_seed(6)
    for make, shape in ((lambda: RSDGC(mem(), kernels=kernels), (40, 31)),
                        (lambda: TopK(mem(), kernels=kernels), (600, 70)),     # block extremes
                        (lambda: TopK(mem(), kernels=kernels), (30, 70)),      # update only
                        (lambda: RSDGC(mem(), kernels=kernels), (16, 8, 3, 3))):
        m = make()
        st = make_layer(m, shape, 0.001, name="w")
        for b in st.memory.values():
            b.copy_(torch.randn(b.shape, generator=gen))
        old = {k: b.clone() for k, b in st.memory.items()}
        g = torch.randn(shape, generator=gen)
        g.view(-1)[::97] = float("nan")
        g.view(-1)[5::101] = float("-inf")
        m.accumulate_finite(st, g)
        lay = st.layout
        ok = lay.source_view(torch.isfinite(g), None)
        g0 = lay.source_view(torch.nan_to_num(g, nan=0.0, neginf=0.0), None)
        view = {k: lay.target_view(b) for k, b in old.items()}
        if memory == "ef":
            want = {"e": view["e"] + g0}
        elif memory == "momentum":
            u = g0 + 0.9 * view["u"]
            want = {"u": u, "v": view["v"] + u}
        else:
            u = (view["u"] + g0) * 0.9
            want = {"u": u, "v": (view["v"] + u) + g0}
        for k, b in st.memory.items():
            got = lay.target_view(b)
            assert torch.equal(got[~ok], view[k][~ok]), (shape, k)       # as they were
            assert torch.allclose(got[ok], want[k][ok], rtol=1e-6, atol=1e-6), (shape, k)
            assert bool(torch.isfinite(b).all())


def test_bucket_flag_rows_reach_every_decode():
    """A rank's non-finite layer reaches every rank's decode (``BucketCodec.flagged``, both
    decodes); the other layers' sums are those of the same messages without the flag rows;
    finite steps add no byte. Flag rows pass the index-range check, a row past them fails it."""
    from hvd_rsgc.algorithms.bucket import BucketCodec
    shapes = [(16, 8, 3, 3), (40, 31), (64, 600), (8, 4, 5, 5)]
    gen = torch.Generator().manual_seed(2)
    for make in (lambda: RSDGC(MomentumCorrection(0.9), kernels="native"),
                 lambda: TopK(ErrorFeedback(), kernels="native"),
                 lambda: RSDGC(MomentumCorrection(0.9), kernels="eager")):
        ranks = []
        for _ in range(3):
            m = make()
            layers = [make_layer(m, s, 0.05, name=f"t{i}", index=i) for i, s in enumerate(shapes)]
            ranks.append((m, layers, BucketCodec(m, layers)))
        msgs = []
        for r, (_, layers, codec) in enumerate(ranks):
            grads = {st.name: torch.randn(st.shape, generator=gen) for st in layers}
            if r == 1:
                grads["t2"][5, 5] = float("-inf")
                grads["t3"][0, 0, 1, 1] = float("nan")
            ctxs = {st.name: {} for st in layers}
            msgs.append(codec.encode(grads, ctxs))
        _, layers, codec = ranks[0]
        clean = codec.encode({st.name: torch.randn(st.shape, generator=gen) for st in layers},
                             {st.name: {} for st in layers})
        for g, msg in zip(codec.groups, clean):                 # finite: no flag row
            assert unpack_sparse(msg, g.S, codec.method.index_dtype, g.units)[1].numel()
        gathered = [torch.cat([m_[i] for m_ in msgs]) for i in range(len(codec.groups))]
        out = codec.decode(gathered, divide=3)
        assert codec.flagged == {"t2", "t3"}
        # the same sums from messages with the flag rows taken out by hand
        stripped = []
        for g, msg in zip(codec.groups, gathered):
            _, rows = unpack_sparse(msg, g.S, codec.method.index_dtype, g.units + len(g.layers))
            stripped.append(msg[rows < g.units])
        ref = ranks[2][2].decode(stripped, divide=3)
        assert ranks[2][2].flagged == set()
        for name in ("t0", "t1"):
            assert torch.equal(out[name], ref[name])
        if codec.native:
            base = torch.full((sum(st.layout.numel for st in ranks[0][1]) + 7,), 9.0)
            offs, o = {}, 7
            for st in ranks[0][1]:
                offs[st.name] = o
                o += st.layout.numel
            codec.flagged = set()
            assert codec.decode_into(gathered, base, offs, divide=3)
            assert codec.flagged == {"t2", "t3"}
            for st in ranks[0][1][:2]:
                assert torch.equal(base[offs[st.name]:offs[st.name] + st.layout.numel].view(st.shape),
                                   ref[st.name])
        bad = gathered[0].clone()
        g0 = codec.groups[0]
        bad[0, -1] = torch.tensor([g0.units + len(g0.layers)], dtype=torch.int32).view(torch.float32)
        with pytest.raises(ValueError, match="out of range"):
            codec.decode([bad] + gathered[1:])
        bad[0, -1] = torch.tensor([-1], dtype=torch.int32).view(torch.float32)   # below as well
        with pytest.raises(ValueError, match="out of range"):
            codec.decode([bad] + gathered[1:])


def test_zero_streams_large_buffers_and_leaves_neighbours():
    """``native.zero`` (non-temporal stores from ``ZERO_STREAM`` bytes, memset below): every
    cell of the slice becomes +0 (bits, so -0 and NaN count), for starts and ends off 16-byte
    alignment and sizes on both sides of the threshold, pieces of work and their tails; the
    cells beside the slice are left as they were. Then a decode buffer of that size used again
    for a second step holds that step's sums only."""
    from hvd_rsgc.algorithms.bucket import BucketCodec
    stream = 1 << 18                                  # ZERO_STREAM bytes in floats
    for n in (1, 5, 4099, stream - 1, stream, stream + 3, 3 * 65536 + 5, 1_000_003):
        for off in (0, 1, 2, 3):
            buf = torch.full((n + off + 9,), float("nan"))
            buf[off:off + n:7] = -0.0
            native.zero(buf[off:off + n])
            assert (buf[off:off + n].view(torch.int32) == 0).all(), (n, off)
            assert buf[:off].isnan().all() and buf[off + n:].isnan().all(), (n, off)
    x = torch.full((8,), 3.0, dtype=torch.float64)        # not fp32: zero_()
    assert native.zero(x[::2]).eq(0).all() and x[1::2].eq(3.0).all()
    m = TopK(ErrorFeedback(), kernels="native")
    layers = [make_layer(m, (700, 600), 0.01, name="a", index=0),
              make_layer(m, (3, 5), 0.5, name="b", index=1)]
    codec = BucketCodec(m, layers)
    gen = torch.Generator().manual_seed(5)
    for step in range(2):
        grads = {st.name: torch.randn(st.shape, generator=gen) for st in layers}
        msgs = codec.encode(grads, {st.name: {} for st in layers})
        fresh = BucketCodec(m, layers).decode(msgs)
        got = codec.decode(msgs)
        for name in ("a", "b"):
            assert torch.equal(got[name].view(torch.int32), fresh[name].view(torch.int32)), (step, name)
        del got, fresh                                # nothing holds the buffer: used again


def test_group_topk_ties_take_the_lowest_rows():
    """Exact top-k in C: the k largest scores (of |x| with magnitude), ties at the k-th value
    to the lowest rows, on both routes (every score; block maxima, computed here or from
    given block extremes), equal to a reference written here."""
    lib = native.library()
    g = torch.Generator().manual_seed(3)
    for U, k in [(50, 7), (100_000, 40), (100_000, 3000), (70_000, 1), (70_001, 33)]:
        for magnitude in (0, 1):
            x = torch.randint(-50 * magnitude, 50, (U,), generator=g).float()   # many ties
            imp = x.abs() if magnitude else x
            ref = sorted(sorted(range(U), key=lambda i: (-imp[i].item(), i))[:k])
            nb = U // BLOCK
            w = x[: nb * BLOCK].view(nb, BLOCK)
            for given in (False, True):
                hi, lo = (w.amax(1).contiguous(), w.amin(1).contiguous()) if given else (None, None)
                geo = torch.tensor([0, U, 1, 0, 0, 0, 0, 1], dtype=torch.int64)
                xp = torch.tensor([x.data_ptr()], dtype=torch.int64)
                start = torch.tensor([5], dtype=torch.int64)      # rows are start + position
                ks = torch.tensor([k], dtype=torch.int64)
                off = torch.tensor([0, k], dtype=torch.int64)
                bstart = torch.tensor([0, nb], dtype=torch.int64)
                rows = torch.empty(k, dtype=torch.int64)
                status = torch.zeros(1, dtype=torch.int32)
                lib.hr_group_topk(1, xp.data_ptr(), start.data_ptr(), geo.data_ptr(), ks.data_ptr(),
                                  off.data_ptr(), rows.data_ptr(), status.data_ptr(), magnitude,
                                  hi.data_ptr() if given else None, lo.data_ptr() if given else None,
                                  bstart.data_ptr(), 1)
                assert status.item() == 0
                assert (rows - 5).tolist() == ref, (U, k, magnitude, given)


def test_group_sampled_threshold_equals_dgc_selection():
    """DGC's sampled threshold in C (``hr_group_sampled``) == ``select.sampled_threshold_indices``
    with the same sample offset: random vectors, a periodic one whose sample sees only small
    entries (far more than 1.3x pass: the exact-top-k branch), one whose sample sees only the
    largest (too few pass: threshold * 0.8 rounds, up to the 10th), one whose passing entries
    crowd into a few blocks (more than 1.3x pass, but not from more than 1.3x blocks: the
    kernel's shortcut to the block top-k does not apply), all entries (k >= n),
    and tails past the last full block; with the block extremes given (DGC) and read from x
    by the kernel itself (RS-DGC's scores)."""
    from hvd_rsgc.algorithms.select import SamplePlan, sampled_threshold_indices
    lib = native.library()
    g = torch.Generator().manual_seed(9)
    cases = []
    for n, dens in [(100_000, 0.001), (70_001, 0.01), (5_000, 0.05), (300, 0.5), (2_000, 1.0)]:
        cases.append((torch.randn(n, generator=g), dens))
    plan = SamplePlan.make(200_000, 0.001)
    x = torch.rand(200_000, generator=g) * 0.01
    x[1::plan.stride // 2] += 5 + torch.rand(x[1::plan.stride // 2].shape, generator=g)   # off-sample
    cases.append((x, 0.001))
    y = torch.rand(200_000, generator=g) * 0.01
    y[0::plan.stride] += 100 + torch.rand(y[0::plan.stride].shape, generator=g)     # on-sample
    cases.append((y, 0.001))
    z = torch.rand(200_000, generator=g) * 0.01
    z[64 * 100:64 * 110] += 5 + torch.rand(640, generator=g)   # > 1.3x pass, in 10 blocks
    cases.append((z, 0.001))
    branches = set()
    for x, dens in cases:
        n = x.numel()
        plan = SamplePlan.make(n, dens)
        start = int(torch.randint(0, plan.stride, (1,), generator=g)) if plan.stride > 1 else 0
        ref = sampled_threshold_indices(x, plan, magnitude=True, start=start)
        nb = n // BLOCK
        w = x[: nb * BLOCK].view(nb, BLOCK)
        hi, lo = w.amax(1).contiguous(), w.amin(1).contiguous()
        if nb == 0:
            hi = lo = torch.zeros(1)
        room = n if plan.num_selects >= n else plan.num_selects
        t = lambda v: torch.tensor(v, dtype=torch.int64)       # noqa: E731
        geo, xp, ustart = t([0, n, 1, 0, 0, 0, 0, 1]), t([x.data_ptr()]), t([0])
        pl = t([plan.stride, start, plan.top_k_samples, plan.num_selects, plan.num_samples, 0])
        off, bstart = t([0, room]), t([0, nb])
        for given in (True, False):
            rows, cnt = torch.empty(room, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
            status = torch.zeros(1, dtype=torch.int32)
            lib.hr_group_sampled(1, xp.data_ptr(), ustart.data_ptr(), geo.data_ptr(), pl.data_ptr(),
                                 off.data_ptr(), rows.data_ptr(), cnt.data_ptr(), status.data_ptr(),
                                 hi.data_ptr() if given else None, lo.data_ptr() if given else None,
                                 bstart.data_ptr(), 1)
            assert status.item() == 0
            assert rows[: int(cnt)].tolist() == ref.tolist(), (n, dens, given)
        branches.add(len(ref) == plan.num_selects)
    assert branches == {True, False}       # some ended short of num_selects (the 0.8 rounds)


def test_cache_in_the_temp_directory_must_be_this_users_own(tmp_path):
    """The fallback cache (the temp directory, a predictable name) is created 0700 and refused
    when someone else could have planted a library in it."""
    from hvd_rsgc.algorithms.native import _private_dir
    d = _private_dir(tmp_path / "mine")
    assert (d.stat().st_mode & 0o777) == 0o700
    open_dir = tmp_path / "shared"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(RuntimeError, match="not this user's own.*HVD_RSGC_CACHE"):
        _private_dir(open_dir)
