"""Models written in the project (torchvision does not import beside CPU torch).

``build_model(name, num_classes, image_size)``: resnet20 / resnet56 / resnet110 (CIFAR-style,
He et al. 2016), vgg19 (VGG-19 with BatchNorm, classifier adapted to the input size), and,
where torchvision imports, ``tv_<name>`` for any torchvision classification model.
"""
from .resnet_cifar import ResNetCIFAR, resnet20, resnet56, resnet110
from .vgg import VGG, vgg19

_BUILTIN = {"resnet20": resnet20, "resnet56": resnet56, "resnet110": resnet110, "vgg19": vgg19}
MODELS = tuple(_BUILTIN)


def build_model(name: str, num_classes: int, image_size: int = 256):
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if name in _BUILTIN:
        return _BUILTIN[name](num_classes=num_classes, image_size=image_size)
    if name.startswith("tv_"):
        try:
            import torchvision.models as tvm
        except Exception as e:      # noqa: BLE001 - torchvision fails in several ways on CPU torch
            raise ValueError(f"model {name!r} needs torchvision, which does not import here: {e}") from None
        return getattr(tvm, name[3:])(num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; choose from {sorted(_BUILTIN)} or tv_<torchvision name>")


__all__ = ["build_model", "MODELS", "ResNetCIFAR", "VGG", "resnet20", "resnet56", "resnet110", "vgg19"]
