"""The registry and the README's worked example of adding a compressor (one algorithm, one
registration): built by name, refused options named, trained through the stock optimizer."""
import pytest
import torch
import torch.nn.functional as F

import hvd_rsgc
from hvd_rsgc.algorithms.base import Method
from hvd_rsgc.algorithms.memory import ErrorFeedback
from hvd_rsgc.compressor import Compressor
from hvd_rsgc.registry import REGISTRY, make_compression, names, register


class ScaledSign(Method):                       # the README's example, verbatim in substance
    communicator = "allgather"

    def empty_message(self, layer, device):
        return torch.zeros(0, dtype=torch.float32, device=device)

    def encode(self, layer, g, ctx):
        acc = self.memory.accumulate(layer.memory, layer.layout.to_units(g.float()))
        sent = acc.abs().mean() * acc.sign()
        self.memory.mark_sent(layer.memory, None, sent)
        return sent.view(-1)

    def decode(self, layer, gathered, nranks, ctx):
        return gathered.view(nranks, -1).sum(0).view(layer.shape)


@register("scaledsign-example")
class ScaledSignCompression(Compressor):
    def __init__(self, model, *, min_numel=1024, exclude=(), average=True, process_set=None):
        super().__init__(model, method=ScaledSign(ErrorFeedback()), density=1.0, min_numel=min_numel,
                         exclude=exclude, average=average, process_set=process_set)


def test_every_builtin_is_registered_and_built_by_name():
    assert {"none", "fp16", "topk", "randomk", "dgc", "qsgd", "rsdgc", "lgc-rar", "lgc-ps",
            "powersgd", "signsgd", "efsignsgd", "terngrad", "natural", "threshold"} <= set(names())
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
    for name in ("none", "fp16", "topk", "randomk", "dgc", "qsgd", "rsdgc", "powersgd", "signsgd",
                 "efsignsgd", "terngrad", "natural", "threshold"):
        comp = make_compression(name, m, min_numel=100, ignore_unknown=True)
        assert isinstance(comp, REGISTRY[name].cls)
        opt = hvd_rsgc.make_optimizer(comp, m.parameters(), lr=0.1, momentum=0.9)
        assert isinstance(opt, hvd_rsgc.DGCSGD) == (name in ("dgc", "rsdgc"))
    wide = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    assert make_compression("lgc-rar", wide, density=0.05).mode == "rar"


def test_unknown_options_and_names_are_named():
    m = torch.nn.Linear(64, 64)
    with pytest.raises(TypeError, match=r"does not take option\(s\) \['beta'\]"):
        make_compression("topk", m, beta=0.5)
    with pytest.raises(ValueError, match="compression must be one of"):
        make_compression("zip", m)
    assert make_compression("topk", m, beta=0.5, ignore_unknown=True).density == 0.001
    with pytest.raises(ValueError, match="already registered"):
        register("topk")(ScaledSignCompression)


def test_worked_example_trains_through_the_stock_optimizer():
    hvd = pytest.importorskip("horovod.torch")
    hvd.init()
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    comp = make_compression("scaledsign-example", m, min_numel=100)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
                                   named_parameters=m.named_parameters(), compression=comp)
    x, y = torch.randn(256, 32), torch.randint(0, 4, (256,))
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    st = comp.stats()
    assert st["steps"] == 40 and st["layers"]["0.weight"]["compressed"]
    e = comp.state_dict()["layers"]["0.weight"]["memory"]["e"]
    assert e.abs().sum() > 0                     # the residual keeps what the sign did not send
