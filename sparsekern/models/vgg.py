"""A VGG-11-style network with BatchNorm for 28-32 px images."""
from __future__ import annotations

from torch import Tensor, nn

VGG11 = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512]


class VGG(nn.Module):
    def __init__(self, config, num_classes: int, in_channels: int):
        super().__init__()
        layers, channels = [], in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 512), nn.ReLU(),
                                        nn.Linear(512, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def vgg11(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(VGG11, num_classes, in_channels)
