"""A layer's output in, its B×C×h×w feature map out: how each candidate target layer lays out its
activations (channel-first maps, channel-last maps, token sequences), which layers are candidates, and
which one is the default.

Layout rules, decided once per layer on a probe forward at the model's input size:
- 4-D ``B×C×h×w`` (convolutions): ``nchw``, used as it is.
- 4-D ``B×h×w×C`` (Swin blocks, ConvNeXt's inner LayerNorm/Linear): ``nhwc`` when dims 1 and 2 are
  equal and dim 3 differs; an output whose three dims are all equal is taken as ``nchw``.
- 3-D ``B×(R+N)×C`` (ViT, DeiT, BEiT, EVA blocks): ``tokens`` when N = g² with g ≥ 2 after R prefix
  tokens (class, distillation, register tokens). R is the model's ``num_prefix_tokens`` (timm), 1 for a
  torchvision ViT (its class token), otherwise the smallest R that leaves a square. The g×g patch tokens,
  in row-major order, become the map; the prefix tokens pass through untouched.
The network goes on with a tensor rebuilt from the map, so gradients with respect to the map are the
gradients of the patch tokens (as pytorch-grad-cam's ``reshape_transform``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
KINDS = ("nchw", "nhwc", "tokens")


@dataclass(frozen=True)
class Layout:
    kind: str = "nchw"
    prefix_tokens: int = 0  # tokens only: class/distillation/register tokens before the patch grid

    def to_map(self, out: Tensor) -> Tensor:
        """The layer's output as a B×C×h×w view of it (still in the graph)."""
        if self.kind == "nchw":
            return out
        if self.kind == "nhwc":
            return out.permute(0, 3, 1, 2)
        b, t, c = out.shape
        side = math.isqrt(t - self.prefix_tokens)
        return out[:, self.prefix_tokens:].reshape(b, side, side, c).permute(0, 3, 1, 2)

    def from_map(self, fmap: Tensor, out: Tensor) -> Tensor:
        """What the network continues with: ``out`` rebuilt from ``fmap`` (a copy, so a later in-place op
        cannot overwrite the activations the methods read)."""
        if self.kind == "nchw":
            return fmap.clone()
        if self.kind == "nhwc":
            return fmap.permute(0, 2, 3, 1).clone()
        patches = fmap.flatten(2).transpose(1, 2)
        return torch.cat([out[:, :self.prefix_tokens], patches], dim=1)

    def params(self) -> dict:
        if self.kind == "tokens":
            return {"kind": self.kind, "prefix_tokens": self.prefix_tokens}
        return {"kind": self.kind}


def _square_side(n: int) -> int | None:
    side = math.isqrt(max(n, 0))
    return side if side >= 2 and side * side == n else None


def prefix_tokens(module: nn.Module) -> int | None:
    """The model's own count of tokens before the patch grid, when it declares one."""
    declared = getattr(module, "num_prefix_tokens", None)
    if isinstance(declared, int):
        return declared
    if isinstance(getattr(module, "class_token", None), torch.Tensor):  # torchvision's VisionTransformer
        return 1
    return None


def layout_of(out: Tensor, declared_prefix: int | None) -> Layout | None:
    """The layout of one probe output (batch of 1), or None when it is no spatial map or token grid."""
    if out.dim() == 4:
        _, a, b, c = out.shape
        if a == b and c != a:
            return Layout("nhwc") if a * b > 1 else None
        return Layout("nchw") if b * c > 1 else None
    if out.dim() == 3:
        t = out.shape[1]
        if declared_prefix is not None and _square_side(t - declared_prefix):
            return Layout("tokens", declared_prefix)
        for r in range(min(t - 4, 32) + 1):
            if _square_side(t - r):
                return Layout("tokens", r)
    return None


@dataclass
class LayerSurvey:
    """Every module's probe output, in the order modules finish: candidates and their layouts."""

    layouts: dict[str, Layout]  # candidate layers in finishing order
    shapes: dict[str, tuple[int, ...]]  # every module that returned a tensor, for error messages
    norms: set[str]  # candidates that are normalisation layers
    output: object = None  # what the module returned for the probe (a classifier's 1×N logits)

    @property
    def candidates(self) -> list[str]:
        return list(self.layouts)

    def default(self) -> str | None:
        """The last candidate; for a token model, the first normalisation of the last block (the last
        layer whose patch tokens still reach a class-token head, as pytorch-grad-cam advises)."""
        if not self.layouts:
            return None
        last = self.candidates[-1]
        if self.layouts[last].kind != "tokens":
            return last
        token_norms = [n for n in self.candidates if n in self.norms and self.layouts[n].kind == "tokens"]
        by_block: dict[str, list[str]] = {}
        for name in token_norms:
            by_block.setdefault(name.rpartition(".")[0], []).append(name)
        blocks = [norms for norms in by_block.values() if len(norms) >= 2]
        if blocks:
            last_block = max(blocks, key=lambda norms: token_norms.index(norms[-1]))
            return last_block[0]
        return last


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def survey_layers(module: nn.Module, input_size: int) -> LayerSurvey:
    """Dotted paths of modules whose output is a spatial map or a token grid, in the order they finish,
    leaving out pooling layers and containers whose output is a pooling layer's output."""
    names = {m: n for n, m in module.named_modules() if n}
    declared = prefix_tokens(module)
    finished: list[tuple[str, Layout | None]] = []
    shapes: dict[str, tuple[int, ...]] = {}
    pooled: set[int] = set()
    alive: list[Tensor] = []  # ids are only unique while the tensors live

    def hook(mod, _inp, out):
        if not isinstance(out, Tensor) or mod not in names:
            return
        alive.append(out)
        if isinstance(mod, _POOLING):
            pooled.add(id(out))
        shapes[names[mod]] = tuple(out.shape)
        finished.append((names[mod], None if id(out) in pooled else layout_of(out, declared)))

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            output = module(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
    ordered: dict[str, Layout | None] = {}
    for name, layout in finished:  # a module called twice keeps its last position
        ordered.pop(name, None)
        ordered[name] = layout
    layouts = {n: layout for n, layout in ordered.items() if layout is not None}
    norms = {n for n in layouts if _is_norm(module.get_submodule(n))}
    return LayerSurvey(layouts=layouts, shapes=shapes, norms=norms, output=output)
