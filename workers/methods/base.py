"""The one interface every explanation method implements, and the forward pass they share."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ForwardPass:
    """One forward of a batch, shared by all methods and all target classes of each image.

    Shapes: ``x`` B×3×H×W, ``logits`` B×N, ``activations`` B×C×h×w (the target layer's output, still
    in the graph; ``layer`` and ``activations`` are None when no layer is hooked, e.g. a TorchScript
    model), ``targets`` B×K class ids. ``x`` = (pixels in [0, 1] − ``mean``) / ``std`` per channel.
    """

    model: nn.Module
    layer: nn.Module | None
    x: Tensor
    logits: Tensor
    activations: Tensor | None
    targets: Tensor
    autocast: Callable[[], contextlib.AbstractContextManager]
    _grads: dict[tuple[str, str], Tensor] = field(default_factory=dict)
    _memo: dict[tuple, Tensor] = field(default_factory=dict)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.x.shape[-2], self.x.shape[-1]

    @property
    def layer_output(self) -> Tensor:
        """``activations``, for the methods that read the layer; raises when no layer is hooked."""
        if self.activations is None:
            raise ValueError("this method reads a layer's activations: this model has no hooked layer")
        return self.activations

    def class_scores(self, score: str = "logit") -> Tensor:
        """B×K score of each target class: its pre-softmax logit, or its softmax probability."""
        if score == "probability":
            return self.logits.float().softmax(dim=1).gather(1, self.targets)
        if score == "logit":
            return self.logits.gather(1, self.targets).float()
        raise ValueError(f"score must be 'logit' or 'probability', not {score!r}")

    def gradients(self, wrt: str, score: str = "logit") -> Tensor:
        """d score[target] / d (``"layer"`` activations or ``"input"``), B×K×(shape of that tensor).

        One backward per target column reuses this forward; images in a batch are independent
        (eval mode), so the gradient of the batch sum is each image's own gradient. When the input takes a
        gradient (a method reads it) and a layer is hooked, each backward gives both: Grad-CAM and saliency
        together cost one backward per target, not two.
        """
        if (wrt, score) not in self._grads:
            if wrt not in ("layer", "input"):
                raise KeyError(wrt)
            both = self.x.requires_grad and self.activations is not None
            names = ["layer", "input"] if both else [wrt]
            tensors = [self.layer_output if name == "layer" else self.x for name in names]
            scores = self.class_scores(score)
            grads = [torch.autograd.grad(scores[:, k].sum(), tensors, retain_graph=True)
                     for k in range(self.targets.shape[1])]
            for i, name in enumerate(names):
                self._grads[(name, score)] = torch.stack([g[i] for g in grads], dim=1).float()
        return self._grads[(wrt, score)]

    def memo(self, key: tuple, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()`` once per forward pass, shared by every method asking with the same ``key``
        (e.g. guided-backprop gradients, read by Guided Backprop and Guided Grad-CAM)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]


@dataclass
class MethodOutput:
    """``maps``: B×K×H×W in [0, 1] at the model's input size (rendered as the overlay).
    ``arrays``: further named B×K×... tensors (e.g. the raw gradient).

    What a result shard keeps instead of ``maps`` (readers derive the rest, storage/maps.py):
    ``layer_maps`` (CAM family): B×K×h×w in [0, 1] at the layer's size, of which ``maps`` is the bilinear
    upsampling; ``attribution`` (input-gradient methods): the name in ``arrays`` of the signed B×K×3×H×W
    attribution that ``maps`` is ``scale_to_unit`` of the ``reduce`` ("max" or "sum") over channels of
    its magnitude. With neither, the shard keeps ``maps`` and ``arrays`` as they are."""

    maps: Tensor
    arrays: dict[str, Tensor] = field(default_factory=dict)
    layer_maps: Tensor | None = None
    attribution: str | None = None
    reduce: str = "max"


class Method(ABC):
    name: ClassVar[str]
    # Which gradients of the shared forward pass the method reads: a subset of {"layer", "input"}.
    needs: ClassVar[frozenset[str]] = frozenset()
    # True when the method must watch the network run as Python code (e.g. to change how its ReLUs
    # backpropagate): a TorchScript model is then refused before any image.
    python_model_only: ClassVar[bool] = False

    def params(self) -> dict:
        """Settings that change the result; they become part of the result's identity."""
        return {}

    @abstractmethod
    def explain(self, fp: ForwardPass) -> MethodOutput: ...


def scale_to_unit(maps: Tensor) -> Tensor:
    """Min-max each map (over its last two dims) to [0, 1]; a constant map becomes zeros, never NaN."""
    flat = maps.flatten(-2)
    lo = flat.min(-1, keepdim=True).values
    span = flat.max(-1, keepdim=True).values - lo
    scaled = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return scaled.view_as(maps)


def cam_to_unit(cam: Tensor) -> Tensor:
    """B×K×h×w class activation map -> ReLU, scaled to [0, 1], at the layer's size."""
    return scale_to_unit(F.relu(cam.float()))


def upsample_maps(unit: Tensor, size: tuple[int, int]) -> Tensor:
    """B×K×h×w maps in [0, 1] bilinearly upsampled to ``size`` (the map a CAM method returns)."""
    b, k = unit.shape[:2]
    up = F.interpolate(unit.reshape(b * k, 1, *unit.shape[-2:]), size=size, mode="bilinear", align_corners=False)
    return up.view(b, k, *size).clamp_(0, 1)


def cam_to_maps(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """B×K×h×w class activation map -> ReLU, scaled to [0, 1], bilinearly upsampled to ``size``."""
    return upsample_maps(cam_to_unit(cam), size)


def cam_output(cam: Tensor, size: tuple[int, int]) -> MethodOutput:
    """A CAM method's result: its maps at ``size`` and, for the shard, the same maps at the layer's size."""
    unit = cam_to_unit(cam)
    return MethodOutput(maps=upsample_maps(unit, size), layer_maps=unit)


def compute_dtype(autocast: Callable[[], contextlib.AbstractContextManager], x: Tensor) -> torch.dtype:
    """The dtype the model computes in on ``x``: the autocast one if ``autocast`` enables it, else x's."""
    with autocast():
        return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
