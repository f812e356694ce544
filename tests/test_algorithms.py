"""Unit tests of the pure algorithm layer against straightforward reference computations."""
import math

import pytest
import torch

from hvd_rsgc.algorithms import qsgd
from hvd_rsgc.algorithms.base import make_layer, pack_sparse, scatter_sum, unpack_sparse
from hvd_rsgc.algorithms.density import (DGC_WARMUP, RAMP_LEVELS, dynamic_densities,
                                         ramp_density, warmup_density)
from hvd_rsgc.algorithms.dgc import DGC
from hvd_rsgc.algorithms.layout import KernelLayout, TileLayout, make_layout
from hvd_rsgc.algorithms.memory import ErrorFeedback, MomentumCorrection, NoMemory
from hvd_rsgc.algorithms.nsi import nsi_scores, units_for_density
from hvd_rsgc.algorithms.randomk import RandomK
from hvd_rsgc.algorithms.rsdgc import RSDGC
from hvd_rsgc.algorithms.select import (SamplePlan, random_indices, sampled_threshold_indices,
                                        topk_indices)
from hvd_rsgc.algorithms.topk import TopK


def ref_nsi(values, beta):
    """Plain-Python NSI of one neighbourhood (list of floats)."""
    n = len(values)
    mu = sum(abs(v) for v in values) / n
    mean = sum(values) / n
    sigma = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return beta * mu + (1 - beta) * sigma


def layer_for(method, shape, density):
    return make_layer(method, shape, density)


# ----------------------------------------------------------------------------- NSI
def test_nsi_spread_beats_mean_when_beta_favours_statistic():
    w = torch.zeros(1, 2, 3, 3)
    w[0, 0] = 0.5                        # unit A: mean|v| 0.5, std 0
    w[0, 1, 0, 0] = 3.0                  # unit B: mean|v| 1/3, std 0.943
    units = KernelLayout(w.shape).to_units(w)
    s_mu = nsi_scores(units, beta=1.0)
    s_stat = nsi_scores(units, beta=0.25)
    assert s_mu.argmax().item() == 0
    assert s_stat.argmax().item() == 1
    for beta, scores in ((1.0, s_mu), (0.25, s_stat)):
        for u in range(2):
            assert scores[u].item() == pytest.approx(ref_nsi(units[u].tolist(), beta), rel=1e-6)


def test_nsi_kernel_units_match_reference_on_random_conv():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    layout = make_layout(w.shape, True, 1)
    assert isinstance(layout, KernelLayout) and layout.num_units == 12 and layout.unit_size == 9
    scores = nsi_scores(layout.to_units(w), 0.5)
    for co in range(4):
        for ci in range(3):
            ref = ref_nsi(w[co, ci].reshape(-1).tolist(), 0.5)
            assert scores[co * 3 + ci].item() == pytest.approx(ref, rel=1e-5)


def test_tile_layout_roundtrip_and_padded_statistics():
    torch.manual_seed(1)
    x = torch.randn(5, 7)                 # tiles of 3x3 -> 2 x 3 units, padded
    layout = make_layout(x.shape, True, 1)
    assert isinstance(layout, TileLayout) and layout.num_units == 6
    u = layout.to_units(x)
    assert torch.equal(layout.from_units(u), x)
    counts = layout.valid_counts("cpu", torch.float32)
    assert counts.sum().item() == 35
    scores = nsi_scores(u, 0.3, counts)
    for bi in range(2):
        for bj in range(3):
            cells = [x[i, j].item() for i in range(3 * bi, min(3 * bi + 3, 5))
                     for j in range(3 * bj, min(3 * bj + 3, 7))]
            assert scores[bi * 3 + bj].item() == pytest.approx(ref_nsi(cells, 0.3), rel=1e-5)


def test_radius_two_tiles_and_ablation_element_units():
    assert make_layout((10, 10), True, 2).unit_size == 25
    assert make_layout((8, 4, 3, 3), False, 1).unit_size == 1       # neighbourhood off
    assert make_layout((8, 4, 1, 1), True, 1).kind == "tile"          # 1x1 conv -> tiles
    with pytest.raises(ValueError, match="radius"):
        make_layout((4, 4), True, -1)


def test_units_for_density_eq11():
    lay = KernelLayout(torch.Size((64, 64, 3, 3)))
    assert units_for_density(lay, 0.001) == 5            # K = 37 -> ceil(37/9)
    assert units_for_density(lay, 1e-9) == 1             # at least one unit
    assert units_for_density(lay, 1.0) == 64 * 64        # at most all units


# ----------------------------------------------------------------------------- selection
def test_topk_exact():
    torch.manual_seed(2)
    imp = torch.rand(1000)
    idx = topk_indices(imp, 17)
    ref = sorted(sorted(range(1000), key=lambda i: -imp[i].item())[:17])
    assert idx.tolist() == ref


def test_dgc_sample_plan_worked_example():
    plan = SamplePlan.make(2_359_296, 0.001)
    assert (plan.stride, plan.num_samples, plan.top_k_samples, plan.num_selects) == (97, 24_322, 25, 2_360)
    small = SamplePlan.make(1000, 0.001)
    assert small.stride == 1 and small.num_samples == 1000


