"""One registry of compressors, used by the training CLI, ``compare``, ``bench`` and the tests.

    import hvd_rsgc
    comp = hvd_rsgc.make_compression("rsdgc", model, density=0.001)
    opt = hvd_rsgc.make_optimizer(comp, model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

A compressor class registers itself with ``@register("name")`` (see ``compression.py``);
``aliases`` maps application option names (e.g. the CLI's ``qsgd_levels``) to the class's
keyword names, ``defaults`` fixes keywords for a registered variant (``lgc-rar`` is
``LGCCompression(mode="rar")``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Spec:
    name: str
    cls: type
    defaults: dict = field(default_factory=dict)
    aliases: dict = field(default_factory=dict)

    def options(self) -> list[str]:
        """Keyword options the class accepts (``model`` excluded)."""
        sig = inspect.signature(self.cls.__init__)
        return [n for n, p in sig.parameters.items()
                if n not in ("self", "model") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


REGISTRY: dict[str, Spec] = {}


def register(name: str, *, defaults: dict | None = None, aliases: dict | None = None):
    """Class decorator: make ``cls`` available as ``make_compression(name, ...)``."""
    def deco(cls):
        if name in REGISTRY and REGISTRY[name].cls is not cls:
            raise ValueError(f"compressor name {name!r} is already registered by "
                             f"{REGISTRY[name].cls.__name__}")
        REGISTRY[name] = Spec(name, cls, dict(defaults or {}), dict(aliases or {}))
        if not hasattr(cls, "registry_name"):
            cls.registry_name = name
        return cls
    return deco


def names() -> tuple[str, ...]:
    _load()
    return tuple(REGISTRY)


def spec(name: str) -> Spec:
    _load()
    if name not in REGISTRY:
        raise ValueError(f"compression must be one of {tuple(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def make_compression(name: str, model, *, ignore_unknown: bool = False, **options):
    """Build the compressor registered as ``name`` for ``model``. Unknown options raise a
    ``TypeError`` naming them, unless ``ignore_unknown`` (the CLI passes its whole compression
    section; each compressor takes what it understands)."""
    s = spec(name)
    accepted = set(s.options())
    kw = {}
    unknown = []
    for k, v in options.items():
        k2 = s.aliases.get(k, k)
        if k2 in accepted and k2 not in s.defaults:
            kw[k2] = v
        elif not ignore_unknown:
            unknown.append(k)
    if unknown:
        raise TypeError(f"{s.cls.__name__} ({name!r}) does not take option(s) {unknown}; "
                        f"it takes {sorted(accepted - set(s.defaults))}")
    return s.cls(model, **s.defaults, **kw)


def make_optimizer(compression, params, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0, nesterov: bool = False) -> torch.optim.Optimizer:
    """The optimizer that goes with ``compression``: :class:`~hvd_rsgc.optim.DGCSGD` (momentum
    only on weight decay) for momentum-correcting compressors, else ``torch.optim.SGD``."""
    from .optim import DGCSGD
    if getattr(compression, "momentum_correction", False):
        return DGCSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                      nesterov=nesterov)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov)


def _load() -> None:
    from . import compression  # noqa: F401 - registration side effects
