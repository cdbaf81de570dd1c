"""Networks nobody on the project wrote, as MODEL names: `tv:NAME[@SIZE]` (torchvision) and
`timm:NAME[@SIZE]` (timm), random weights, square input SIZE (default 224; 299 for inception_v3).

torchvision is an optional (test) dependency. The registry's torchvision wheels are CUDA builds: next to
the CPU torch their `_C` extension does not load, and `import torchvision` then dies in two modules that
register meta/autograd kernels for torchvision's own C++ ops (nms, roi_align, ...), which no model
definition uses. `import_torchvision` stands empty modules in for those two and imports the rest as is,
so `torchvision.models` works; torchvision.ops' C++ kernels stay unavailable (detection models need them).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

import torch
import torch.nn as nn

from .errors import UnsparseError

# The modules that need torchvision's C++ ops at import time; nothing in torchvision.models imports them.
_REGISTRATION_MODULES = ("torchvision._meta_registrations", "torchvision._autograd_registrations")
PREFIXES = ("tv:", "timm:")


def import_torchvision() -> types.ModuleType:
    """`import torchvision`, also where its C++ extension does not match the installed (CPU) torch."""
    try:
        return importlib.import_module("torchvision")
    except ImportError:
        raise UnsparseError("tv: models need torchvision: pip install torchvision "
                            "(the version made for your torch, e.g. 0.28.0 for torch 2.13)") from None
    except RuntimeError:  # 'operator torchvision::nms does not exist': the C++ extension did not load
        pass
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # drop the half-imported package before the second try
    for name in _REGISTRATION_MODULES:
        sys.modules[name] = types.ModuleType(name)
    return importlib.import_module("torchvision")


def is_zoo_name(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIXES)


def parse(name: str) -> tuple[str, str, int]:
    """'tv:mobilenet_v2@128' -> ('tv', 'mobilenet_v2', 128)."""
    lib, _, rest = name.partition(":")
    arch, _, size = rest.partition("@")
    if not arch:
        raise UnsparseError(f"model '{name}': write {lib}:ARCH or {lib}:ARCH@SIZE (e.g. tv:resnet50@224)")
    if size:
        if not size.isdigit() or not 16 <= int(size) <= 2048:
            raise UnsparseError(f"model '{name}': the size after @ must be an integer in [16, 2048]")
        return lib, arch, int(size)
    return lib, arch, 299 if arch == "inception_v3" else 224


def _torchvision_factory(arch: str):
    models = import_torchvision().models
    available = models.list_models(module=models)  # classification models only (not detection/segmentation)
    available += models.list_models(module=models.segmentation)
    if arch not in available:
        for kind in ("detection", "video", "optical_flow", "quantization"):  # torchvision has it, we do not take it
            if arch in models.list_models(module=getattr(models, kind, None)):
                raise UnsparseError(f"tv:{arch} is a torchvision {kind.replace('_', ' ')} model; unsparse-tvm takes "
                                    "classification and segmentation models (one image batch in, one tensor out)")
        raise UnsparseError(f"torchvision has no model '{arch}' (e.g. resnet50, mobilenet_v2, efficientnet_b0)")
    kwargs: dict[str, Any] = {"weights": None}
    if arch in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)  # aux heads are training-only outputs
    if arch in models.list_models(module=models.segmentation):
        kwargs["weights_backbone"] = None  # the default would download ImageNet weights
    return lambda: _single_output(models.get_model(arch, **kwargs))


def _timm_factory(arch: str):
    try:
        import timm
    except ImportError:
        raise UnsparseError("timm: models need timm (pip install timm)") from None
    except RuntimeError:  # timm imports torchvision, which may need the same way round as above
        import_torchvision()
        import timm
    if not timm.list_models(arch):
        raise UnsparseError(f"timm has no model '{arch}'")
    return lambda: timm.create_model(arch, pretrained=False)


class MainOutput(nn.Module):
    """Segmentation models return {'out': ..., 'aux': ...}; the flow takes one output, so keep 'out'."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y["out"] if isinstance(y, dict) else y


def _single_output(model: nn.Module) -> nn.Module:
    if type(model).__module__.startswith("torchvision.models.segmentation"):
        return MainOutput(model)
    return model


def lookup(name: str):
    """The BuiltinModel for a zoo name, or None when `name` is not one (imports the library lazily)."""
    if not is_zoo_name(name):
        return None
    from .models import BuiltinModel  # deferred: models imports this module

    lib, arch, size = parse(name)
    factory = _torchvision_factory(arch) if lib == "tv" else _timm_factory(arch)
    return BuiltinModel(factory, (3, size, size))