def test_sampled_threshold_selects_about_k_and_only_large_values():
    torch.manual_seed(3)
    imp = torch.randn(200_000).abs()
    plan = SamplePlan.make(imp.numel(), 0.001)
    idx = sampled_threshold_indices(imp, plan, torch.Generator().manual_seed(0))
    assert 0.8 * plan.num_selects <= idx.numel() <= plan.num_selects
    chosen = imp[idx]
    # every selected value is above the (k*1.3)-th largest overall
    assert chosen.min() >= torch.topk(imp, int(plan.num_selects * 2)).values.min()


def _sampled_reference(x: list, plan, start: int) -> list:
    """DGC's sampled selection written plainly (lists, Python sorts), from the paper's
    description: the top_k_samples-th largest of every stride-th value from ``start`` is the
    threshold; while fewer than 0.8 k pass, it is lowered (x 0.8, in fp32; at most 10
    rounds); more than 1.3 k: the k largest of them (ties: lower positions); then the first
    k, ascending."""
    n, ns = len(x), plan.num_selects
    if ns >= n:
        return list(range(n))
    samples = x[start::plan.stride] if plan.stride != 1 else x
    thr = torch.tensor(sorted(samples, reverse=True)[plan.top_k_samples - 1], dtype=torch.float32)
    idx = [i for i in range(n) if x[i] >= float(thr)]
    if n > plan.num_samples:
        for _ in range(10):
            if len(idx) > ns:
                if len(idx) > 1.3 * ns:
                    idx = sorted(sorted(idx, key=lambda i: -x[i])[:ns])    # stable: lower first
                break
            if len(idx) < 0.8 * ns:
                thr = thr * 0.8
                idx = [i for i in range(n) if x[i] >= float(thr)]
                continue
            break
    return idx[:ns]


def test_rsdgc_sampled_selection_keeps_the_best_units_where_k_over_u_rounds_up():
    """RS-DGC's sampling plan comes from k / U, and ceil(U * (k / U)) is k + 1 for 185 of the
    (U < 400, k < 18) pairs (U = 25, k = 7 here). The plan kept k selects but ranked the
    threshold (k+1)-th; with stride 1 (the whole layer sampled) k + 1 units passed and the
    lowest k rows were kept: the best unit (24) was the one dropped."""
    from hvd_rsgc.algorithms.rsdgc import RSDGC
    m = RSDGC(MomentumCorrection(0.9), selection="sampled", kernels="eager")
    lay = make_layer(m, (25, 1, 3, 3), 0.28, name="w", index=0)
    assert lay.k == 7 and lay.plan.stride == 1
    acc = torch.arange(25, dtype=torch.float32).repeat_interleave(9).view(25, 9)   # NSI ~ row
    assert m.select(lay, acc).tolist() == list(range(18, 25))
    for U in range(2, 400):                     # the plan never asks for more than k
        for k in range(1, min(U, 18)):
            lay.layout.num_units, lay.k = U, k
            m.on_density(lay)
            assert lay.plan.num_selects <= k and lay.plan.top_k_samples <= k, (U, k, lay.plan)


@pytest.mark.parametrize("data", ["normal", "ties", "sample_high", "signed"])
def test_sampled_threshold_against_a_plain_reference(data):
    """The selection's indices, exactly, against :func:`_sampled_reference`: plain normal
    values (the first threshold holds), many equal values (more than 1.3 k pass: the k
    largest, ties to the lower positions), large values on the sampled positions only (the
    threshold overshoots and is lowered round after round), signed values (``magnitude``)."""
    g = torch.Generator().manual_seed(11)
    n = 60_000
    imp = torch.randn(n, generator=g).abs()
    plan = SamplePlan.make(n, 0.002)
    start = int(torch.randint(0, plan.stride, (1,), generator=torch.Generator().manual_seed(4)).item())
    if data == "ties":
        imp = torch.randint(0, 3, (n,), generator=g).float()
    elif data == "sample_high":
        imp = torch.rand(n, generator=g) * 0.1
        imp[start::plan.stride] += 10.0
    x = imp
    if data == "signed":
        x = imp * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
    got = sampled_threshold_indices(x, plan, torch.Generator().manual_seed(4), magnitude=data == "signed")
    want = _sampled_reference(imp.tolist(), plan, start)
    assert got.tolist() == want
    if data == "ties":
        assert len(want) == plan.num_selects            # the > 1.3 k branch ran
    if data == "sample_high":
        assert len(want) >= 0.8 * plan.num_selects      # lowered until enough passed


