"""Batch of model inputs in, per-method maps for each image's target classes out."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .folding import for_plain_passes
from .methods import Method, MethodOutput
from .methods.base import ForwardPass
from .models import LoadedModel
from .runtime import keep_freed_memory
from .targets import Targets

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class BatchResult:
    probs: Tensor  # B×N float32, softmax of the clean image
    targets: Tensor  # B×K
    outputs: dict[str, MethodOutput]
    seconds: dict[str, float]  # per method, for the whole batch (forward shared out evenly)


class Explainer:
    def __init__(self, model: LoadedModel, layer: str | None, methods: list[Method], targets: Targets,
                 device: str = "auto", precision: str = "fp32"):
        """``layer`` None: no layer is hooked (only input-gradient methods can run, e.g. on TorchScript)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        self.model = model
        self.layer_name = layer or "input"
        self.layout = model.layout(layer)  # how the layer's output becomes B×C×h×w; recorded with each result
        self.methods = methods
        self.targets = targets
        self.device = resolve_device(device)
        self.precision = precision
        # Every pass runs with the batch norms folded into their convolutions where that is faster (workers/
        # folding.py): the same function, its gradients included; the hooked layer's output stays as built.
        module = for_plain_passes(model.module, self.device, PRECISIONS[precision] or torch.float32,
                                  keep=frozenset([layer] if layer else []))
        self.module = module.to(self.device)
        self.layer = self.module.get_submodule(layer) if layer else None
        # NHWC convolutions: 15-20 % less CPU time per image in fp32 (resnet18/50, EfficientNet-Lite0,
        # measured), and what bf16/fp16 kernels want on CPU and GPU alike.
        nhwc = not model.scripted and (self.device.type == "cpu" or precision != "fp32")
        self.memory_format = torch.channels_last if nhwc else torch.contiguous_format
        self.module.to(memory_format=self.memory_format)
        if self.device.type == "cpu":
            keep_freed_memory()
        n = len(model.class_names)
        bad = [c for c in targets.classes if not 0 <= c < n]
        if bad:
            raise ValueError(f"class ids {bad} outside 0..{n - 1}")
        if targets.topk and not targets.classes and targets.topk > n:
            raise ValueError(f"--topk {targets.topk} but the model has {n} classes")

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _forward(self, x: Tensor, labels: Tensor | None = None) -> tuple[ForwardPass, Tensor]:
        captured: list[Tensor] = []

        def keep(_mod, _inp, out):
            if torch.is_grad_enabled() and not out.requires_grad:
                # Frozen weights and an input without gradient leave the layer out of the graph: start it here.
                out.requires_grad_(True)
            fmap = self.layout.to_map(out)  # B×C×h×w (workers/layouts.py)
            captured.append(fmap)
            # The network goes on with a copy rebuilt from the map: gradients then reach the map itself, and a
            # later in-place op (DenseNet's relu_) cannot overwrite the activations the methods read.
            return self.layout.from_map(fmap, out)

        if self.device.type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
            x = x.pin_memory()  # page-locked: the copy below then runs without blocking the host
        # detach: on the same device .to() returns the caller's tensor, whose flags are not ours to change
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        x = x.detach().requires_grad_(any("input" in m.needs for m in self.methods))
        needs_graph = any(m.needs for m in self.methods)
        handle = self.layer.register_forward_hook(keep) if self.layer is not None else None
        try:
            with torch.set_grad_enabled(needs_graph), self.autocast():
                logits = self.module(x)
        finally:
            if handle is not None:
                handle.remove()
        probs = logits.detach().float().softmax(dim=1)
        return ForwardPass(
            model=self.module, layer=self.layer, x=x, logits=logits,
            activations=captured[-1] if self.layer is not None else None, targets=self.targets.select(probs, labels),
            autocast=self.autocast, mean=self.model.mean, std=self.model.std,
        ), probs

    def explain(self, x: Tensor, labels: Tensor | None = None) -> BatchResult:
        """``labels``: each image's ground-truth class id, explained too when the targets say ``label``."""
        t0 = time.perf_counter()
        fp, probs = self._forward(x, labels)
        shared = (time.perf_counter() - t0) / max(len(self.methods), 1)
        outputs, seconds = {}, {}
        for method in self.methods:
            t = time.perf_counter()
            outputs[method.name] = method.explain(fp)
            seconds[method.name] = shared + time.perf_counter() - t
        return BatchResult(probs=probs, targets=fp.targets, outputs=outputs, seconds=seconds)
