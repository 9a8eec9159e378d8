"""Model definitions for the training CLI, built from plain nn.Conv2d / nn.Linear (torchvision-free),
so that ``sparsekern.sparsify`` can turn them sparse."""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

from .resnet import resnet18, resnet32, resnet50
from .vgg import vgg11

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18, "resnet32": resnet32, "resnet50": resnet50, "vgg11": vgg11,
}


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)