def test_random_indices_distinct_deterministic():
    a = random_indices(10_000, 500, torch.Generator().manual_seed(5))
    b = random_indices(10_000, 500, torch.Generator().manual_seed(5))
    c = random_indices(10_000, 500, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.numel() == 500 and a.unique().numel() == 500 and a.max() < 10_000
    assert random_indices(10, 20, torch.Generator()).tolist() == list(range(10))


# ----------------------------------------------------------------------------- memory
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_correction_conservation_and_reference(nesterov):
    torch.manual_seed(4)
    mem = MomentumCorrection(0.9, nesterov=nesterov, masking=True)
    method = TopK(mem)
    st = layer_for(method, (6, 4), 0.25)
    u_ref = torch.zeros(24, 1)
    v_ref = torch.zeros(24, 1)
    for _ in range(5):
        g = torch.randn(6, 4)
        gu = g.reshape(24, 1)
        if nesterov:
            u_ref = 0.9 * (u_ref + gu)
            v_ref = v_ref + u_ref + gu
        else:
            u_ref = 0.9 * u_ref + gu
            v_ref = v_ref + u_ref
        accumulated = v_ref.clone()
        msg = method.encode(st, g, {})
        vals, rows = unpack_sparse(msg, 1, torch.int32, 24)
        # exact top-k of the reference accumulation
        assert rows.tolist() == sorted(torch.topk(accumulated.view(-1).abs(), st.k).indices.tolist())
        sent = torch.zeros(24, 1)
        sent[rows] = vals
        # conservation: sent + residual == accumulated input
        assert torch.allclose(sent + st.memory["v"], accumulated, atol=1e-6)
        v_ref = accumulated.clone(); v_ref[rows] = 0
        u_ref[rows] = 0
        assert torch.allclose(st.memory["u"], u_ref, atol=1e-6)


def test_error_feedback_conservation_with_fp16_values():
    torch.manual_seed(5)
    method = TopK(ErrorFeedback(), value_dtype=torch.float16)
    st = layer_for(method, (50, 20), 0.05)
    total_in, total_sent = torch.zeros(1000), torch.zeros(1000)
    for _ in range(4):
        g = torch.randn(50, 20)
        total_in += g.view(-1)
        msg = method.encode(st, g, {})
        assert msg.dtype == torch.float16
        total_sent += scatter_sum(st.layout, *unpack_sparse(msg, 1, torch.int32, 1000), torch.float32).view(-1)
    # nothing lost: what was sent + what remains == everything that came in (fp16 rounding kept)
    assert torch.allclose(total_sent + st.memory["e"].view(-1), total_in, atol=1e-5)


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.int8])
@pytest.mark.parametrize("method_name", ["topk", "rsdgc", "dgc"])
def test_lossy_values_lose_nothing_under_every_memory(value_dtype, method_name):
    """What receivers decode + what stays in the residual == every gradient that came in, for
    fp16 and int8 values, under error feedback (Top-k) and momentum correction (RS-DGC, DGC;
    momentum 0 so the residual's input is the gradient itself). Momentum correction used to
    zero the sent rows and drop the rounding error."""
    torch.manual_seed(5)
    from hvd_rsgc.algorithms.dgc import DGC
    memory = ErrorFeedback() if method_name == "topk" else MomentumCorrection(0.0)
    cls = {"topk": TopK, "rsdgc": RSDGC, "dgc": DGC}[method_name]
    method = cls(memory, value_dtype=value_dtype)
    shape = (16, 8, 3, 3)
    st = layer_for(method, shape, 0.1)
    S = st.layout.unit_size
    total_in, total_sent = torch.zeros(shape), torch.zeros(shape)
    key = "e" if method_name == "topk" else "v"
    for _ in range(4):
        g = torch.randn(shape) * torch.rand(16, 1, 1, 1)        # per-unit scales differ
        total_in += g
        units = st.layout.to_units(st.memory[key].view(shape) + g)     # what is selected from
        msg = method.encode(st, g, {})
        assert msg.dtype == value_dtype
        vals, rows = unpack_sparse(msg, S, torch.int32, st.layout.num_units)
        assert vals.dtype == (torch.float32 if value_dtype == torch.int8 else value_dtype)
        total_sent += scatter_sum(st.layout, vals, rows, torch.float32)
        # which units (conservation alone holds for any choice) and their values, as rounded
        if method_name != "dgc":                # DGC's sampled choice: its own test
            score = units.abs().view(-1) if method_name == "topk" else \
                torch.tensor([ref_nsi(u.tolist(), 0.5) for u in units])
            assert sorted(rows.tolist()) == sorted(torch.topk(score, st.k).indices.tolist())
        tol = 1e-3 * units.abs().max() if value_dtype == torch.float16 else units.abs().max() / 100
        assert torch.allclose(vals.float(), units[rows], rtol=0, atol=float(tol))
    residual = st.memory["e" if method_name == "topk" else "v"].view(shape)
    assert torch.allclose(total_sent + residual, total_in, atol=1e-5)
    assert total_sent.abs().sum() > 0


