"""Typed configuration of the training application, in five sections.

Every key can be set in a YAML file (``--config``) or on the command line as ``--key value``;
``python -m hvd_rsgc.train --help`` lists each key with its type, default and choices. Values
are parsed by the key's type, not guessed: ``--lr 1e-3`` is a float (YAML 1.1 would read
``1e-3`` as a string), ``--milestones 0.5,0.75`` or ``[0.5,0.75]`` a list, ``none`` clears an
optional value. A wrong value raises ``ValueError`` naming the key and where it came from.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

_NONE = ("none", "null", "~", "")


def opt(default, help: str, minimum=None, maximum=None, *, choices=None, kind: str | None = None,
        positive: bool = False):
    """A config field with its documentation and constraints (for a list of numbers: of every
    element; ``positive``: > 0)."""
    md = {"help": help, "choices": choices, "min": minimum, "max": maximum, "kind": kind,
          "positive": positive}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=md)
    return field(default=default, metadata=md)


def _compression_choices():
    from ..registry import names
    return names()


def _model_choices():
    from .models import MODELS
    return tuple(MODELS) + ("tv_<torchvision name>",)


def _dataset_choices():
    from .data import DATASETS
    return DATASETS


@dataclass
class DataConfig:
    dataset: str = opt("synthetic", "data set", choices=_dataset_choices)
    data_root: str | None = opt(None, "folder with one sub-folder per class (ucm, nwpu, folder); "
                                       "indianpines: the built scene folder (default: the cache)")
    train_split: str | None = opt(None, "split file of training images (torchgeo style)")
    val_split: str | None = opt(None, "split file of validation images")
    train_ratio: float = opt(0.8, "seeded stratified split when no split files", 0.0, None)
    image_size: int = opt(32, "images are resized to image_size x image_size (houston: the odd "
                          "patch size, e.g. 11)", minimum=1)
    num_classes: int | None = opt(None, "classes of the synthetic set (default 6)", minimum=2)
    synthetic_train: int = opt(512, "synthetic training images", minimum=1)
    synthetic_val: int = opt(256, "synthetic validation images", minimum=1)
    workers: int = opt(0, "DataLoader worker processes", minimum=0)
    augment: bool = opt(True, "random flips / 90-degree rotations")
    mean: list = opt([93.894, 97.112, 87.568], "per-channel mean (0-255) for normalisation",
                     kind="floats")
    std: list = opt([51.849, 47.237, 47.063], "per-channel std (0-255)", kind="floats",
                    positive=True)
    houston_hsi: str | None = opt(None, "houston: hyperspectral cube (.mat/.tif/.npy)")
    houston_lidar: str | None = opt(None, "houston: LiDAR DSM (.mat/.tif/.npy)")
    houston_train: str | None = opt(None, "houston: training label map (0 = unlabelled)")
    houston_test: str | None = opt(None, "houston: test label map")
    houston_bands: int = opt(144, "houston: hyperspectral bands expected", minimum=1)


@dataclass
class OptimConfig:
    model: str = opt("resnet20", "network", choices=_model_choices)
    epochs: int = opt(5, "epochs in the whole run", minimum=1)
    batch_size: int = opt(16, "images per worker per step", minimum=1)
    lr: float = opt(0.1, "base learning rate", minimum=0.0)
    momentum: float = opt(0.9, "momentum (the compressor's, for momentum-correcting methods)",
                          0.0, 1.0)
    weight_decay: float = opt(1e-4, "L2 weight decay", minimum=0.0)
    nesterov: bool = opt(False, "Nesterov momentum")
    lr_schedule: str = opt("cosine", "learning-rate schedule",
                           choices=("cosine", "multistep", "constant"))
    milestones: list = opt([0.5, 0.75], "multistep: fractions of the run where lr *= gamma",
                           0.0, 1.0, kind="floats")
    gamma: float = opt(0.1, "multistep factor", minimum=0.0)
    lr_warmup_epochs: float = opt(0, "linear warm-up from lr/P to lr (DGC)", minimum=0.0)
    max_steps_per_epoch: int | None = opt(None, "cap the steps of an epoch (smoke runs)", minimum=1)
    amp: str = opt("off", "mixed precision: forward and loss under autocast in bf16, or in fp16 "
                   "with a loss scaler (GradScaler; needs nonfinite skip: an overflow step is "
                   "skipped and the scale backs off)", choices=("off", "bf16", "fp16"))


@dataclass
class CompressionConfig:
    compression: str = opt("rsdgc", "compressor (allreduce strategy)", choices=_compression_choices)
    density: float = opt(0.001, "fraction of each compressed tensor sent per step", 0.0, 1.0)
    beta: float = opt(0.5, "RS-DGC: NSI = beta*mean|v| + (1-beta)*std(v)", 0.0, 1.0)
    radius: int = opt(1, "RS-DGC: Chebyshev radius of the tiles of linear/1x1 layers", minimum=0)
    neighbourhood: bool = opt(True, "RS-DGC: score neighbourhoods (False: single elements)")
    dynamic: bool = opt(True, "RS-DGC: layer-wise dynamic density")
    update_every: int = opt(100, "RS-DGC: steps between density updates", minimum=1)
    density_floor: float = opt(0.1, "RS-DGC: no layer below density_floor*density", 0.0, 1.0)
    selection: str = opt("topk", "RS-DGC: exact top-k or DGC's sampled threshold",
                         choices=("topk", "sampled"))
    compression_warmup_epochs: int = opt(0, "DGC warm-up densities over the first epochs "
                                         "(0.25, 0.0625, 0.015625, 0.004: at most 4)",
                                         minimum=0, maximum=4)
    warmup_ramp_steps: int = opt(0, "DGC/RS-DGC: warm-up as a per-step ramp 0.25^(1+4t/T) over "
                                 "T steps (instead of compression_warmup_epochs)", minimum=0)
    fp16_values: bool = opt(False, "send values as fp16")
    int8_values: bool = opt(False, "rsdgc/dgc/topk/threshold: send each unit's values as int8 with a "
                            "bfloat16 scale (S + 2 bytes per unit)")
    min_numel: int = opt(1024, "smaller tensors (and 1-D ones) are sent dense", minimum=0)
    exclude: list = opt([], "fnmatch patterns of parameter names kept dense", kind="strs")
    error_feedback: bool | None = opt(None, "keep what is not sent (default: the compressor's)")
    qsgd_levels: int = opt(1, "QSGD quantisation levels", minimum=1)
    qsgd_bucket: int = opt(512, "QSGD bucket size", minimum=1)
    clip_norm: float | None = opt(None, "DGC local gradient clipping threshold", minimum=0.0)
    lgc_warmup_steps: int = opt(200, "LGC: stage-1 steps", minimum=0)
    lgc_ae_steps: int = opt(300, "LGC: stage-2 (autoencoder training) steps", minimum=1)
    lgc_innovation_density: float | None = opt(None, "LGC-PS: side-information density",
                                               0.0, 1.0)
    nonfinite: str = opt("raise", "non-finite gradient: stop with an error, or skip the step",
                         choices=("raise", "skip"))
    communicator: str | None = opt(None, "rsdgc/dgc/topk: sparse collective (default allgather; "
                                   "reduce_scatter: flat in P, docs/COLLECTIVES.md)",
                                   choices=("allgather", "reduce_scatter", "auto"))
    kernels: str | None = opt(None, "rsdgc/dgc/topk: auto (default: fused C loops on CPU where "
                              "a compiler exists), native, eager; rsdgc also compiled "
                              "(torch.compile'd NSI); grouped (whole-group "
                              "tensor ops, meant for GPUs; algorithms/grouped.py)",
                              choices=("auto", "native", "eager", "compiled", "grouped"))
    compression_options: dict = opt({}, "further keyword options for the compressor class, "
                                        "e.g. {rank: 4}", kind="dict")


@dataclass
class DecentralConfig:
    algorithm: str = opt("horovod", "training strategy: allreduce with a compressor (horovod) "
                                    "or decentralized gossip over MPI", choices=("horovod", "rdpsgd", "dpsgd"))
    backend: str = opt("horovod", "allreduce backend: Horovod (horovodrun) or PyTorch DDP with "
                                  "the compressor as its comm hook (torchrun)", choices=("horovod", "ddp"))
    sparsity_ratio: float = opt(0.1, "RD-PSGD: fraction of parameters mixed per round", 0.0, 1.0)
    topology: str = opt("ring", "RD-PSGD mixing topology", choices=("ring",))
    sync_every: int = opt(1, "RD-PSGD: steps between mixing rounds", minimum=1)
    send_indices: bool = opt(False, "RD-PSGD: send the 8-bit gap index stream")
    rd_timeout: float = opt(120, "RD-PSGD: seconds before a silent neighbour aborts the job",
                            positive=True)


@dataclass
class RunConfig:
    seed: int = opt(0, "seed of data order, augmentation, model init and compressors",
                    0, 2 ** 63 - 1)
    out_dir: str = opt("runs", "parent of run directories")
    run_name: str | None = opt(None, "run directory name (default: <compression>-<model>-<time>)")
    keep_checkpoints: int = opt(2, "checkpoints kept (oldest deleted)", minimum=1)
    progress: bool = opt(True, "progress bar on rank 0")
    stop_after: int | None = opt(None, "stop after this many epochs in this invocation", minimum=1)
    bn_batches: int | None = opt(None, "training batches per rank that re-estimate BatchNorm "
                                       "statistics before the model is evaluated and saved "
                                       "(0: running statistics; default 4 for rdpsgd/dpsgd, whose "
                                       "average model has none of its own, else 0)", minimum=0)
    device: str = opt("auto", "auto (cuda:<local rank> when available), cpu, cuda")
    deterministic: bool = opt(False, "bit-reproducible runs: Horovod allreduces fixed 8 MiB "
                                     "gradient groups (HOROVOD_DISABLE_GROUP_FUSION) instead of "
                                     "whatever its fusion buffer holds, and torch uses "
                                     "deterministic kernels")


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "compression": CompressionConfig,
            "decentral": DecentralConfig, "run": RunConfig}
TITLES = {"data": "data", "optim": "model / optimisation", "compression": "compression",
          "decentral": "strategy / decentralized", "run": "run"}


def _fields():
    for sec, cls in SECTIONS.items():
        for f in fields(cls):
            yield sec, f


KEYS = {f.name: (sec, f) for sec, f in _fields()}
# keys are flat (--name, YAML, checkpoints): a name in two sections would shadow one of them
assert len(KEYS) == sum(1 for _ in _fields()), "a config key is declared in two sections"


def _choices(f):
    c = f.metadata.get("choices")
    return c() if callable(c) else c


def _type_name(f) -> str:
    kind = f.metadata.get("kind")
    if kind:
        return {"floats": "list of floats", "strs": "list of strings", "dict": "mapping"}[kind]
    t = str(f.type).replace("typing.", "")
    return t.replace(" | None", " or none")


def coerce(key: str, value: Any, where: str = "command line"):
    """``value`` (a string from the command line, or what YAML produced) -> the key's type."""
    if key not in KEYS:
        raise ValueError(f"unknown config key {key!r} in {where}; known: {sorted(KEYS)}")
    _, f = KEYS[key]
    t = str(f.type)
    kind = f.metadata.get("kind")
    optional = "None" in t

    def bad(why):
        return ValueError(f"{key}: {why}, got {value!r} (in {where})")

    # a free-form name or path (str, no choices) keeps "none": `--run_name none` names a run
    # "none" (the time-to-accuracy benchmark's dense run) instead of a timestamped one
    nones = _NONE if kind or f.metadata.get("choices") or "str" not in t else ("null", "~", "")
    if isinstance(value, str) and value.strip().lower() in nones and (optional or kind):
        if optional:
            return None
    if value is None:
        if optional:
            return None
        raise bad("a value is required")
    if kind in ("floats", "strs"):
        if isinstance(value, str):
            import yaml
            s = value.strip()
            value = yaml.safe_load(s) if s.startswith("[") else [v for v in s.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if kind == "strs":
            return [str(v).strip() for v in value]
        out = []
        for v in value:
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise bad("expected a list of numbers") from None
            if isinstance(v, bool) or math.isnan(x):
                raise bad("expected a list of numbers")
            out.append(x)
        return out
    if kind == "dict":
        if isinstance(value, str):
            import yaml
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise bad("expected a mapping, e.g. {rank: 4}")
        return dict(value)
    if t.startswith("bool"):
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("true", "yes", "on", "1"):
            return True
        if s in ("false", "no", "off", "0"):
            return False
        raise bad("expected true or false")
    if t.startswith("int"):
        if isinstance(value, bool):
            raise bad("expected an integer")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise bad("expected an integer") from None
    if t.startswith("float"):
        if isinstance(value, bool):
            raise bad("expected a number")
        try:
            x = float(str(value).strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise bad("expected a number") from None
        if math.isnan(x) or math.isinf(x):
            raise bad("expected a finite number")
        return x
    return str(value)


def _check(key: str, value, where: str) -> None:
    _, f = KEYS[key]
    if value is None:
        return
    md = f.metadata
    choices = _choices(f)
    if choices and value not in choices and not (key == "model" and str(value).startswith("tv_")):
        raise ValueError(f"{key} must be one of {tuple(choices)}, got {value!r} (in {where})")
    lo, hi = md.get("min"), md.get("max")
    for v in (value if md.get("kind") == "floats" else [value]):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        what = f"{key} (every element)" if md.get("kind") == "floats" else key
        if lo is not None and v < lo:
            raise ValueError(f"{what} must be >= {lo}, got {value!r} (in {where})")
        if hi is not None and v > hi:
            raise ValueError(f"{what} must be <= {hi}, got {value!r} (in {where})")
        if md.get("positive") and v <= 0:
            raise ValueError(f"{what} must be > 0, got {value!r} (in {where})")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    decentral: DecentralConfig = field(default_factory=DecentralConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # -- flat view (files, command line, checkpoints) ---------------------------------------
    @classmethod
    def from_flat(cls, flat: dict, where: str = "config") -> "Config":
        cfg = cls()
        cfg.update(flat, where)
        return cfg

    def update(self, flat: dict, where: str, validate: bool = True) -> "Config":
        """Each key typed and range-checked, naming it and ``where``; then, with ``validate``,
        the checks across keys (off while more sources are still to come: a file's ``amp:
        fp16`` with ``--nonfinite skip`` on the command line is one valid config)."""
        unknown = sorted(set(flat) - set(KEYS))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown} in {where}; known: {sorted(KEYS)}")
        for k, v in flat.items():
            v = coerce(k, v, where)
            _check(k, v, where)
            sec, _ = KEYS[k]
            setattr(getattr(self, sec), k, v)
        if validate:
            self.validate(where)
        return self

    def to_flat(self) -> dict:
        out = {}
        for sec in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, sec)))
        return out

    def get(self, key: str):
        return getattr(getattr(self, KEYS[key][0]), key)

    def validate(self, where: str = "config") -> None:
        """Checks across keys."""
        c, o = self.compression, self.optim
        if c.compression in ("rsdgc", "dgc", "topk", "randomk") and not 0 < c.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {c.density!r} (in {where})")
        if not o.lr > 0:
            raise ValueError(f"lr must be > 0, got {o.lr!r} (in {where})")
        if not 0 < self.data.train_ratio < 1:
            raise ValueError(f"train_ratio must be in (0, 1), got {self.data.train_ratio!r} (in {where})")
        if not o.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {o.momentum!r} (in {where})")
        if o.amp == "fp16" and self.decentral.algorithm != "horovod":
            raise ValueError(f"amp fp16 (a loss scaler) goes with algorithm horovod (allreduce), "
                             f"not {self.decentral.algorithm!r}; bf16 needs no scaler (in {where})")
        if o.amp == "fp16" and c.nonfinite != "skip":
            raise ValueError("amp fp16 needs nonfinite skip: the loss scaler's overflow steps give "
                             f"inf / NaN gradients, which nonfinite raise stops the job at (in {where})")
        if self.decentral.backend == "ddp" and self.decentral.algorithm != "horovod":
            raise ValueError(f"backend ddp goes with algorithm horovod (allreduce), not "
                             f"{self.decentral.algorithm!r} (in {where})")


