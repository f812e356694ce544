"""Issue #11's hot-path changes, against references written here:

* exact top-k through the sampled pre-filter == ``torch.topk``'s set (random data, sizes on
  both sides of the filter's thresholds, ties, zeros, a periodic vector that fools the sample);
* the direct decode scatter == the (U, S) matrix + ``from_units`` route, bit for bit, for every
  layout (elements, kernels, padded and unpadded tiles), duplicates included;
* ``kernels="compiled"`` (``torch.compile``d NSI) == the eager NSI to float rounding, selects the
  same units, and trains bit-identically across ranks under ``horovodrun -np 2``;
* the block filter (``AtLeast``: block extremes, then the few blocks that reach the threshold)
  == ``(|x| >= t).nonzero()`` for every threshold, tails, NaN, signed zeros; Top-k and DGC on
  signed vectors (``magnitude=True``) == the same selection on ``|x|``;
* tile residuals kept as the padded matrix (natural order) == the (U, S) unit-matrix reference
  for several RS-DGC steps (rows, values, residual, momentum), padded and unpadded tiles,
  eager and compiled NSI; the NSI of the tile view == the NSI of the unit matrix;
* the round-robin bench reports per-round ratios and state words per parameter.
"""
import pytest
import torch

from hvd_rsgc.algorithms import native
from hvd_rsgc.algorithms.base import scatter_sum
from hvd_rsgc.algorithms.kernels import compiled_nsi
from hvd_rsgc.algorithms.base import make_layer, unpack_sparse
from hvd_rsgc.algorithms.layout import TileLayout, make_layout
from hvd_rsgc.algorithms.memory import MomentumCorrection
from hvd_rsgc.algorithms.rsdgc import RSDGC
from hvd_rsgc.algorithms.nsi import nsi_scores
from hvd_rsgc.algorithms.select import (BLOCK, AtLeast, SamplePlan, sampled_threshold_indices,
                                        topk_indices, topk_route)

from support import reachable_storage_bytes, results


def ref_topk(x, k):
    return torch.topk(x, k, sorted=False).indices.sort().values


def same_values(x, got, ref):
    """Exact top-k up to ties: distinct indices, the same multiset of values."""
    assert got.numel() == ref.numel() == got.unique().numel()
    assert torch.equal(x[got].sort().values, x[ref].sort().values)