def test_int8_values_wire_format_and_error_bound():
    """int8: (k, S + 2 + 4) int8 per message -- S values, a bfloat16 scale, the int32 index;
    decoded values are q * scale with |v - decoded| <= scale/2 (+ the scale's own rounding),
    the largest |v| of a unit maps to +-127 or +-126, an all-zero unit decodes to zeros, and
    decoding gives exactly what the sender kept as sent."""
    from hvd_rsgc.algorithms.base import to_wire
    torch.manual_seed(1)
    vals = torch.randn(6, 9) * torch.tensor([1e-6, 1e-3, 1.0, 1e3, 0.0, 3e-30]).view(-1, 1)
    wire, sent = to_wire(vals, torch.int8)
    assert wire.dtype == torch.int8 and tuple(wire.shape) == (6, 11)
    msg = pack_sparse(wire, torch.tensor([5, 0, 9, 2, 7, 1]), torch.int32)
    assert tuple(msg.shape) == (6, 15) and msg.numel() * msg.element_size() == 6 * 15
    got, rows = unpack_sparse(msg, 9, torch.int32, 10)
    assert rows.tolist() == [5, 0, 9, 2, 7, 1]
    assert torch.equal(got, sent)
    amax = vals.abs().amax(1, keepdim=True)
    err = (got - vals).abs()
    assert bool((err <= amax / 127 * 0.51 + amax * 2 ** -8).all())
    q = wire[:, :9].float()
    assert bool((q.abs().amax(1)[[0, 1, 2, 3, 5]] >= 126).all())
    assert torch.equal(got[4], torch.zeros(9))
    # a 3x3 kernel costs 15 bytes instead of 40 (fp32) or 22 (fp16)
    method = RSDGC(NoMemory(), value_dtype=torch.int8)
    st = layer_for(method, (64, 64, 3, 3), 0.001)
    assert method.encode(st, torch.randn(64, 64, 3, 3), {}).numel() == st.k * 15
    with pytest.raises(ValueError, match="shape"):
        unpack_sparse(msg[:, 2:], 9, torch.int32, 10)


def test_int8_values_options_rejected_clearly():
    model = torch.nn.Linear(64, 64)
    from hvd_rsgc import RSDGCCompression, RandomKCompression
    with pytest.raises(ValueError, match="fp16_values and int8_values"):
        RSDGCCompression(model, fp16_values=True, int8_values=True)
    with pytest.raises(ValueError, match="int8_values"):
        RSDGCCompression(model, int8_values="yes")
    with pytest.raises(TypeError):
        RandomKCompression(model, int8_values=True)     # no index, no per-unit scale: not offered
    with pytest.raises(ValueError, match="value_dtype"):
        RandomK(NoMemory(), value_dtype=torch.int8)


def test_rsdgc_conv_sends_whole_kernels_and_zeroes_them():
    torch.manual_seed(6)
    method = RSDGC(MomentumCorrection(0.9), beta=0.5)
    st = layer_for(method, (64, 64, 3, 3), 0.001)
    assert st.k == 5
    g = torch.randn(64, 64, 3, 3)
    msg = method.encode(st, g, {})
    assert tuple(msg.shape) == (5, 10)          # 9 values + int32 index in one fp32 column
    assert msg.numel() * msg.element_size() == 200
    vals, rows = unpack_sparse(msg, 9, torch.int32, 64 * 64)
    units = g.reshape(4096, 9)
    scores = torch.tensor([ref_nsi(units[i].tolist(), 0.5) for i in range(4096)])
    assert rows.tolist() == sorted(torch.topk(scores, 5).indices.tolist())
    assert torch.equal(vals, units[rows])
    assert st.memory["v"][rows].abs().sum() == 0 and st.memory["u"][rows].abs().sum() == 0


def test_worked_example_bytes():
    shape = (64, 64, 3, 3)
    g = torch.randn(shape)
    cases = [(TopK(NoMemory()), 296), (TopK(NoMemory(), index_dtype=torch.int64), 444),
             (RSDGC(NoMemory()), 200), (RSDGC(NoMemory(), value_dtype=torch.float16), 110)]
    for method, want in cases:
        st = layer_for(method, shape, 0.001)
        msg = method.encode(st, g, {})
        assert msg.numel() * msg.element_size() == want, method
    rk = RandomK(NoMemory())
    st = layer_for(rk, shape, 0.001)
    msg = rk.encode(st, g, {})
    assert msg.numel() * msg.element_size() == 148
    assert qsgd.message_bytes(36_864, 1, 36_864) == 9_220


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("k", [1, 3])
def test_sparse_message_roundtrip(value_dtype, index_dtype, k):
    vals = torch.randn(k, 9).to(value_dtype)
    rows = torch.tensor([7, 2, 40000][:k])
    msg = pack_sparse(vals, rows, index_dtype)
    v2, r2 = unpack_sparse(msg, 9, index_dtype, 50000)
    assert torch.equal(v2, vals) and r2.tolist() == rows.tolist()


def test_malformed_sparse_messages_rejected():
    msg = pack_sparse(torch.ones(3, 1), torch.tensor([0, 5, 99]), torch.int32)
    with pytest.raises(ValueError, match="out of range"):
        unpack_sparse(msg, 1, torch.int32, 50)
    with pytest.raises(ValueError, match="shape"):
        unpack_sparse(msg, 2, torch.int32, 200)


def test_randomk_unbiased_without_ef_and_same_indices_per_seed():
    method = RandomK(NoMemory(), seed=3)
    st = layer_for(method, (100, 10), 0.1)
    g = torch.randn(100, 10)
    ctx = {}
    vals = method.encode(st, g, ctx)
    assert torch.allclose(vals, g.view(-1)[ctx["rows"]] * 10)
    ctx2 = {}
    method2 = RandomK(NoMemory(), seed=3)
    method2.encode(layer_for(method2, (100, 10), 0.1), g, ctx2)
    assert torch.equal(ctx["rows"], ctx2["rows"])


