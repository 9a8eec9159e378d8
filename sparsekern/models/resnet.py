"""ResNets: CIFAR-style ResNet-18 / ResNet-32 (3x3 stem, no max-pool) and ImageNet-style ResNet-50."""
from __future__ import annotations

from typing import List, Type

from torch import Tensor, nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = _shortcut(in_planes, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out)).relu()
        return (self.bn3(self.conv3(out)) + self.shortcut(x)).relu()


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class ResNet(nn.Module):
    def __init__(self, block: Type[nn.Module], blocks_per_stage: List[int], widths: List[int], num_classes: int,
                 in_channels: int, imagenet_stem: bool):
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(widths[0]), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, in_planes = [], widths[0]
        for stage, (n_blocks, width) in enumerate(zip(blocks_per_stage, widths)):
            for i in range(n_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(block(in_planes, width, stride))
                in_planes = width * block.expansion
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """CIFAR-size ResNet-18 (He et al. 2016 with a 3x3 stem), 11M parameters at the standard ``width`` 64; its
    four stages have width, 2x, 4x and 8x that many channels. Any image size: three stride-2 stages, then global
    average pooling (Fashion-MNIST's 28 px end at 4 px, 32 px at 4 px, 14 px at 2 px)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width], num_classes, in_channels,
                  imagenet_stem=False)


def resnet32(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """The CIFAR ResNet-32 of the DST literature (three stages of 5 basic blocks, widths 16/32/64)."""
    return ResNet(BasicBlock, [5, 5, 5], [16, 32, 64], num_classes, in_channels, imagenet_stem=False)


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """ImageNet ResNet-50 (7x7 stem, bottlenecks), 25M parameters."""
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, in_channels, imagenet_stem=True)
