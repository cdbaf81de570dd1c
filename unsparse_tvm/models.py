"""Built-in PyTorch models and loading of user models saved with `torch.export.save` (.pt2).

Weights are random (seeded): no pretrained weights can be downloaded here, and speed does not depend on
them. `load_program(name_or_path)` is the one entry point the rest of the flow uses.
"""

from __future__ import annotations

import logging
import os
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


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smallcnn": BuiltinModel(SmallCNN, (1, 8, 8)),
    "vgg16-cifar": BuiltinModel(VGG16CIFAR, (3, 32, 32)),
    "vgg16": BuiltinModel(VGG16, (3, 224, 224)),
    "resnet18": BuiltinModel(lambda: ResNet(BasicBlock, [2, 2, 2, 2]), (3, 224, 224)),
    "resnet50": BuiltinModel(lambda: ResNet(Bottleneck, [3, 4, 6, 3]), (3, 224, 224)),
}


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


def export(model: nn.Module, input_shape: tuple[int, ...]) -> torch.export.ExportedProgram:
    """torch.export with a static input shape (the compiled module is specialised to it)."""
    with torch.no_grad():
        return torch.export.export(model.eval(), (example_input(input_shape),))


def load_pt2(path: str) -> torch.export.ExportedProgram:
    if not os.path.exists(path):
        raise UnsparseError(f"no such file: {path}")
    if not path.endswith(".pt2"):
        raise UnsparseError(f"{path} is not a .pt2 file: save models with torch.export.save(ep, 'model.pt2')")
    logger = logging.getLogger("torch.export")  # it logs a whole traceback before raising: ours is one line
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        return torch.export.load(path)
    except Exception as err:  # torch raises many kinds for a bad archive
        raise UnsparseError(f"{path} could not be read as a torch.export program ({type(err).__name__})") from None
    finally:
        logger.setLevel(level)


def _user_input_vals(ep: torch.export.ExportedProgram) -> list:
    vals = []
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in ep.graph_signature.user_inputs:
            val = node.meta.get("val")
            if val is None or not hasattr(val, "shape"):
                raise UnsparseError("the .pt2 program has a non-tensor input; only single-tensor CNNs are supported")
            vals.append(val)
    if len(vals) != 1:
        raise UnsparseError(f"the .pt2 program has {len(vals)} inputs; unsparse-tvm supports models with one input")
    return vals


def dynamic_dims(ep: torch.export.ExportedProgram) -> list[int]:
    """Axes of the input exported as dynamic (torch.export.Dim)."""
    return [i for i, d in enumerate(_user_input_vals(ep)[0].shape) if not isinstance(d, int)]


SUPPORTED_DTYPES = ("float32",)


def check_dtypes(ep: torch.export.ExportedProgram) -> None:
    """Refuse programs whose input, weights or outputs are floats other than float32, naming the first."""
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    nodes = [n for n in ep.graph.nodes if n.op == "placeholder"] + [
        a for a in _flatten(out_node.args[0]) if isinstance(a, torch.fx.Node)]
    for node in nodes:
        val = node.meta.get("val")
        dtype = getattr(val, "dtype", None)
        if dtype is not None and dtype.is_floating_point and dtype != torch.float32:
            raise UnsparseError(f"the program uses {str(dtype).removeprefix('torch.')} ({node.name}); unsparse-tvm "
                                f"compiles float32 programs only: export model.float() instead")


def _flatten(v) -> list:
    if isinstance(v, (list, tuple)):
        return [x for item in v for x in _flatten(item)]
    return [v]


def program_outputs(ep: torch.export.ExportedProgram) -> list[dict]:
    """{"name", "shape", "dtype"} of every output of the program, flattened in order."""
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    outs = []
    for i, a in enumerate(_flatten(out_node.args[0])):
        val = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
        if val is None or not hasattr(val, "shape"):
            continue
        outs.append({"name": f"out{i}", "shape": [int(d) for d in val.shape],
                     "dtype": str(val.dtype).removeprefix("torch.")})
    return outs


def program_input_shape(ep: torch.export.ExportedProgram) -> tuple[int, ...]:
    """The shape of the program's single tensor input (a dynamic dimension: its example size)."""
    return tuple(int(d) for d in _user_input_vals(ep)[0].shape)


def check_batch(batch: int | None) -> int | None:
    if batch is not None and batch < 1:
        raise UnsparseError(f"--batch must be at least 1, got {batch}")
    return batch


def load_program(model: str, batch: int | None = None, log=print) -> torch.export.ExportedProgram:
    """A built-in name (exported at the given batch size, default 1) or a .pt2 path, as an ExportedProgram
    with static shapes and float32 values (a dynamic batch is specialised, and `log` says so)."""
    check_batch(batch)
    if model in BUILTIN_MODELS:
        return export(build_model(model), (batch or 1, *BUILTIN_MODELS[model].input_shape))
    if model.endswith(".pt2") or os.path.sep in model or os.path.exists(model):
        ep = load_pt2(model)
        check_dtypes(ep)
        dyn = dynamic_dims(ep)
        if dyn:
            shape = list(program_input_shape(ep))
            if batch is not None and 0 in dyn:
                shape[0] = batch
            with torch.no_grad():
                ep = torch.export.export(ep.module(), (torch.randn(*shape),))
            log(f"note: {model} has a dynamic input (axes {', '.join(map(str, dyn))}); compiled for the static "
                f"shape {shape}" + (" (--batch N picks another batch)" if 0 in dyn and batch is None else ""))
        return ep
    raise UnsparseError(f"unknown model '{model}': use one of {', '.join(BUILTIN_MODELS)} or a .pt2 file")