# ----------------------------------------------------------------------------- QSGD
def test_qsgd_pack_roundtrip_and_unbiased():
    torch.manual_seed(7)
    codes = torch.randint(0, 4, (1001,))
    assert torch.equal(qsgd.unpack_bits(qsgd.pack_bits(codes, 2), 2, 1001), codes.int())
    codes3 = torch.randint(0, 8, (77,))
    assert torch.equal(qsgd.unpack_bits(qsgd.pack_bits(codes3, 3), 3, 77), codes3.int())
    x = torch.randn(300)
    gen = torch.Generator().manual_seed(0)
    draws = 4000
    acc = torch.zeros(300)
    for _ in range(draws):
        msg, sent = qsgd.encode_message(x, 1, 128, gen)
        acc += sent
        assert msg.numel() == qsgd.message_bytes(300, 1, 128)
    mean = acc / draws
    # Var(Q(x_j)) <= ||bucket|| * |x_j| for s = 1; 5 sigma bound on the mean of `draws` draws
    norms = torch.repeat_interleave(torch.linalg.vector_norm(
        torch.nn.functional.pad(x, (0, 84)).view(3, 128), dim=1), 128)[:300]
    bound = 5 * torch.sqrt(norms * x.abs() / draws) + 1e-6
    assert ((mean - x).abs() <= bound).all()
    # decode_sum of two identical messages == 2x dequantised
    msg, sent = qsgd.encode_message(x, 3, 128, gen)
    two = qsgd.decode_sum(torch.cat([msg, msg]), 2, 3, 128, 300)
    assert torch.allclose(two, 2 * sent)
    with pytest.raises(ValueError):
        qsgd.decode_sum(msg[:-1], 1, 3, 128, 300)


# ----------------------------------------------------------------------------- densities
def test_warmup_schedule_values():
    assert [warmup_density(e, 0.001, DGC_WARMUP) for e in range(6)] == \
        [0.25, 0.0625, 0.015625, 0.004, 0.001, 0.001]
    assert warmup_density(0, 0.5, DGC_WARMUP) == 0.5        # never below the target


def test_warmup_ramp_values():
    T = 64
    d = [ramp_density(t, T, 1e-4) for t in range(T + 2)]
    # DGC's per-epoch list at t = 0, T/4, T/2, 3T/4; the target from T on
    assert [d[0], d[16], d[32], d[48]] == list(DGC_WARMUP[:3]) + [0.25 ** 4]
    assert d[T] == d[T + 1] == 1e-4
    assert all(a >= b for a, b in zip(d, d[1:]))             # never rises
    assert len(set(d[:T])) == RAMP_LEVELS                     # 16 levels, not one per step
    assert d[T - 1] == pytest.approx(0.25 ** 4.75)
    assert ramp_density(1, 10, 0.1) == 0.25 ** 1.25 and ramp_density(2, 10, 0.1) == 0.1  # floor
    assert [ramp_density(t, 3, 0.01) for t in range(4)] == [0.25, 0.25 ** (1 + 4 * 5 / 16),
                                                             0.01, 0.01]   # short ramp


def test_dynamic_densities_hand_built():
    big = torch.tensor([[5.0, 4.0], [3.0, 0.1]])          # 4 weights
    small = torch.full((4, 4), 0.01)                        # 16 tiny weights
    small[0, 0] = 3.5
    # M = 20, density 0.2 -> K = 4 -> the 4 largest |w| are 5, 4, 3.5, 3.0 -> tau = 3.0:
    # big keeps 5, 4, 3 -> 3/4; small keeps 3.5 -> 1/16
    d = dynamic_densities([big, small], 0.2, floor=0.0)
    assert d == [0.75, 1 / 16]
    # starvation floor: a layer entirely below tau gets floor*density
    d2 = dynamic_densities([big, torch.full((4, 4), 0.01)], 0.2, floor=0.1)
    assert d2[1] == pytest.approx(0.02)
    # realised kept count == density * M
    assert d[0] * 4 + d[1] * 16 == 4


def test_dynamic_densities_ties_at_tau_share_the_places_left():
    """Ties at tau: the layers keep ceil(rho*M) weights in all, not every tied one. All-zero
    weights (counting ties in full gave density 1 everywhere: more bytes than dense) -> every
    layer at rho; weights on a coarse grid -> the configured total, the strictly larger weights
    in full, the ties shared in proportion."""
    ws = [torch.zeros(64, 32, 3, 3), torch.zeros(128, 64), torch.zeros(10, 128)]
    M = sum(w.numel() for w in ws)
    d = dynamic_densities(ws, 0.01, floor=0.0)
    assert d == [pytest.approx(math.ceil(0.01 * M) / M)] * 3
    # weights on a coarse grid (quantised, e.g. 4-bit): many exact ties at tau
    g = torch.Generator().manual_seed(0)
    ws = [torch.round(torch.randn(s, generator=g) * sc * 20) / 20 for s, sc in
          (((256, 128, 3, 3), 0.02), ((512, 256), 0.05), ((10, 512), 0.1))]
    M = sum(w.numel() for w in ws)
    K = math.ceil(0.001 * M)
    d = dynamic_densities(ws, 0.001, floor=0.0)
    assert sum(di * w.numel() for di, w in zip(d, ws)) == pytest.approx(K)
    flat = torch.cat([w.abs().float().reshape(-1) for w in ws])
    tau = torch.topk(flat, K).values.min()
    assert int((flat >= tau).sum()) > 5 * K            # the case: literal >= overshoots 6x
    for di, w in zip(d, ws):                            # strictly above tau: kept in full
        a = w.abs().float()
        assert int((a > tau).sum()) <= di * w.numel() <= int((a >= tau).sum())


