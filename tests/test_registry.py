"""The registry and the README's worked example of adding a compressor (one algorithm, one
registration): built by name, refused options named, trained through the stock optimizer."""
import os
import re
import subprocess
import types

import pytest
import torch
import torch.nn.functional as F

import hvd_rsgc
from hvd_rsgc.registry import REGISTRY, make_compression, names, register
from support import ROOT, tool


def readme_example() -> tuple[str, str]:
    """The two code blocks of the README's "Adding a compressor": the algorithm file and its
    registration, as a user would copy them."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("### Adding a compressor"):]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return blocks[0], blocks[1]


def load_example():
    """The algorithm block as the module ``hvd_rsgc.algorithms.scaledsign`` (its relative
    imports resolve there), the registration block run with the names compression.py has."""
    algo, reg = readme_example()
    mod = types.ModuleType("hvd_rsgc.algorithms.scaledsign")
    mod.__package__ = "hvd_rsgc.algorithms"
    exec(compile(algo, "README: scaledsign.py", "exec"), mod.__dict__)
    import hvd_rsgc.compression as compression
    ns = {**vars(compression), "ScaledSign": mod.ScaledSign}
    exec(compile(reg, "README: registration", "exec"), ns)
    return mod.ScaledSign, ns["ScaledSignCompression"]


ScaledSign, ScaledSignCompression = load_example()          # registers "scaledsign"


def test_readme_example_is_lint_clean():
    """What the README tells a user to paste passes the lint the test command runs over it."""
    algo, _ = readme_example()
    p = subprocess.run([tool("ruff"), "check", "--stdin-filename", "hvd_rsgc/algorithms/scaledsign.py", "-"],
                       input=algo, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-1000:]


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
    comp = make_compression("scaledsign", m, min_numel=100)
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


@pytest.mark.parametrize("name", names())
def test_every_boolean_option_refuses_what_is_not_a_bool(name):
    """A truthy string used to switch an option on: RSDGCCompression(nesterov="no") trained
    with Nesterov, error_feedback="no" kept error feedback. Every option a registered
    compressor annotates ``bool`` (Compressor's own check, so a new compressor gets it too)
    must refuse "no", 0 and None with a ValueError naming it (True / False: every other test)."""
    import inspect
    model = torch.nn.Linear(512, 512)          # big enough for LGC's code
    cls = REGISTRY[name].cls
    flags = [n for n, p in inspect.signature(cls.__init__).parameters.items()
             if p.annotation in (bool, "bool")]
    # every built-in annotates at least ``average``; the README's unannotated example gets
    # the base class's own check of it
    assert "average" in flags or cls is ScaledSignCompression, flags
    for flag in set(flags) | {"average"}:
        for bad in ("no", 0, None):
            with pytest.raises(ValueError, match=rf"\b{flag} must be True or False"):
                make_compression(name, model, **{flag: bad})
