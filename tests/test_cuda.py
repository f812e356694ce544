"""CUDA path (skipped without a GPU; run on a GPU box): every method on CUDA tensors matches
the CPU computation, the sparse aggregation is bit-deterministic on CUDA (ranks stay
identical), and the adapter trains a model on the GPU at size 1."""
import pytest
import torch

from hvd_rsgc.algorithms.base import make_layer, scatter_sum, unpack_sparse
from hvd_rsgc.algorithms.dgc import DGC
from hvd_rsgc.algorithms.memory import ErrorFeedback, MomentumCorrection, NoMemory
from hvd_rsgc.algorithms.qsgd import QSGD
from hvd_rsgc.algorithms.randomk import RandomK
from hvd_rsgc.algorithms.rsdgc import RSDGC
from hvd_rsgc.algorithms.topk import TopK

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def layer(method, shape, density, device):
    return make_layer(method, shape, density, device=device)


@pytest.mark.parametrize("make", [lambda: RSDGC(MomentumCorrection(0.9)),
                                  lambda: RSDGC(MomentumCorrection(0.9), value_dtype=torch.float16),
                                  lambda: TopK(ErrorFeedback()),
                                  lambda: RandomK(ErrorFeedback())])
@pytest.mark.parametrize("shape", [(64, 64, 3, 3), (100, 70), (256, 64, 1, 1)])
def test_cuda_matches_cpu(make, shape):
    torch.manual_seed(0)
    grads = [torch.randn(shape) for _ in range(3)]
    out = {}
    for dev in ("cpu", "cuda"):
        m = make()
        lay = layer(m, shape, 0.01, dev)
        msgs = []
        for s, g in enumerate(grads):
            lay.step = s
            ctx = {}
            msg = m.encode(lay, g.to(dev), ctx)
            msgs.append((msg.cpu(), m.decode(lay, msg, 1, ctx).cpu()))
        out[dev] = msgs
    for (mc, dc), (mg, dg) in zip(out["cpu"], out["cuda"]):
        assert mc.shape == mg.shape
        assert torch.allclose(dc, dg, atol=1e-5, rtol=1e-4)


def test_cuda_scatter_deterministic_with_duplicates():
    """Two ranks picking overlapping units: the sum must be bit-identical run to run."""
    torch.manual_seed(1)
    m = RSDGC(NoMemory())
    lay = layer(m, (512, 512, 3, 3), 0.05, "cuda")
    vals = torch.randn(40_000, 9, device="cuda")
    rows = torch.randint(0, 512 * 512, (40_000,), device="cuda")       # many duplicates
    ref = scatter_sum(lay.layout, vals, rows, torch.float32)
    for _ in range(5):
        assert torch.equal(scatter_sum(lay.layout, vals, rows, torch.float32), ref)


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.int8])
@pytest.mark.parametrize("method", ["rsdgc", "topk", "dgc"])
def test_cuda_grouped_route_matches_cpu(value_dtype, method):
    """The whole-group route (``kernels="grouped"``, RS-DGC, Top-k, DGC) on CUDA tensors: the
    rows the per-layer eager route picks on the CPU, values and residuals to float rounding,
    and the group route ran (it declines nothing here)."""
    from hvd_rsgc.algorithms import grouped
    from hvd_rsgc.algorithms.bucket import BucketCodec
    shapes = [(64, 64, 3, 3), (512, 96, 1, 1), (40, 31), (8, 4, 5, 5)]
    torch.manual_seed(0)
    steps = [[torch.randn(s) for s in shapes] for _ in range(3)]
    out, ran = {}, []
    real = grouped.encode_group
    for dev, kernels in (("cpu", "eager"), ("cuda", "grouped")):
        cls, mem = {"rsdgc": (RSDGC, MomentumCorrection(0.9)), "dgc": (DGC, MomentumCorrection(0.9)),
                    "topk": (TopK, ErrorFeedback())}[method]
        m = cls(mem, kernels=kernels, value_dtype=value_dtype)
        layers = [layer(m, s, 0.01, dev) for s in shapes]
        for i, st in enumerate(layers):
            st.name = f"t{i}"
        codec = BucketCodec(m, layers)
        res = []
        for grads in steps:
            ctxs = {st.name: {} for st in layers}
            grouped.encode_group = lambda *a, **k: ran.append(a[0]) or real(*a, **k)
            try:
                msgs = codec.encode({st.name: g.to(dev) for st, g in zip(layers, grads)}, ctxs)
            finally:
                grouped.encode_group = real
            dec = codec.decode(msgs)
            res.append(([unpack_sparse(x.cpu(), g.S, torch.int32, g.units + len(g.layers))
                         for x, g in zip(msgs, codec.groups)],
                        {k: v.cpu() for k, v in dec.items()},
                        [st.memory["e" if method == "topk" else "v"].cpu() for st in layers]))
        out[kernels] = res
    # RS-DGC: two groups (S = 9, 25); Top-k, DGC: one (elements); three steps, on CUDA
    assert len(ran) == 3 * (2 if method == "rsdgc" else 1)
    for (mc, dc, vc), (mg, dg, vg) in zip(out["eager"], out["grouped"]):
        for (va, ra), (vb, rb) in zip(mc, mg):
            assert torch.equal(ra, rb)
            assert torch.allclose(va, vb, atol=1e-5, rtol=1e-4)
        for k in dc:
            assert torch.allclose(dc[k], dg[k], atol=1e-5, rtol=1e-4)
        for a, b in zip(vc, vg):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_cuda_qsgd_and_dgc_run():
    g = torch.randn(300, 200, device="cuda")
    q = QSGD(NoMemory(), levels=1, bucket_size=512)
    lay = layer(q, g.shape, 1.0, "cuda")
    msg = q.encode(lay, g, {})
    assert msg.is_cuda and q.decode(lay, msg, 1, {}).shape == g.shape
    d = DGC(MomentumCorrection(0.9))
    lay = layer(d, g.shape, 0.01, "cuda")
    msg = d.encode(lay, g, {})
    vals, rows = unpack_sparse(msg, 1, torch.int32, g.numel())
    assert rows.numel() <= lay.plan.num_selects