def test_bad_input_names_parameter():
    with pytest.raises(ValueError, match="beta"):
        RSDGC(NoMemory(), beta=1.5)
    with pytest.raises(ValueError, match="radius"):
        RSDGC(NoMemory(), radius=-1)
    with pytest.raises(ValueError, match="momentum"):
        MomentumCorrection(1.0)
    with pytest.raises(ValueError, match="levels"):
        qsgd.QSGD(NoMemory(), levels=0)
    with pytest.raises(ValueError, match="sample_ratio"):
        DGC(NoMemory(), sample_ratio=0)
    with pytest.raises(ValueError, match="index_dtype"):
        TopK(NoMemory(), index_dtype=torch.int16)


def test_grad_scaler_is_checked_and_its_scale_travels_with_the_state():
    """set_grad_scaler refuses what is no scaler and nonfinite='raise' (an overflow would end
    the job), both by name; the state records the scale its buffers are in, and a state saved
    under a scale and loaded without a scaler is divided back at the next step."""
    import hvd_rsgc
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    comp = hvd_rsgc.DGCCompression(model, density=0.1, min_numel=1)
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        comp.set_grad_scaler(torch.amp.GradScaler("cpu"))
    comp = hvd_rsgc.DGCCompression(model, density=0.1, min_numel=1, nonfinite="skip")
    with pytest.raises(TypeError, match="scaler must have get_scale"):
        comp.set_grad_scaler(object())
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    comp.set_grad_scaler(scaler)
    eng = comp.engine
    e = eng.table.compressed[0]
    eng.method.init_memory(e.layer, torch.device("cpu"))
    v = torch.randn(e.layer.memory["v"].shape, generator=torch.Generator().manual_seed(0))
    e.layer.memory["v"].copy_(v)
    eng.rescale()                                   # 1 -> 8: the buffers follow
    assert eng.loss_scale == 8.0 and torch.equal(e.layer.memory["v"], v * 8)
    scaler.scale(torch.ones(()))                    # the scaler's first use creates its scale
    scaler.update(new_scale=2.0)
    eng.rescale()                                   # 8 -> 2
    assert torch.equal(e.layer.memory["v"], v * 2)
    state = comp.state_dict()
    assert state["loss_scale"] == 2.0
    plain = hvd_rsgc.DGCCompression(model, density=0.1, min_numel=1, nonfinite="skip")
    plain.load_state_dict(state)
    assert plain.engine.loss_scale == 2.0
    plain.engine.rescale()                          # no scaler: scale 1
    assert torch.equal(plain.engine.table.compressed[0].layer.memory["v"], v)
    # methods whose output does not follow the gradient's scale are refused by name
    for make in (hvd_rsgc.SignSGDCompression, hvd_rsgc.ThresholdCompression):
        with pytest.raises(ValueError, match="does not scale with the gradient"):
            make(model, nonfinite="skip").set_grad_scaler(scaler)
    with pytest.raises(ValueError, match="fp16 values without a residual"):     # cut off, lost
        hvd_rsgc.RandomKCompression(model, density=0.1, error_feedback=False, fp16_values=True,
                                    nonfinite="skip").set_grad_scaler(scaler)
    # DGC's local clipping threshold is in the scale's units too: a scaled gradient is clipped
    # to the same (scaled) vector as the unscaled one
    clip = hvd_rsgc.DGCCompression(model, density=0.1, min_numel=1, nonfinite="skip", clip_norm=0.5)
    clip.set_grad_scaler(scaler)                    # scale 2
    g = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    _, got = clip.engine.begin(clip.engine.table.compressed[0], g * 2.0, 1)
    want = hvd_rsgc.algorithms.memory.clip_local(g, 0.5, 1)
    assert float(g.norm()) > 1 and torch.allclose(got / 2.0, want, rtol=1e-6)


def test_give_back_unused_runs_only_for_the_named_tensors_and_not_again():
    """Engine.give_back_unused (DDP: parameters no rank used): a held give-back covering
    several tensors runs for the dropped ones only, once a step; if the step is then skipped,
    settle gives back the rest, not those again; held items not in the names stay held."""
    import hvd_rsgc
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    comp = hvd_rsgc.TopKCompression(model, density=0.1, min_numel=1, nonfinite="skip")
    eng = comp.engine
    a, b = eng.table.compressed[:2]
    calls = []
    for e in (a, b):
        eng.begin(e, torch.ones(e.param.shape), 1, check=False)
    eng.hold(lambda only=None: calls.append(("bucket", sorted(only))), [a.name, b.name])
    eng.hold(lambda only=None: calls.append(("b alone", sorted(only))), [b.name])
    eng.give_back_unused(lambda e: e is a)
    eng.give_back_unused(lambda e: e is a)          # once a step: nothing again
    assert calls == [("bucket", [a.name])], calls
    eng.nonfinite_result(a, torch.ones(a.param.shape))        # the step is skipped
    eng.settle()
    assert calls == [("bucket", [a.name]), ("bucket", [b.name]), ("b alone", [b.name])], calls
    # without nonfinite="skip" nothing is held, unless a DDP binding keeps it for unused tensors
    raising = hvd_rsgc.TopKCompression(model, density=0.1, min_numel=1)
    raising.engine.hold(lambda only=None: None, [a.name])
    assert raising.engine._held == []
    raising.engine.keep_for_unused = True
    raising.engine.hold(lambda only=None: None, [a.name])
    assert len(raising.engine._held) == 1


