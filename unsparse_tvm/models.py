"""Built-in PyTorch models (smallcnn, vgg16-cifar, vgg16, resnet18, resnet50) and their export.

Weights are random (seeded): no pretrained weights can be downloaded here, and speed does not depend on
them. Loading any model (built-in or .pt2) is `unsparse_tvm.frontend`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .errors import UnsparseError

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class SmallCNN(nn.Module):
    """Three 3x3 convs and two linear layers for 8x8 single-channel input (sklearn's digits)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(inplace=True),   # [N,16,8,8]
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(inplace=True),  # [N,32,8,8]
            nn.MaxPool2d(2),                                         # [N,32,4,4]
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),  # [N,64,4,4]
            nn.MaxPool2d(2),                                         # [N,64,2,2]
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * 2 * 2, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _vgg_features(batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers.append(nn.Conv2d(c_in, v, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            c_in = v
    return nn.Sequential(*layers)


class VGG16CIFAR(nn.Module):
    """VGG-16 with batch norm for 32x32 input, the usual CIFAR-10 variant (512-512-10 classifier)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = _vgg_features(batch_norm=True)  # [N,512,1,1]
        self.classifier = nn.Sequential(
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Linear(512, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class VGG16(nn.Module):
    """torchvision's VGG-16 (no batch norm) for 224x224 input, without dropout (inference only)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.features = _vgg_features(batch_norm=False)  # [N,512,7,7]
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(c_in, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # torchvision v1.5: stride on 3x3
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(c_in, planes * 4, stride) if (stride != 1 or c_in != planes * 4) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


class ResNet(nn.Module):
    """torchvision's ResNet layout (7x7 stem, 4 stages, global pool, fc) for 224x224 input."""

    def __init__(self, block: type, layers: list[int], num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)  # [N,64,112,112]
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)                 # [N,64,56,56]
        c_in, stages = 64, []
        for i, (planes, n) in enumerate(zip([64, 128, 256, 512], layers)):
            blocks = []
            for b in range(n):
                stride = 2 if (i > 0 and b == 0) else 1
                blocks.append(block(c_in, planes, stride))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@dataclass(frozen=True)
class BuiltinModel:
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # per-sample shape, without the batch dimension


def _zoo():
    """unsparse_tvm.zoo, imported on first use: the GPU kit ships this file alone (no package, built-in
    names only), so it must not import other project modules at load time."""
    return importlib.import_module(f"{__package__}.zoo")


class _Models(dict):
    """The built-in names, plus torchvision/timm names (`tv:resnet50@128`, see zoo.py) resolved on first
    use, so every command that takes a built-in name (prune, compile, bench, tune) takes those too."""

    def __missing__(self, name: str) -> BuiltinModel:
        entry = _zoo().lookup(name)
        if entry is None:
            raise KeyError(name)
        self[name] = entry
        return entry

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or (isinstance(name, str) and _zoo().is_zoo_name(name)
                                                 and self[name] is not None)


BUILTIN_MODELS: dict[str, BuiltinModel] = _Models({
    "smallcnn": BuiltinModel(SmallCNN, (1, 8, 8)),
    "vgg16-cifar": BuiltinModel(VGG16CIFAR, (3, 32, 32)),
    "vgg16": BuiltinModel(VGG16, (3, 224, 224)),
    "resnet18": BuiltinModel(lambda: ResNet(BasicBlock, [2, 2, 2, 2]), (3, 224, 224)),
    "resnet50": BuiltinModel(lambda: ResNet(Bottleneck, [3, 4, 6, 3]), (3, 224, 224)),
})


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A built-in model in eval mode, with seeded random weights (and non-trivial BN statistics)."""
    if name not in BUILTIN_MODELS:
        raise UnsparseError(f"unknown model '{name}': use one of {', '.join(BUILTIN_MODELS)} or a .pt2 file")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BUILTIN_MODELS[name].factory()
    for m in model.modules():  # random BN statistics, so BN folding is really exercised
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def example_input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def export_program(model: nn.Module, input_shape: tuple[int, ...]) -> torch.export.ExportedProgram:
    """torch.export with a static input shape (the compiled module is specialised to it)."""
    with torch.no_grad():
        return torch.export.export(model.eval(), (example_input(input_shape),))