def test_topk_prefilter_is_exact():
    g = torch.Generator().manual_seed(3)
    for n, k in [(1 << 16, 64), (1 << 16, 3000), (300_000, 300), (1_000_003, 1001), (2_359_296, 23_593),
                 (100_000, 100), (70_000, 70_000), (5, 2)]:
        x = torch.randn(n, generator=g).abs()
        assert torch.equal(topk_indices(x, k), ref_topk(x, k)), (n, k)
    # mostly zeros: fewer non-zeros than k -> the threshold is 0, still the exact set by value
    x = torch.zeros(1 << 20)
    x[torch.randperm(1 << 20, generator=g)[:500]] = torch.rand(500, generator=g) + 1
    got = topk_indices(x, 2000)
    assert got.numel() == 2000 and set(x.nonzero().view(-1).tolist()) <= set(got.tolist())
    # a vector periodic with the sample's stride: the sample misleads, the result stays exact
    x = (torch.arange(1 << 20) % 97).float() + torch.rand(1 << 20, generator=g) * 1e-3
    same_values(x, topk_indices(x, 5000), ref_topk(x, 5000))
    x = torch.zeros(1 << 20)
    x[::64] = torch.rand((1 << 20) // 64, generator=g)          # only the sampled positions
    assert torch.equal(topk_indices(x, 6400), ref_topk(x, 6400))


def test_topk_block_maximum_route_is_exact():
    """k <= 1/8 of the blocks: the k-th largest block maximum is the threshold."""
    g = torch.Generator().manual_seed(31)
    assert topk_route(1 << 16, 64, "cpu") == "blocks" and topk_route(1 << 20, 5000, "cpu") == "sample"
    assert topk_route(1 << 16, 64, "meta") is None and topk_route(1 << 16, 0, "cpu") is None
    n = 1 << 18
    # the largest values packed into two blocks: the threshold comes from the noise blocks
    x = torch.rand(n, generator=g) * 1e-3
    x[640:768] = torch.rand(128, generator=g) + 1
    for k in (100, 200, 512):
        assert torch.equal(topk_indices(x, k), ref_topk(x, k)), k
    # signed values by magnitude, negatives largest; NaN in a block (its maximum is NaN: the
    # full torch.topk runs, which ranks NaN first, as the reference)
    y = torch.randn(n, generator=g)
    y[::997] = -50 - torch.rand(y[::997].shape, generator=g)
    for k in (10, 263):
        assert torch.equal(topk_indices(y, k, magnitude=True), ref_topk(y.abs(), k)), k
        for nat in (False, True):
            if nat and not native.available():
                continue
            z = y.clone()
            z[12345] = float("nan")
            got = topk_indices(z, k, magnitude=True, native=nat)
            assert torch.equal(got, ref_topk(z.abs(), k)) and 12345 in got.tolist(), (k, nat)
    # ties at the threshold: all equal -> any k distinct entries of that value
    w = torch.ones(n)
    got = topk_indices(w, 300)
    assert got.numel() == 300 == got.unique().numel()


def test_block_filter_equals_eager_compare():
    g = torch.Generator().manual_seed(7)
    for n in (BLOCK * 300, BLOCK * 4000 + 37, 1_000_003):
        x = torch.randn(n, generator=g)
        x[torch.randint(0, n, (50,), generator=g)] = float("nan")
        x[:5] = torch.tensor([0.0, -0.0, 3.0, -3.0, float("-inf")])
        for magnitude in (True, False):
            f = AtLeast(x, magnitude, expected=0.001)
            assert f.blocked
            imp = x.abs() if magnitude else x
            for t in (3.0, 2.5, 4.0, 100.0, 0.0, -1.0):
                ref = (imp >= t).nonzero().view(-1)
                got = f(torch.tensor(t))
                assert torch.equal(got, ref), (n, magnitude, t)
    assert not AtLeast(torch.randn(10_000), True, expected=0.5).blocked       # dense survivors


def test_magnitude_selection_equals_selection_on_abs():
    g = torch.Generator().manual_seed(8)
    for n, k in [(1 << 16, 64), (2_359_296, 2360), (1_000_003, 1001), (300, 3)]:
        x = torch.randn(n, generator=g)
        assert torch.equal(topk_indices(x, k, magnitude=True), ref_topk(x.abs(), k)), (n, k)
        for density in (0.001, 0.01, 0.3):
            plan = SamplePlan.make(n, density)
            a = sampled_threshold_indices(x, plan, torch.Generator().manual_seed(1), magnitude=True)
            b = sampled_threshold_indices(x.abs(), plan, torch.Generator().manual_seed(1))
            assert torch.equal(a, b), (n, density)


def old_scatter(layout, values, rows):
    acc = torch.zeros(layout.num_units, layout.unit_size)
    acc.index_put_((rows,), values.float(), accumulate=True)
    return layout.from_units(acc)


def test_direct_scatter_equals_unit_matrix_route():
    g = torch.Generator().manual_seed(4)
    shapes = [(7,), (10, 5), (64, 32, 3, 3), (13, 20), (12, 9), (5, 7, 1, 1), (9, 3, 5, 5), (31, 17)]
    for shape in shapes:
        for nb in (True, False):
            L = make_layout(torch.Size(shape), nb, 1)
            rows = torch.randint(0, L.num_units, (60,), generator=g)       # with duplicates
            vals = torch.randn(60, L.unit_size, generator=g)
            a, b = old_scatter(L, vals, rows), scatter_sum(L, vals, rows, torch.float32)
            assert a.shape == b.shape == torch.Size(shape) and torch.equal(a, b), (shape, nb)
            assert scatter_sum(L, vals, rows, torch.float16).dtype == torch.float16


def test_compiled_nsi_equals_eager():
    g = torch.Generator().manual_seed(5)
    fn = compiled_nsi()
    for U, S in [(1000, 9), (4321, 25), (77, 49)]:
        v = torch.randn(U, S, generator=g)
        counts = torch.randint(1, S + 1, (U,), generator=g)
        v[torch.arange(S) >= counts[:, None]] = 0.0       # padded cells are zero, as in layouts
        counts = counts.float()
        for c in (None, counts):
            for beta in (0.5, 1.0, 0.0):
                a, b = nsi_scores(v, beta, c), fn(v, beta, c)
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (U, S, beta, (a - b).abs().max())
        a, b = nsi_scores(v, 0.5, None), fn(v, 0.5, None)
        assert torch.equal(topk_indices(a, U // 10), topk_indices(b, U // 10))


def test_nsi_of_tile_view_equals_unit_matrix():
    g = torch.Generator().manual_seed(9)
    for shape in [(12, 9), (13, 20), (64, 256, 1, 1), (5, 128)]:
        L = make_layout(torch.Size(shape), True, 1)
        assert isinstance(L, TileLayout)
        buf = torch.zeros(L.storage_shape)
        L.target_view(buf).copy_(L.source_view(torch.randn(shape, generator=g), None))
        units = L.units_of(buf)
        counts = L.valid_counts()
        for beta in (0.5, 1.0, 0.0):
            ref = nsi_scores(units, beta, counts)
            assert torch.allclose(nsi_scores(L.score_view(buf), beta, counts), ref, rtol=1e-5, atol=1e-7)
            assert torch.allclose(compiled_nsi()(L.score_view(buf), beta, counts), ref,
                                  rtol=1e-4, atol=1e-6), (shape, beta)


def test_tile_storage_equals_unit_matrix_reference():
    """RS-DGC steps with the residual in natural (padded) order == the same steps computed on
    the (U, S) unit matrix: the same rows, values, residual and momentum."""
    g = torch.Generator().manual_seed(10)
    for shape, density in [(((64, 256, 1, 1)), 0.01), ((13, 20), 0.1), ((1000, 2048), 0.001)]:
        for kernels in ("eager", "compiled"):
            method = RSDGC(MomentumCorrection(0.9), beta=0.5, kernels=kernels)
            st = make_layer(method, shape, density)
            L = st.layout
            assert isinstance(L, TileLayout) and tuple(st.memory["v"].shape) == L.storage_shape
            u = torch.zeros(L.num_units, L.unit_size)
            v = torch.zeros_like(u)
            counts = L.valid_counts()
            for step in range(3):
                grad = torch.randn(shape, generator=g)
                torch.add(L.to_units(grad), u, alpha=0.9, out=u)
                v.add_(u)
                want = ref_topk(nsi_scores(v, 0.5, counts), st.k)
                vals, rows = unpack_sparse(method.encode(st, grad, {}), L.unit_size, torch.int32,
                                           L.num_units)
                assert torch.equal(rows, want), (shape, kernels, step)
                assert torch.allclose(vals, v[want], rtol=1e-6, atol=1e-7)
                v[want] = 0.0
                u[want] = 0.0
                assert torch.allclose(L.units_of(st.memory["v"]), v, rtol=1e-6, atol=1e-7)
                assert torch.equal(L.units_of(st.memory["u"]) == 0, u == 0)
                assert torch.allclose(L.units_of(st.memory["u"]), u, rtol=1e-6, atol=1e-7)
                # padded cells of the storage are never written
                pad = torch.ones(L.storage_shape, dtype=torch.bool)
                L.target_view(pad).fill_(False)
                assert not st.memory["v"][pad].any() and not st.memory["u"][pad].any()


def test_compiled_kernels_bit_identical_ranks_np2(tmp_path):
    res = results(2, tmp_path, "--scenarios", "train", "--kinds", "rsdgc", "--steps", "4",
                  "--options", '{"kernels": "compiled"}', timeout=900)
    for r in res:
        t = r["train"]["rsdgc"]
        assert t["identical"] and t["loss1"] < t["loss0"]
    assert res[0]["train"]["rsdgc"]["params_sha"] == res[1]["train"]["rsdgc"]["params_sha"]


def test_round_robin_bench_rows(monkeypatch, capsys):
    from hvd_rsgc import bench
    monkeypatch.setattr(bench, "resnet50_shapes", lambda: [(64, 32, 3, 3), (64,), (300, 200)])
    rows = {r["method"]: r for r in bench.bench_compress(density=0.01, repeats=3,
                                                          names=["rsdgc", "dgc", "topk"])}
    assert rows["abs() pass"]["x_abs"] == 1.0
    for name in ("rsdgc", "dgc", "topk"):
        r = rows[name]
        assert r["x_abs_min"] <= r["x_abs"] <= r["x_abs_max"] and r["bytes"] > 0
        assert r["words_per_param"] >= (2 if name != "topk" else 1)     # residual (+ momentum)
    assert "median [min-max]" in capsys.readouterr().out


@pytest.mark.parametrize("route", ["per-tensor", "bucket-eager", "bucket-native"])
def test_large_gathered_decode_adds_in_rank_order(route):
    """Four ranks' messages over large tensors, most units picked by several ranks (as at the
    warm-up's densities): the sum equals the rank-by-rank reference bit for bit, and decoding
    the same messages again gives the same bits. (``index_put_(accumulate=True)``, which the
    decode used before, failed both on this CPU for tensors of this size.)"""
    from hvd_rsgc.algorithms.base import pack_sparse
    from hvd_rsgc.algorithms.bucket import BucketCodec
    from hvd_rsgc.algorithms.topk import TopK
    from hvd_rsgc.algorithms.memory import ErrorFeedback
    if route == "bucket-native" and not native.available():
        pytest.skip("no C compiler")
    kernels = "native" if route == "bucket-native" else "eager"
    shapes = [(512, 512, 3, 3), (1000, 2048)]
    rsm, tkm = RSDGC(MomentumCorrection(0.9), kernels=kernels), TopK(ErrorFeedback(), kernels=kernels)
    g = torch.Generator().manual_seed(5)
    for m in (rsm, tkm):
        layers = [make_layer(m, s, 0.25, name=f"t{i}", index=i) for i, s in enumerate(shapes)]
        codec = BucketCodec(m, layers)
        for grp in codec.groups:
            base = torch.randperm(grp.units, generator=g)[: grp.units // 4]
            msgs = []
            for r in range(4):                  # ascending rows per rank, 3/4 shared with rank 0
                own = torch.randperm(grp.units, generator=g)[: grp.units // 12]
                rows = torch.unique(torch.cat([base[: 3 * base.numel() // 4], own]))
                msgs.append(pack_sparse(torch.randn(rows.numel(), grp.S, generator=g) * (r + 1),
                                        rows, torch.int32))
            gathered = torch.cat(msgs)
            ref = {}
            for msg in msgs:                    # reference: rank after rank (no duplicates within one)
                vals, rows = unpack_sparse(msg, grp.S, torch.int32, grp.units)
                for st, lo, hi in zip(grp.layers, grp.unit_off[:-1], grp.unit_off[1:]):
                    sel = ((rows >= lo) & (rows < hi)).nonzero().view(-1)
                    part = scatter_sum(st.layout, vals[sel], rows[sel] - lo, torch.float32)
                    ref[st.name] = part if st.name not in ref else ref[st.name] + part
            for _ in range(2):
                if route == "per-tensor":
                    vals, rows = unpack_sparse(gathered, grp.S, torch.int32, grp.units)
                    got = {}
                    for st, lo, hi in zip(grp.layers, grp.unit_off[:-1], grp.unit_off[1:]):
                        sel = ((rows >= lo) & (rows < hi)).nonzero().view(-1)
                        got[st.name] = scatter_sum(st.layout, vals[sel], rows[sel] - lo, torch.float32)
                else:
                    got = codec.decode([gathered if gg is grp else torch.zeros(0, gg.S + 1)
                                        for gg in codec.groups])
                for st in grp.layers:
                    assert torch.equal(got[st.name], ref[st.name]), (route, m.name, st.name)


def test_decode_bench_rows(monkeypatch, capsys):
    from hvd_rsgc import bench
    if not native.available():
        pytest.skip("no C compiler")
    monkeypatch.setattr(bench, "resnet50_shapes", lambda: [(64, 32, 3, 3), (64,), (300, 200)])
    rows = bench.bench_decode(densities=(0.25, 0.01), ranks=3, repeats=2, rows=("rsdgc", "dgc"))
    assert [(r["method"], r["density"]) for r in rows] == [("rsdgc", 0.25), ("rsdgc", 0.01),
                                                           ("dgc", 0.25), ("dgc", 0.01)]
    assert all(r["same"] and r["c_ms"] > 0 and r["index_ms"] > 0 for r in rows)
    assert "same sums" in capsys.readouterr().out


def test_update_bench_rows(monkeypatch, capsys):
    from hvd_rsgc import bench
    if not native.available():
        pytest.skip("no C compiler")
    shapes = [(64, 32, 3, 3), (64,), (300, 200), (128, 64, 1, 1)]
    monkeypatch.setattr(bench, "resnet50_shapes", lambda: shapes)
    rows = {r["group"]: r for r in bench.bench_update(repeats=2)}
    kernel, tile, elem = (rows[k] for k in ("RS-DGC kernels (hr_units)", "RS-DGC tiles (hr_tiles)",
                                            "DGC elements (hr_blocks)"))
    assert kernel["elements"] == 64 * 32 * 9                 # the 3x3 convolution
    assert tile["elements"] == 300 * 200 + 128 * 64          # the linear layer and the 1x1 conv
    assert elem["elements"] == kernel["elements"] + tile["elements"]
    assert all(r["ms"] > 0 and r["abs_ms"] > 0 for r in rows.values())
    assert "median [min-max]" in capsys.readouterr().out


def test_state_words_per_parameter_resnet50_within_three():
    """The issue's memory bound on the real gradient set: residual + momentum + workspaces
    after one step, per compressed parameter, <= 3 fp32 words (dgc, rsdgc, topk)."""
    from hvd_rsgc import bench
    big = [torch.zeros(s) for s in bench.resnet50_shapes() if len(s) > 1]
    for name in ("rsdgc", "dgc", "topk"):
        comp, m, layers = bench.build_method(name, big, 0.001)
        for lay, g in zip(layers, big):
            m.decode(lay, m.encode(lay, g, {}), 1, {})
        words = comp.engine.memory_bytes()["words_per_parameter"]
        # counted without asking the compressor: every tensor it holds, the parameters aside
        params = {e.param.untyped_storage().data_ptr() for e in comp.engine.table}
        held = reachable_storage_bytes((comp, m, layers), params) / (4 * sum(g.numel() for g in big))
        assert held <= 3, (name, held)
        assert abs(words - held) <= 0.01 * held, (name, words, held)     # the meter's own figure


# ----------------------------------------------------------------------------- fused buckets
def _per_tensor_vs_bucket(make_method, shapes, density, ranks=3, steps=2):
    from hvd_rsgc.algorithms.base import make_layer
    from hvd_rsgc.algorithms.bucket import BucketCodec
    out = []
    for fused in (False, True):
        ms = [make_method() for _ in range(ranks)]
        layers = [[make_layer(m, s, density, name=f"t{i}", index=i) for i, s in enumerate(shapes)]
                  for m in ms]
        codecs = [BucketCodec(m, lay) for m, lay in zip(ms, layers)]
        res = []
        for step in range(steps):
            grads = [[torch.randn(s, generator=torch.Generator().manual_seed(100 * step + 10 * r + i))
                      for i, s in enumerate(shapes)] for r in range(ranks)]
            if not fused:
                msgs = [[m.encode(st, g, {}) for st, g in zip(lay, gs)] for m, lay, gs in zip(ms, layers, grads)]
                dense = [ms[0].decode(layers[0][i], torch.cat([msgs[r][i] for r in range(ranks)]), ranks, {})
                         for i in range(len(shapes))]
            else:
                ctxs = [{st.name: {} for st in lay} for lay in layers]
                msgs = [c.encode({st.name: g for st, g in zip(lay, gs)}, cx)
                        for c, lay, gs, cx in zip(codecs, layers, grads, ctxs)]
                gathered = [torch.cat([msgs[r][j] for r in range(ranks)]) for j in range(len(codecs[0].groups))]
                dd = codecs[0].decode(gathered)
                dense = [dd[f"t{i}"] for i in range(len(shapes))]
            res.append((dense, [[v.clone() for st in lay for v in st.memory.values()] for lay in layers]))
        out.append(res)
    return out


def assert_buckets_equal_per_tensor(cases, shapes):
    """For each (method factory, density): bit-identical sums and residuals, bucket vs per tensor."""
    for make, density in cases:
        per, fused = _per_tensor_vs_bucket(make, shapes, density)
        for (d0, m0), (d1, m1) in zip(per, fused):
            for a, b in zip(d0, d1):
                assert a.shape == b.shape and torch.equal(a, b)
            for ra, rb in zip(m0, m1):
                for a, b in zip(ra, rb):
                    assert torch.equal(a, b)


def test_bucket_codec_equals_per_tensor_path():
    """One message per bucket (per unit size) selects and sums exactly what the per-tensor path
    does: same k per tensor, same units, bit-identical sums and residuals (3 simulated ranks)."""
    from hvd_rsgc.algorithms.dgc import DGC
    from hvd_rsgc.algorithms.memory import ErrorFeedback, MomentumCorrection
    from hvd_rsgc.algorithms.rsdgc import RSDGC
    from hvd_rsgc.algorithms.topk import TopK
    shapes = [(16, 8, 3, 3), (40, 31), (8, 4, 5, 5), (12, 6, 1, 1), (300,)]
    cases = [(lambda: TopK(ErrorFeedback()), 0.05),
             (lambda: RSDGC(MomentumCorrection(0.9)), 0.05),
             (lambda: DGC(MomentumCorrection(0.9), seed=3), 0.1)]
    assert_buckets_equal_per_tensor(cases, shapes)


def test_bucket_decode_buffer_reused_only_when_nobody_holds_it():
    """The decode output is last step's buffer, zeroed, once nothing outside the codec holds
    its storage (no page faults for a fresh bucket every step), and a new one while anything
    does (a kept gradient, or a view of one, never changes). Sums equal a fresh decode's."""
    from hvd_rsgc.algorithms.base import make_layer
    from hvd_rsgc.algorithms.bucket import BucketCodec
    from hvd_rsgc.algorithms.memory import MomentumCorrection
    from hvd_rsgc.algorithms.rsdgc import RSDGC
    from hvd_rsgc.algorithms import bucket as bucket_mod
    if bucket_mod._USE_COUNT is None:
        pytest.skip("this PyTorch has no storage use count: decode buffers are never reused")
    shapes = [(16, 8, 3, 3), (40, 31)]
    m = RSDGC(MomentumCorrection(0.9))
    layers = [make_layer(m, sh, 0.05, name=f"t{i}", index=i) for i, sh in enumerate(shapes)]
    codec = BucketCodec(m, layers)

    def step(seed):
        gs = {f"t{i}": torch.randn(sh, generator=torch.Generator().manual_seed(seed + i))
              for i, sh in enumerate(shapes)}
        msgs = codec.encode(gs, {st.name: {} for st in layers})
        for st in layers:
            st.step += 1
        return msgs

    def fresh(msgs):                  # the reference: a decode into new buffers
        saved, codec._out = codec._out, {}
        ref = {k: v.clone() for k, v in codec.decode(msgs).items()}
        codec._out = saved
        return ref

    msgs = step(0)
    out = codec.decode(msgs)
    ptr = out["t0"].untyped_storage().data_ptr()
    out["t0"].add_(1.0)                              # a caller may write into its gradient
    del out
    msgs = step(10)
    ref = fresh(msgs)
    out = codec.decode(msgs)
    assert out["t0"].untyped_storage().data_ptr() == ptr            # reused
    assert all(torch.equal(out[k], ref[k]) for k in ref)            # and zeroed first
    kept = out["t1"].view(-1)[5:]                                   # a view of a view, kept
    before = kept.clone()
    del out
    msgs = step(20)
    ref = fresh(msgs)
    out = codec.decode(msgs)
    assert out["t0"].untyped_storage().data_ptr() != ptr            # held: a new buffer
    assert torch.equal(kept, before)                                # the held one unchanged
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_fused_bad_input():
    import pytest
    from hvd_rsgc import QSGDCompression, TopKCompression
    model = torch.nn.Linear(64, 64)
    with pytest.raises(ValueError, match="fused"):
        TopKCompression(model, fused="yes")
    with pytest.raises(TypeError, match="fused"):          # not an option of a dense quantiser
        QSGDCompression(model, fused=True)
    with pytest.raises(ValueError, match="bucket_mb"):
        TopKCompression(model, fused=True, bucket_mb=0)


def test_fused_horovod_np2_identical_one_allgather_per_bucket(tmp_path):
    res = results(2, tmp_path, "--scenarios", "train", "--kinds", "topk,dgc,rsdgc", "--steps", "5",
                  "--options", '{"fused": true}')
    for kind in ("topk", "dgc", "rsdgc"):
        for r in res:
            t = r["train"][kind]
            assert t["identical"] and t["loss1"] < t["loss0"], kind
            for step in t["steps"]:
                wire, kinds = step["wire"], step["kinds"]
                assert sum(wire.values()) == step["lib_step_bytes"], kind     # meter == Horovod
                gathers = [n for n in wire if kinds[n] == "allgather"]
                assert gathers and all(".bucket" in n for n in gathers), gathers
                assert len(gathers) < len(t["compressed"]), (len(gathers), len(t["compressed"]))


def test_fused_np1_through_the_stock_optimizer_equals_per_tensor():
    """-np 1 (Horovod registers no hooks; the compressor's local pass runs): fused and
    per-tensor training give bit-identical parameters and the same bytes."""
    import horovod.torch as hvd
    import hvd_rsgc
    hvd.init()
    res = {}
    for fused in (False, True):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 10))
        comp = hvd_rsgc.RSDGCCompression(m, density=0.05, fused=fused, min_numel=100)
        opt = hvd.DistributedOptimizer(hvd_rsgc.DGCSGD(m.parameters(), lr=0.1),
                                       named_parameters=m.named_parameters(), compression=comp)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        res[fused] = (torch.cat([p.detach().flatten() for p in m.parameters()]), comp.stats()["total_bytes"])
    assert torch.equal(res[False][0], res[True][0]) and res[False][1] == res[True][1]


@pytest.mark.parametrize("kernels,method,value_dtype", [
    ("eager", "rsdgc", torch.float32), ("native", "rsdgc", torch.float32),
    ("native", "rsdgc", torch.float16), ("native", "dgc", torch.float32),
    ("native", "rsdgc", torch.int8), ("eager", "dgc", torch.int8)])
def test_bucket_decode_equals_per_tensor_scatter_for_any_message(kernels, method, value_dtype):
    """The bucket's one scatter (index tensors, or the C loop with native kernels) == each
    tensor's own ``scatter_sum`` for arbitrary units and values, padded tile cells holding
    non-zero junk included (both drop them), duplicates and unsorted rows included, at high
    density (the warm-up's 25%), fp32 (strided rows of the message), fp16 and int8 values."""
    from hvd_rsgc.algorithms.base import make_layer, pack_sparse, scatter_sum, to_wire, unpack_sparse
    from hvd_rsgc.algorithms.bucket import BucketCodec
    from hvd_rsgc.algorithms.dgc import DGC
    from hvd_rsgc.algorithms.memory import MomentumCorrection
    from hvd_rsgc.algorithms.rsdgc import RSDGC
    if kernels == "native" and not native.available():
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(21)
    cls = RSDGC if method == "rsdgc" else DGC
    m = cls(MomentumCorrection(0.9), kernels=kernels, value_dtype=value_dtype)
    shapes = [(16, 8, 3, 3), (40, 31), (12, 6, 1, 1), (7, 5), (8, 4, 5, 5), (64, 20)]
    layers = [make_layer(m, s, 0.25, name=f"t{i}", index=i) for i, s in enumerate(shapes)]
    codec = BucketCodec(m, layers)
    assert codec.native == (kernels == "native")
    msgs = []
    for grp in codec.groups:
        rows = torch.randint(0, grp.units, (3 * grp.units // 4,), generator=g)      # duplicates
        vals = torch.randn(rows.numel(), grp.S, generator=g)                        # junk in pads
        msgs.append(pack_sparse(to_wire(vals, value_dtype)[0], rows, torch.int32))
    got = codec.decode(msgs)
    for grp, msg in zip(codec.groups, msgs):
        vals, rows = unpack_sparse(msg, grp.S, torch.int32, grp.units)
        for st, lo, hi in zip(grp.layers, grp.unit_off[:-1], grp.unit_off[1:]):
            sel = ((rows >= lo) & (rows < hi)).nonzero().view(-1)
            want = scatter_sum(st.layout, vals[sel], rows[sel] - lo, torch.float32)
            assert torch.equal(got[st.name], want), st.name
    # the average in the decode (op=Average over 3 ranks): == the sum divided, bit for bit,
    # cells reached by several units divided once, the rest +0 (not -0); twice, so a mark
    # not left zeroed by the first would show
    sums = {k: v.clone() for k, v in got.items()}
    for _ in range(2):
        avg = codec.decode(msgs, divide=3)
        for name, v in sums.items():                  # bits, so the sign of zero counts
            assert torch.equal(avg[name].view(torch.int32), (v / 3).view(torch.int32)), name
    assert all(not mk.any() for mk in codec._marks.values())
    with pytest.raises(ValueError, match="divide"):
        codec.decode(msgs, divide=0)
    # straight into a caller's buffer (DDP's bucket): the layers at scattered offsets between
    # other data, which is left as it was; the same bits as decode()
    offsets, o = {}, 3
    for st in layers:
        offsets[st.name] = o
        o += st.layout.numel + 5
    for div in (1, 3):
        base = torch.full((o + 2,), 7.0)
        written = codec.decode_into(msgs, base, offsets, divide=div)
        assert written == (kernels == "native")
        if not written:
            assert torch.equal(base, torch.full((o + 2,), 7.0))
            continue
        want = codec.decode(msgs, divide=div)
        keep = torch.ones(o + 2, dtype=torch.bool)
        for st in layers:
            a = offsets[st.name]
            got_l = base[a:a + st.layout.numel].view(st.shape)
            assert torch.equal(got_l.view(torch.int32), want[st.name].view(torch.int32)), (div, st.name)
            keep[a:a + st.layout.numel] = False
        assert (base[keep] == 7.0).all()
    if kernels == "native":
        with pytest.raises(ValueError, match="does not fit"):
            codec.decode_into(msgs, torch.zeros(10), offsets)
        # a layer of the last group out of place: refused before any group is written
        last = codec.groups[-1].layers[-1].name
        base = torch.full((o + 2,), 7.0)
        with pytest.raises(ValueError, match=f"'{last}' .*does not fit"):
            codec.decode_into(msgs, base, {**offsets, last: o + 1})
        assert (base == 7.0).all()