def test_a_skipped_steps_give_backs_run_once_before_the_next_steps_first_update():
    """Engine.hold / settle: what a rank sent in a step goes back (the held give-backs run)
    only if the step was skipped, once, at the next step's first tensor -- before that step's
    flags are reset, before any of its tensors is updated -- or at state_dict(), not again
    after it; a finite step's are dropped."""
    import hvd_rsgc
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    comp = hvd_rsgc.TopKCompression(model, density=0.1, min_numel=1, nonfinite="skip")
    eng = comp.engine
    a, b = eng.table.compressed[:2]
    ran = []

    def step(skip: bool, held: str, order=(a, b)):
        for e in order:                             # every tensor of a step begins once
            eng.begin(e, torch.ones(e.param.shape), 1, check=False)
            ran.append(("begin", e.name))
            eng.hold(lambda only=None, e=e: ran.append((held, e.name)), [e.name])
        if skip:
            eng.nonfinite_result(a, torch.ones(a.param.shape))
    step(False, "finite step")
    step(True, "skipped step")                      # the finite step's give-backs: dropped
    assert [r for r in ran if r[0] != "begin"] == [] and eng.step_nonfinite
    ran.clear()
    step(False, "after")                            # both come back, before the first begin ends
    assert ran[:3] == [("skipped step", a.name), ("skipped step", b.name), ("begin", a.name)], ran
    assert not eng.step_nonfinite and eng.skipped_steps == 1
    step(True, "skipped again")
    ran.clear()
    comp.state_dict()                               # a checkpoint holds them ...
    comp.state_dict()
    step(False, "x")                                # ... and they do not come back twice
    assert [r[0] for r in ran] == ["skipped again", "skipped again", "begin", "begin"], ran
    # a tensor whose step counter lags (a state saved so) opening a step is its first tensor,
    # and the step has one start only: both of its give-backs are kept, and run once
    step(True, "lagging")
    b.layer.step = 1
    ran.clear()
    step(True, "y", order=(b, a))
    assert ran == [("lagging", a.name), ("lagging", b.name), ("begin", b.name), ("begin", a.name)], ran
    ran.clear()
    step(False, "z")
    assert [r for r in ran if r[0] != "begin"] == [("y", b.name), ("y", a.name)], ran
    # a binding that says when a step ended (Horovod: every decompress; DDP: the last bucket):
    # a tensor absent from the last step, beginning first, opens the new one
    eng.end_step()
    eng.begin(a, torch.ones(a.param.shape), 1, check=False)
    eng.hold(lambda only=None: ran.append(("only a", a.name)), [a.name])
    eng.nonfinite_result(a, torch.ones(a.param.shape))
    eng.finish(a)                                   # the step (a alone) has ended
    ran.clear()
    eng.begin(b, torch.ones(b.param.shape), 1, check=False)
    assert ran == [("only a", a.name)] and not eng.step_nonfinite, ran