def test_adapter_trains_on_cuda_at_size_one():
    hvd = pytest.importorskip("horovod.torch")
    import torch.nn as nn
    import torch.nn.functional as F

    from hvd_rsgc import DGCSGD, RSDGCCompression
    hvd.init()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32 * 8 * 8, 4)).cuda()
    comp = RSDGCCompression(model, density=0.05, min_numel=0)
    opt = hvd.DistributedOptimizer(DGCSGD(model.parameters(), lr=0.05),
                                   named_parameters=model.named_parameters(), compression=comp)
    x = torch.randn(64, 3, 8, 8, device="cuda")
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0].mean((1, 2)) > 0).long()
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first
    assert all(v.is_cuda for lay in comp.state_dict()["layers"].values() for v in lay["memory"].values())



def test_loss_scaled_training_on_cuda_equals_the_unscaled_run_and_fp16_autocast_trains():
    """GradScaler("cuda") with set_grad_scaler at size 1 (the local pass): an fp32 model whose
    scale doubles every two steps trains bit for bit as the unscaled run (linear layers only:
    deterministic kernels, exact power-of-two scaling); under fp16 autocast it trains and the
    state stays on the GPU in the scale's units."""
    hvd = pytest.importorskip("horovod.torch")
    import torch.nn as nn
    import torch.nn.functional as F

    from hvd_rsgc import DGCSGD, RSDGCCompression
    hvd.init()
    x = torch.randn(64, 48, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    y = (x[:, :8].sum(1) > 0).long() + 2 * (x[:, 8:16].sum(1) > 0).long()

    def run(scaled, autocast=False, steps=12):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 4)).cuda()
        comp = RSDGCCompression(model, density=0.05, min_numel=0, nonfinite="skip")
        opt = hvd.DistributedOptimizer(DGCSGD(model.parameters(), lr=0.05),
                                       named_parameters=model.named_parameters(), compression=comp)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10, growth_interval=2) if scaled else None
        if scaled:
            comp.set_grad_scaler(scaler)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
                loss = F.cross_entropy(model(x), y)
            (scaler.scale(loss) if scaled else loss).backward()
            comp.synchronize(opt)
            with opt.skip_synchronize():
                scaler.step(opt) if scaled else opt.step()
            if scaled:
                scaler.update()
            losses.append(loss.item())
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return flat, losses, comp, scaler
    plain, _, _, _ = run(False)
    scaled, _, comp, scaler = run(True)
    assert scaler.get_scale() > 2.0 ** 10 and torch.equal(plain, scaled)
    _, losses, comp, scaler = run(True, autocast=True, steps=40)
    assert losses[-1] < 0.7 * losses[0]
    state = comp.state_dict()
    assert state["loss_scale"] >= 2.0 ** 10
    assert all(v.is_cuda for lay in state["layers"].values() for v in lay["memory"].values())