def load_config(path: str | None, overrides: dict | None = None) -> Config:
    """Defaults <- YAML file <- command-line overrides (already ``--key value`` pairs)."""
    import os

    import yaml
    cfg, sources = Config(), []
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of key: value")
        cfg.update(data, f"config file {path}", validate=False)
        sources.append(f"config file {path}")
    if overrides:
        cfg.update(overrides, "command line", validate=False)
        sources.append("command line")
    cfg.validate(" + ".join(sources) or "defaults")       # once, on the config as it ends up
    return cfg


def parse_overrides(items: list[str]) -> dict:
    """``["--lr", "1e-3", "--fp16_values=true"]`` -> ``{"lr": "1e-3", ...}`` (strings; typed
    by :func:`coerce`). Unknown keys are refused here, naming them."""
    out, i = {}, 0
    while i < len(items):
        tok = items[i]
        if not tok.startswith("--"):
            raise ValueError(f"unexpected argument {tok!r} (overrides are --key value)")
        key = tok[2:].replace("-", "_")
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(items):
                raise ValueError(f"--{key} needs a value")
            val = items[i + 1]
            i += 2
        if key not in KEYS:
            raise ValueError(f"unknown option --{key}; see --help for the keys")
        out[key] = val
    return out


def help_text() -> str:
    lines = ["config keys (set in the --config YAML file or as --key value):"]
    for sec, cls in SECTIONS.items():
        lines.append(f"\n  [{TITLES[sec]}]")
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            choices = _choices(f)
            extra = f"; one of: {', '.join(map(str, choices))}" if choices else ""
            lines.append(f"  --{f.name} ({_type_name(f)}, default {default!r}){extra}")
            lines.append(f"        {f.metadata['help']}")
    return "\n".join(lines)