def test_local_clipping_reference_and_half_precision():
    """DGC's local clipping: ``g * min(1, (clip_norm / sqrt(P)) / (|g| + 1e-6))`` per tensor. An
    fp16 gradient whose norm passes fp16's 65504 is clipped like its fp32 copy, not zeroed
    (its norm in fp16 is inf, and thr / inf = 0)."""
    from hvd_rsgc.algorithms.memory import clip_local
    g = torch.randn(3000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2000
    thr = 4.0 / math.sqrt(4)
    ref = g * min(1.0, thr / (float(g.norm()) + 1e-6))
    assert torch.allclose(clip_local(g.float(), 4.0, 4).double(), ref, rtol=1e-5)
    small = g.float() * 1e-6                              # under the threshold: unchanged
    assert torch.equal(clip_local(small, 4.0, 4), small)
    assert clip_local(g.float(), None, 4) is not None and torch.equal(clip_local(g.float(), None, 4), g.float())
    for dt in (torch.float16, torch.bfloat16):
        h = g.to(dt)                                      # |g| ~ 1.1e5 > 65504
        assert torch.isinf(torch.linalg.vector_norm(h)) or dt == torch.bfloat16
        out = clip_local(h, 4.0, 4)
        assert out.dtype == dt and bool(torch.isfinite(out).all())
        want = (h.float() * (thr / (float(torch.linalg.vector_norm(h.float())) + 1e-6))).to(dt)
        assert torch.equal(out, want) and float(out.float().norm()) == pytest.approx(thr, rel=1e-2)


def test_rsdgc_sampled_plan_selects_at_most_k():
    """ceil(U * (k / U)) is k + 1 where the quotient rounds up (U = 25, k = 7 gave 8): the
    sampled selection must not send more than the layer's k units."""
    method = RSDGC(NoMemory(), selection="sampled")
    for units, k in ((25, 7), (3, 1), (100, 7), (2900, 29), (49, 48)):
        lay = make_layer(method, (units, 1, 3, 3), k / units)
        assert lay.layout.num_units == units and lay.k == k, (units, lay.k)
        assert lay.plan.num_selects <= k, (units, k, lay.plan)
        g = torch.randn(units, 1, 3, 3, generator=torch.Generator().manual_seed(units))
        msg = method.encode(lay, g, {})
        assert 0 < msg.shape[0] <= k, (units, k, msg.shape)


@pytest.mark.parametrize("make", [lambda: DGC(ErrorFeedback(), value_dtype=torch.float16),
                                  lambda: RSDGC(ErrorFeedback(), value_dtype=torch.float16),
                                  lambda: RSDGC(MomentumCorrection(0.9), value_dtype=torch.float16)])
def test_fp16_values_saturate_and_the_residual_keeps_the_rest(make):
    """Values past fp16's 65504 went on the wire as inf: the receivers decoded inf and the
    residual kept v - inf, then inf - inf = NaN for good. Clamped, every message is finite and
    (error feedback) the residual holds exactly what was not sent: sent + residual = input."""
    method = make()
    st = layer_for(method, (64, 64, 3, 3), 0.01)
    g = torch.full((64, 64, 3, 3), 3e4)
    sent = torch.zeros(64, 64, 3, 3, dtype=torch.float64)
    peaks = []
    for _ in range(4):
        msg = method.encode(st, g, {})
        vals, _ = unpack_sparse(msg, st.layout.unit_size, torch.int32, st.layout.num_units)
        assert bool(torch.isfinite(vals.float()).all())
        peaks.append(float(vals.float().abs().max()))
        dense = method.decode(st, msg, 1, {})
        assert bool(torch.isfinite(dense).all())
        sent += dense.double()
        assert all(bool(torch.isfinite(b).all()) for b in st.memory.values())
    assert max(peaks) == 65504 and peaks[0] == 3e4        # unsent units grew past fp16's range
    if isinstance(method.memory, ErrorFeedback):
        total = sent.sum() + st.memory["e"].double().sum()      # the error-feedback residual
        assert float(total) == pytest.approx(4 * 3e4 * g.numel(), rel=1e-6)


def test_int32_indexes_refused_for_a_tensor_with_more_units_than_they_reach():
    """A per-tensor message's int32 index wrapped silently past 2^31 units (2^32 + 7 decoded as
    7): refused when the compressor is built, naming the parameter (a meta tensor: no memory)."""
    import hvd_rsgc
    big = torch.nn.Parameter(torch.empty(2 ** 31 + 10, 1, device="meta"))
    with pytest.raises(ValueError, match="index_dtype torch.int32: parameter 'emb' has 2147483658 units"):
        hvd_rsgc.TopKCompression([("emb", big)], density=0.001)
    hvd_rsgc.TopKCompression([("emb", big)], density=0.001, index_dtype=torch.int64)
    kernels = torch.nn.Parameter(torch.empty(2 ** 31 - 1, 1, 3, 3, device="meta"))   # units = kernels
    hvd_rsgc.RSDGCCompression([("w", kernels)], density=0.001)


def test_qsgd_ranks_draw_independently_and_averaging_cuts_the_noise():
    """QSGD seeded every rank alike: the ranks rounded the same elements up, so the average of
    P ranks' quantised copies of one gradient was exactly as noisy as one of them."""
    g = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    outs = []
    for rank in range(8):
        m = qsgd.QSGD(NoMemory(), levels=1, bucket_size=512, seed=0)
        st = layer_for(m, (4096,), 1.0)
        msg = m.encode(st, g, {"rank": rank})
        outs.append(m.decode(st, msg, 1, {}).reshape(-1))
    assert not torch.equal(outs[0], outs[1])
    one = float((outs[0] - g).pow(2).mean())
    avg = float((torch.stack(outs).mean(0) - g).pow(2).mean())
    assert avg < one / 4, (avg, one)                  # ~ one / 8 for independent draws
    again = qsgd.QSGD(NoMemory(), levels=1, bucket_size=512, seed=0)     # a rank repeats itself
    st = layer_for(again, (4096,), 1.0)
    assert torch.equal(again.decode(st, again.encode(st, g, {"rank": 1}), 1, {}).reshape(-1), outs[1])


def test_randomk_fp16_values_saturate_instead_of_inf():
    """Random-k scales by n/k without error feedback and keeps a residual with it: fp16 values
    past 65504 became inf on the wire (a finite gradient reported as non-finite) and -inf in
    the residual."""
    for memory in (NoMemory(), ErrorFeedback()):
        m = RandomK(memory, value_dtype=torch.float16)
        st = layer_for(m, (100, 100), 0.001)
        for _ in range(3):
            wire = m.encode(st, torch.full((100, 100), 100.0), {})
            assert bool(torch.isfinite(wire).all()) and float(wire.float().abs().max()) <= 65504
            assert all(bool(torch.isfinite(b).all()) for b in st.memory.values())
