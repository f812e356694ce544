"""Single-process tests of the Horovod adapter (hvd.init() at size 1, no launcher)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

hvd = pytest.importorskip("horovod.torch")

from hvd_rsgc import (DGCCompression, DGCSGD, QSGDCompression, RandomKCompression,  # noqa: E402
                      RSDGCCompression, TopKCompression)


@pytest.fixture(scope="module", autouse=True)
def horovod():
    hvd.init()
    assert hvd.size() == 1
    yield


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g))
            for _ in range(n)]


def run(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def run_synchronized(model, opt, comp, data, between=lambda: None):
    """The README's loop: ``comp.synchronize(opt)``, ``between()``, then the step inside
    ``opt.skip_synchronize()``."""
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        comp.synchronize(opt)
        between()
        with opt.skip_synchronize():
            opt.step()


def test_np1_runs_the_compressor_locally_momentum_correction_equals_sgd_momentum():
    """At size 1 Horovod registers no hooks; without the local run DGCSGD would train with
    no momentum at all. Density 1 + no masking: DGC momentum correction == SGD momentum."""
    torch.manual_seed(0)
    a = Net()
    b = copy.deepcopy(a)
    comp = RSDGCCompression(a, density=1.0, momentum_masking=False, min_numel=0)
    opt_a = hvd.DistributedOptimizer(DGCSGD(a.parameters(), lr=0.1, momentum=0.9),
                                     named_parameters=a.named_parameters(), compression=comp)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    data = batches(5)
    run(a, opt_a, data)
    run(b, opt_b, data)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
    assert comp.stats()["steps"] == 5


@pytest.mark.parametrize("make", [
    lambda m: RSDGCCompression(m, density=0.05, min_numel=0, update_every=2),
    lambda m: DGCCompression(m, density=0.05, min_numel=0, warmup_epochs=2, steps_per_epoch=2),
    lambda m: TopKCompression(m, density=0.05, min_numel=0),
    lambda m: RandomKCompression(m, density=0.05, min_numel=0),
    lambda m: QSGDCompression(m, min_numel=0, error_feedback=True),
])
def test_state_dict_roundtrip_resumes_bit_exactly(make):
    torch.manual_seed(0)
    model = Net()
    comp = make(model)
    momentum_free = isinstance(comp, (RSDGCCompression, DGCCompression))
    base = DGCSGD if momentum_free else torch.optim.SGD
    opt = hvd.DistributedOptimizer(base(model.parameters(), lr=0.05, momentum=0.9),
                                   named_parameters=model.named_parameters(), compression=comp)
    data = batches(6)
    run(model, opt, data[:3])
    state = copy.deepcopy(comp.state_dict())
    assert any(v.abs().sum() > 0 for lay in state["layers"].values() for v in lay["memory"].values()), \
        "no residual was kept"
    ckpt = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    run(model, opt, data[3:])
    want = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(0)
    model2 = Net()
    model2.load_state_dict(ckpt[0])
    comp2 = make(model2)
    comp2.load_state_dict(state)
    opt2 = hvd.DistributedOptimizer(base(model2.parameters(), lr=0.05, momentum=0.9),
                                    named_parameters=model2.named_parameters(), compression=comp2)
    opt2.load_state_dict(ckpt[1])
    run(model2, opt2, data[3:])
    for a, b in zip(want, model2.parameters()):
        assert torch.equal(a, b)


def test_state_format_1_tile_residuals_load_into_the_padded_matrix():
    """Format 1 kept tile residuals (the Linear layer here) as the (U, S) unit matrix; loading
    such a state gives exactly the residual that format 2 saved."""
    from hvd_rsgc.algorithms.layout import TileLayout
    torch.manual_seed(0)
    model = Net()
    comp = RSDGCCompression(model, density=0.05, min_numel=0)
    opt = hvd.DistributedOptimizer(DGCSGD(model.parameters(), lr=0.05, momentum=0.9),
                                   named_parameters=model.named_parameters(), compression=comp)
    run(model, opt, batches(3))
    state = copy.deepcopy(comp.state_dict())
    assert state["format"] == "hvd_rsgc.compression/2"
    tiles = {e.name: e.layer.layout for e in comp.engine.table
             if isinstance(e.layer.layout, TileLayout)}
    assert "fc.weight" in tiles and state["layers"]["fc.weight"]["memory"]["v"].abs().sum() > 0
    legacy = copy.deepcopy(state)
    legacy["format"] = "hvd_rsgc.compression/1"
    for name, lay in tiles.items():
        mem = legacy["layers"][name]["memory"]
        for k in mem:
            mem[k] = lay.units_of(mem[k]).clone()
            assert tuple(mem[k].shape) == (lay.num_units, lay.unit_size) != lay.storage_shape
    comp2 = RSDGCCompression(Net(), density=0.05, min_numel=0)
    comp2.load_state_dict(legacy)
    got = comp2.state_dict()["layers"]
    for name, rec in state["layers"].items():
        for k, val in rec["memory"].items():
            assert torch.equal(got[name]["memory"][k], val), (name, k)


def test_load_state_dict_rejects_foreign_and_mismatched_state():
    comp = RSDGCCompression(Net(), density=0.01)
    with pytest.raises(ValueError, match="not a hvd_rsgc compression state"):
        comp.load_state_dict({"weights": 1})
    other = RSDGCCompression(nn.Sequential(nn.Linear(4, 4)), density=0.01)
    with pytest.raises(ValueError, match="does not match the model"):
        comp.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="TopKCompression"):
        comp.load_state_dict(TopKCompression(Net(), density=0.01).state_dict())


def test_elastic_size_1_compresses_each_gradient_once(monkeypatch):
    """HOROVOD_ELASTIC=1 makes Horovod register its hooks at size 1 too: they compress every
    gradient, so comp.synchronize(opt) must hand over to opt.synchronize() (it ran the local
    pass as well: every gradient went into the residual twice)."""
    monkeypatch.setenv("HOROVOD_ELASTIC", "1")
    torch.manual_seed(0)
    a = Net()
    comp = RSDGCCompression(a, density=0.1, min_numel=0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(a.parameters(), lr=0.1),
                                   named_parameters=a.named_parameters(), compression=comp)
    run_synchronized(a, opt, comp, batches(2))
    assert {e.name: e.layer.step for e in comp.engine.table} == \
        {n: 2 for n, _ in a.named_parameters()}


def test_sparse_as_dense_tells_equal_gradients_of_same_shape_apart():
    """sparse_as_dense=True hands compress() p.grad.to_dense(), a new tensor, matched to its
    parameter by shape and value: two same-shape embeddings both unused in a step (zeroed
    sparse gradients, equal) were both matched to the first, which then ran twice."""
    torch.manual_seed(0)
    e1, e2, fc = nn.Embedding(50, 8, sparse=True), nn.Embedding(50, 8, sparse=True), nn.Linear(8, 3)
    model = nn.ModuleDict({"e1": e1, "e2": e2, "fc": fc})
    comp = DGCCompression(model, density=0.1, min_numel=100)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), compression=comp,
                                   sparse_as_dense=True)
    idx = torch.randint(0, 50, (4,))
    for use in (True, False, False):
        for p in model.parameters():                # zero_grad(set_to_none=False)
            if p.grad is not None:
                p.grad.zero_()
        h = e1(idx) + e2(idx) if use else torch.randn(4, 8)
        F.cross_entropy(fc(h), torch.zeros(4, dtype=torch.long)).backward()
        opt.step()
    steps = {e.name: e.layer.step for e in comp.engine.table}
    assert steps["e1.weight"] == steps["e2.weight"] == 3, steps


def test_two_compressors_stepping_together_submit_distinct_names():
    """Two optimizers, each with its compressor (distinct parameter names, as Horovod's own
    names must be), stepped after one backward: their bucket collectives must not share a name
    (both were "hvd_rsgc.bucket0.s9": Horovod refuses a name in flight, or pairs them up)."""
    torch.manual_seed(0)
    models = {"g": Net(), "d": Net()}
    names, opts = {}, []
    for tag, m in models.items():
        named = [(f"{tag}.{n}", p) for n, p in m.named_parameters()]
        comp = RSDGCCompression(named, density=0.1, min_numel=0)
        names[tag] = seen = []
        local = comp.horovod.local
        real = local.allgather_async

        def record(t, name, key=None, _real=real, _seen=seen):
            _seen.append(name)
            return _real(t, name, key)
        local.allgather_async = record
        opts.append(hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                             named_parameters=named, compression=comp))
    x, y = batches(1)[0]
    for o in opts:
        o.zero_grad()
    (F.cross_entropy(models["g"](x), y) + F.cross_entropy(models["d"](x), y)).backward()
    for o in opts:
        o.step()
    assert names["g"] and names["d"] and not set(names["g"]) & set(names["d"]), names


def trained_rsdgc(steps: int, **kw):
    """An RS-DGC compressor (momentum 0.9, density 0.1) after ``steps`` steps of a fresh Net."""
    torch.manual_seed(0)
    a = Net()
    comp = RSDGCCompression(a, density=0.1, momentum=0.9, **kw)
    opt = hvd.DistributedOptimizer(DGCSGD(a.parameters(), lr=0.1, momentum=0.9),
                                   named_parameters=a.named_parameters(), compression=comp)
    run(a, opt, batches(steps))
    return comp


def test_load_state_dict_checks_buffers_in_a_fresh_process():
    """A fresh compressor (no step yet, so no buffer to compare with) loading a state of
    another configuration: the parameter and the buffers are named at load, not a KeyError or
    a shape error on the first step."""
    state = trained_rsdgc(1, min_numel=0).state_dict()
    with pytest.raises(ValueError, match=r"parameter 'conv.weight': buffers \['u', 'v'\], this "
                                         r"configuration keeps \['e'\]"):
        RSDGCCompression(Net(), density=0.1, momentum=0.0, min_numel=0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"parameter '(conv|fc).weight': buffer '.' has shape"):
        RSDGCCompression(Net(), density=0.1, momentum=0.9, min_numel=0, radius=2).load_state_dict(state)
    fresh = RSDGCCompression(Net(), density=0.1, momentum=0.9, min_numel=0)
    fresh.load_state_dict(state)                        # the same configuration loads
    assert torch.equal(fresh.state_dict()["layers"]["conv.weight"]["memory"]["v"],
                       state["layers"]["conv.weight"]["memory"]["v"])


@pytest.mark.parametrize("kwargs,param", [
    (dict(density=0.0), "density"), (dict(density=1.5), "density"),
    (dict(density=float("nan")), "density"), (dict(beta=1.2), "beta"),
    (dict(beta=-0.1), "beta"), (dict(radius=-1), "radius"), (dict(update_every=0), "update_every"),
    (dict(warmup_epochs=2), "steps_per_epoch"), (dict(min_numel=-1), "min_numel"),
    (dict(momentum=1.0), "momentum"), (dict(selection="fast"), "selection"),
    (dict(density_floor=2.0), "density_floor"), (dict(clip_norm=0.0), "clip_norm"),
    (dict(warmup_ramp_steps=-1), "warmup_ramp_steps"),
    (dict(warmup_ramp_steps=4, warmup_epochs=2, steps_per_epoch=2), "warmup_ramp_steps"),
    # accepted before, silently: no momentum correction, no sampling, averaging, a short warm-up
    (dict(momentum=-0.9), "momentum"), (dict(momentum=float("nan")), "momentum"),
    (dict(selection="sampled", sample_ratio=0.0), "sample_ratio"),
    (dict(selection="sampled", sample_ratio=2.0), "sample_ratio"),
    (dict(average="no"), "average"), (dict(bucket_mb=float("inf")), "bucket_mb"),
    (dict(warmup_epochs=3, warmup_densities=(0.5,), steps_per_epoch=2), "warmup_epochs=3"),
    (dict(warmup_epochs=5, steps_per_epoch=2), "warmup_densities has 4"),
    (dict(exclude=[1]), "exclude"),
])
def test_bad_arguments_name_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        RSDGCCompression(Net(), **kwargs)


def test_exclude_none_excludes_nothing():
    assert RSDGCCompression(Net(), exclude=None, min_numel=0).engine.exclude == ()


def test_bad_model_argument():
    with pytest.raises(TypeError, match="model"):
        RSDGCCompression(42)
    with pytest.raises(ValueError, match="no parameters"):
        RSDGCCompression(nn.ReLU())


def test_gradient_of_unknown_parameter_and_adasum_style_call():
    model = Net()
    comp = RSDGCCompression(model, density=0.01, min_numel=0)
    with pytest.raises(ValueError, match="belongs to no parameter"):
        comp.compress(torch.zeros(8, 3, 3, 3))
    with pytest.raises(ValueError, match="Adasum"):
        comp.compress(model.conv.weight)


def test_optimizer_with_parameters_the_model_does_not_own():
    a, b = Net(), Net()
    comp = TopKCompression(a, density=0.1)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(b.parameters(), lr=0.1),
                                   named_parameters=b.named_parameters(), compression=comp)
    F.cross_entropy(b(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1])).backward()
    with pytest.raises(ValueError, match="does not own"):
        opt.step()


def test_compressed_parameters_the_optimizer_does_not_update_are_named():
    """A compressor built on the whole model under an optimizer over part of it: Horovod
    compresses only what the optimizer updates, so the fused path's bucket never completes;
    the error names the parameters left out and says why (it advised calling synchronize())."""
    torch.manual_seed(0)
    a = Net()
    comp = RSDGCCompression(a, density=0.1, min_numel=0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(a.fc.parameters(), lr=0.1),
                                   named_parameters=a.fc.named_parameters(prefix="fc"), compression=comp)
    with pytest.raises(RuntimeError, match=r"not compressed this step: \['conv.weight'\].*"
                                           r"optimizer does not update"):
        run(a, opt, batches(1))


def test_parameters_frozen_after_the_compressor_was_built_stay_out_of_the_buckets():
    """Fine-tuning: the compressor built on the whole model, then the backbone frozen and the
    optimizer built over what still trains. The frozen conv used to sit in a bucket that
    never completed (RuntimeError at the first step); it trains now as with a compressor built
    after the freeze, bit for bit, and the frozen conv does not move."""
    def train(freeze_first):
        torch.manual_seed(0)
        a = Net()
        if freeze_first:
            a.conv.weight.requires_grad_(False)
        # dynamic=False: the layer-wise densities rank every compressed layer's weights, so
        # the twin built after the freeze would set other k
        comp = RSDGCCompression(a, density=0.1, min_numel=0, dynamic=False)
        a.conv.weight.requires_grad_(False)
        live = [(n, p) for n, p in a.named_parameters() if p.requires_grad]
        opt = hvd.DistributedOptimizer(torch.optim.SGD([p for _, p in live], lr=0.1),
                                       named_parameters=live, compression=comp)
        w = a.conv.weight.detach().clone()
        run(a, opt, batches(3))
        assert torch.equal(a.conv.weight, w)
        return torch.cat([p.detach().reshape(-1) for p in a.parameters()])
    assert torch.equal(train(False), train(True))


def test_process_set_mismatch_is_refused_whichever_side_is_the_default():
    """A compressor on the global set (process_set=None) under an optimizer on a subset used to
    pass the check (it only compared two explicit sets) and gathered over ranks that never join."""
    from types import SimpleNamespace
    model = Net()
    subset = SimpleNamespace(process_set_id=3, ranks=[0, 1])
    comp = TopKCompression(model, density=0.1)
    with pytest.raises(ValueError, match=r"different process sets \(optimizer: ranks \[0, 1\]"):
        comp.check_optimizer(SimpleNamespace(op=hvd.Average, process_set=subset, param_groups=[]))
    comp.check_optimizer(SimpleNamespace(op=hvd.Average, process_set=hvd.global_process_set,
                                         param_groups=[]))                   # the default: fine
    on_subset = TopKCompression(model, density=0.1, process_set=subset)
    on_subset.check_optimizer(SimpleNamespace(op=hvd.Average, process_set=subset, param_groups=[]))
    with pytest.raises(ValueError, match="different process sets"):
        on_subset.check_optimizer(SimpleNamespace(op=hvd.Average, process_set=hvd.global_process_set,
                                                  param_groups=[]))


@pytest.mark.parametrize("make", [lambda m: DGCCompression(m, density=0.1, min_numel=0),
                                  lambda m: RSDGCCompression(m, density=0.1, min_numel=0)])
def test_state_saved_before_the_first_step_loads_into_a_trained_compressor(make):
    """Loading a state saved before any step (no buffers yet) into a compressor that has
    trained used to keep 'buffers ready' with none there: the next step failed (KeyError)."""
    torch.manual_seed(0)
    model = Net()
    fresh = make(model).state_dict()
    comp = make(model)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                   named_parameters=model.named_parameters(), compression=comp)
    data = batches(3)
    run(model, opt, data[:1])
    twin = copy.deepcopy(model)
    comp.load_state_dict(fresh)
    run(model, opt, data[1:])                 # buffers allocated anew, as at a first step
    # reference: the same weights under a compressor that never trained
    ref = make(twin)
    run(twin, hvd.DistributedOptimizer(torch.optim.SGD(twin.parameters(), lr=0.05),
                                       named_parameters=twin.named_parameters(), compression=ref), data[1:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_empty_gradient_named():
    model = nn.Module()
    model.w = nn.Parameter(torch.empty(0, 4))
    model.v = nn.Parameter(torch.ones(3, 4))
    comp = TopKCompression(model, density=0.5, min_numel=0)
    model.w.grad = torch.empty(0, 4)
    with pytest.raises(ValueError, match="'w'"):
        comp.compress(model.w.grad)


def test_double_momentum_and_dgcsgd_without_momentum_correction():
    model = Net()
    comp = DGCCompression(model, density=0.1)     # nothing sparse (min_numel): dense momentum
    with pytest.raises(ValueError, match="double momentum"):
        comp.check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    comp = DGCCompression(model, density=0.1, min_numel=0)
    with pytest.raises(ValueError, match="double momentum"):
        comp.check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    comp.check_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))     # momentum 0: fine
    topk = TopKCompression(model, density=0.1)
    with pytest.raises(ValueError, match="DGCSGD"):
        topk.check_optimizer(DGCSGD(model.parameters(), lr=0.1, momentum=0.9))


def test_dgcsgd_matches_reference_formula():
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(5))
    opt = DGCSGD([w], lr=0.1, momentum=0.9, weight_decay=0.01)
    ref_w, buf = w.detach().clone(), None
    for _ in range(4):
        g = torch.randn(5)
        w.grad = g.clone()
        opt.step()
        d = 0.01 * ref_w
        buf = d.clone() if buf is None else 0.9 * buf + d
        ref_w = ref_w - 0.1 * (buf + g)
        assert torch.allclose(w.detach(), ref_w, atol=1e-6)


def test_stats_and_warmup_schedule():
    model = Net()
    comp = DGCCompression(model, density=0.001, min_numel=0, warmup_epochs=4, steps_per_epoch=2)
    opt = hvd.DistributedOptimizer(DGCSGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters(), compression=comp)
    seen = []
    for x, y in batches(10):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        seen.append(comp.stats()["layers"]["conv.weight"]["density"])
    assert seen == [0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625, 0.004, 0.004, 0.001, 0.001]
    st = comp.stats()
    assert st["steps"] == 10 and st["total_bytes"] > 0 and st["compression_ratio"] > 1
    comp.set_epoch(0)
    with pytest.raises(ValueError, match="epoch"):
        comp.set_epoch(-1)


@pytest.mark.parametrize("make", [
    lambda m: DGCCompression(m, density=0.01, min_numel=0, warmup_ramp_steps=8),
    lambda m: RSDGCCompression(m, density=0.01, min_numel=0, warmup_ramp_steps=8, dynamic=False),
])
def test_warmup_ramp_through_the_optimizer(make):
    """The per-step ramp: the density each step uses (what k is sized from) follows
    0.25^(1 + 4*floor(16t/T)/16) over the first T steps, then the target; set_epoch does not
    move it."""
    model = Net()
    comp = make(model)
    opt = hvd.DistributedOptimizer(DGCSGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters(), compression=comp)
    seen = []
    for t, (x, y) in enumerate(batches(11)):
        comp.set_epoch(t)                        # epochs must not matter for the ramp
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        seen.append(comp.stats()["layers"]["conv.weight"]["density"])
    ref = [max(0.25 ** (1 + 4 * (16 * t // 8) / 16), 0.01) for t in range(8)] + [0.01] * 3
    assert seen == ref
    assert seen[:3] == [0.25, 0.25 ** 1.5, 0.0625]


def test_loaded_state_follows_the_gradients_device_dense_momentum_too():
    """A checkpoint is loaded on the CPU (``map_location``), then ``model.cuda()``: every
    loaded buffer moves to the device of its tensor's first gradient -- the residuals of the
    sparse tensors and the local momentum 'u' of the tensors sent dense (biases), which stayed
    on the CPU and failed the first step on a GPU. A 'meta' gradient stands in for the GPU."""
    state = trained_rsdgc(2, min_numel=100).state_dict()
    dense = [n for n, rec in state["layers"].items() if list(rec["memory"]) == ["u"]]
    assert dense and len(dense) < len(state["layers"]), "want both kinds of tensor"
    comp = RSDGCCompression(Net(), density=0.1, momentum=0.9, min_numel=100)
    comp.load_state_dict(state)
    eng = comp.engine
    for e in eng.table:
        eng.begin(e, torch.empty(e.layer.shape, device="meta"), 1, check=False)
        assert {k: v.device.type for k, v in e.layer.memory.items()} \
            == {k: "meta" for k in state["layers"][e.name]["memory"]}, e.name


def test_loading_an_earlier_state_starts_the_per_step_records_over():
    """Roll back in the same process (load the state of step 3 after step 4; e.g. going back
    to the last good checkpoint): the next step is numbered 4 again, which the multi-round
    record of the last step matched, so PowerSGD skipped its rounds and found no result
    (KeyError) -- the records keyed by step start over with the loaded state."""
    from hvd_rsgc import PowerSGDCompression
    torch.manual_seed(0)
    model = Net()
    comp = PowerSGDCompression(model, rank=2, min_numel=0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                   named_parameters=model.named_parameters(), compression=comp)
    data = batches(5)
    run(model, opt, data[:3])
    state, ckpt = copy.deepcopy(comp.state_dict()), copy.deepcopy(model.state_dict())
    opt_ckpt = copy.deepcopy(opt.state_dict())
    run(model, opt, data[3:4])
    want = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(ckpt)
    comp.load_state_dict(state)
    opt.load_state_dict(opt_ckpt)
    run(model, opt, data[3:4])                           # the same step again, the same result
    for a, b in zip(want, model.parameters()):
        assert torch.equal(a, b)


def test_broadcast_optimizer_state_at_np1_runs_no_compression_step():
    """``hvd.broadcast_optimizer_state`` creates a new optimizer's state with one base-class
    step on zero gradients. At -np N no hook fires; at -np 1 the local pass ran the compressor
    on those zeros: step counters + 1 and, on resume, one more momentum step in the residual,
    so a resumed run left the uninterrupted one."""
    def build(model):
        comp = DGCCompression(model, density=0.1, min_numel=0)
        opt = hvd.DistributedOptimizer(DGCSGD(model.parameters(), lr=0.1, momentum=0.9),
                                       named_parameters=model.named_parameters(), compression=comp)
        return comp, opt

    torch.manual_seed(0)
    model = Net()
    comp, opt = build(model)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert comp.stats()["steps"] == 0 and all(e.layer.step == 0 for e in comp.engine.table)
    data = batches(6)
    run(model, opt, data[:3])
    ckpt = copy.deepcopy((model.state_dict(), opt.state_dict(), comp.state_dict()))
    run(model, opt, data[3:])
    want = [p.detach().clone() for p in model.parameters()]

    model2 = Net()
    model2.load_state_dict(ckpt[0])
    comp2, opt2 = build(model2)
    opt2.load_state_dict(ckpt[1])
    comp2.load_state_dict(ckpt[2])
    hvd.broadcast_parameters(model2.state_dict(), root_rank=0)      # what a resumed job does
    hvd.broadcast_optimizer_state(opt2, root_rank=0)
    run(model2, opt2, data[3:])
    for a, b in zip(want, model2.parameters()):
        assert torch.equal(a, b)


def test_a_refused_state_leaves_the_compressor_as_it_was():
    """``load_state_dict`` of a state saved under other options is refused, naming the
    parameter -- and changes nothing: layers before the one that failed the check were
    already overwritten, and a caller that went on trained on half of each state."""
    comp, other = trained_rsdgc(2, min_numel=0, radius=2), trained_rsdgc(3, min_numel=0, radius=1)
    before = copy.deepcopy(comp.state_dict())
    with pytest.raises(ValueError, match=r"parameter '(conv|fc).weight': buffer '.' has shape"):
        comp.load_state_dict(other.state_dict())
    after = comp.state_dict()
    assert after["layers"].keys() == before["layers"].keys()
    for name, rec in before["layers"].items():
        got = after["layers"][name]
        assert (got["step"], got["k"]) == (rec["step"], rec["k"]), name
        assert got["memory"].keys() == rec["memory"].keys(), name
        for k, v in rec["memory"].items():
            assert torch.equal(got["memory"][k], v), (name, k)


def test_np1_gradients_changed_after_synchronize_are_not_compressed_again():
    """At -np 1 ``comp.synchronize(opt)`` runs the local pass; a gradient changed in place
    after it (clip_grad_norm_, GradScaler's unscale_) and then ``with opt.skip_synchronize():
    opt.step()`` must not run the pass a second time -- that compressed the decoded gradients
    again as one more step (the counters, the residuals, the give-backs and the loss scale
    all moved twice)."""
    torch.manual_seed(0)
    model = Net()
    comp = TopKCompression(model, density=0.1, min_numel=10)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                   named_parameters=model.named_parameters(), compression=comp)
    # clipped in place between the two: a new version of every gradient
    run_synchronized(model, opt, comp, batches(3),
                     between=lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3))
    assert comp.stats()["steps"] == 3
    assert {lay["step"] for lay in comp.state_dict()["layers"].values()} == {3}
