"""Models written in the project (torchvision does not import beside CPU torch).

``build_model(name, num_classes, image_size)``: resnet20 / resnet56 / resnet110 (CIFAR-style,
He et al. 2016), vgg19 (VGG-19 with BatchNorm, classifier adapted to the input size), ccrnet and
exvit (HSI + LiDAR patch classifiers for houston, ``multimodal.py``), hsicnn (any multi-band
per-pixel patches: indianpines, houston; ``spectral.py``), and,
where torchvision imports, ``tv_<name>`` for any torchvision classification model.
"""
from .multimodal import CCRNet, ExViT, ccrnet, exvit
from .spectral import HSICNN, hsicnn
from .resnet_cifar import ResNetCIFAR, resnet20, resnet56, resnet110
from .vgg import VGG, vgg19

_BUILTIN = {"resnet20": resnet20, "resnet56": resnet56, "resnet110": resnet110, "vgg19": vgg19}
_MULTIMODAL = {"ccrnet": ccrnet, "exvit": exvit}          # HSI + LiDAR patches (houston)
_SPECTRAL = {"hsicnn": hsicnn}                             # any multi-band pixel patches
MODELS = tuple(_BUILTIN) + tuple(_MULTIMODAL) + tuple(_SPECTRAL)


def build_model(name: str, num_classes: int, image_size: int = 256, hsi_bands: int | None = None,
                in_channels: int | None = None):
    """``hsi_bands``: given by the HSI + LiDAR data set (houston: hsi_bands + 1 channels);
    ``in_channels``: given by a multi-band data set without LiDAR (indianpines). ccrnet / exvit
    need houston; hsicnn takes either; the RGB models take neither."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if name in _SPECTRAL:
        if hsi_bands is None and in_channels is None:
            raise ValueError(f"model {name!r} classifies multi-band pixel patches: use dataset "
                             "indianpines or houston")
        chans = in_channels if in_channels is not None else hsi_bands + 1
        return _SPECTRAL[name](num_classes=num_classes, image_size=image_size, in_channels=chans)
    if name in _MULTIMODAL:
        if hsi_bands is None:
            raise ValueError(f"model {name!r} classifies HSI + LiDAR patches: use dataset houston")
        return _MULTIMODAL[name](num_classes=num_classes, image_size=image_size, hsi_bands=hsi_bands)
    if hsi_bands is not None or in_channels is not None:
        fits = sorted(_MULTIMODAL) + sorted(_SPECTRAL) if hsi_bands is not None else sorted(_SPECTRAL)
        raise ValueError(f"model {name!r} takes RGB images; this multi-band data set needs one of {fits}")
    if name in _BUILTIN:
        return _BUILTIN[name](num_classes=num_classes, image_size=image_size)
    if name.startswith("tv_"):
        try:
            import torchvision.models as tvm
        except Exception as e:      # noqa: BLE001 - torchvision fails in several ways on CPU torch
            raise ValueError(f"model {name!r} needs torchvision, which does not import here: {e}") from None
        return getattr(tvm, name[3:])(num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; choose from {sorted(_BUILTIN)} or tv_<torchvision name>")


__all__ = ["build_model", "MODELS", "ResNetCIFAR", "VGG", "CCRNet", "ExViT", "HSICNN", "hsicnn", "resnet20", "resnet56",
           "resnet110", "vgg19", "ccrnet", "exvit"]
