"""Inference copies of a model with each batch normalisation folded into the convolution before it.

In eval mode a BatchNorm2d is a per-channel affine map: folded into the preceding convolution's weights
and bias it costs nothing, where unfolded it reads and writes every activation once more (37 % of
mobilenet_v3_small's CPU forward, 8-15 % of resnet18's). The explainer runs every pass, the gradient
ones included, through the folded copy, keeping its target layer as built; the model itself is never
changed, so the sanity check's randomisation works on the layers as built and the next copy follows it.
"""

from __future__ import annotations

import copy
import weakref
from typing import cast

import torch
from torch import fx, nn

_cache: weakref.WeakKeyDictionary[nn.Module, dict[frozenset[str], tuple[tuple, nn.Module | None]]] = \
    weakref.WeakKeyDictionary()


class _LeafTracer(fx.Tracer):
    """Keeps every convolution and batch norm a single node, subclasses too (timm's Conv2dSame and
    BatchNormAct2d), so that a conv feeding a batch norm shows as two adjacent module calls."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualified_name)


def for_plain_passes(module: nn.Module, device: torch.device, dtype: torch.dtype,
                     keep: frozenset[str] = frozenset()) -> nn.Module:
    """The model to run forwards through on ``device`` in ``dtype``: the folded copy (``keep``: module
    paths whose output must stay as built, e.g. a hooked layer), except
    under CUDA half-precision autocast, where an H200 ran it 5-15 % slower than the model itself (cuDNN
    fuses its bf16 batch norms well; the folded biases cost more), while on a CPU it gains 3-6 % and
    in CUDA float32 0-14 % (bench/methods.py)."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return module
    return folded(module, keep)


def folded(module: nn.Module, keep: frozenset[str] = frozenset()) -> nn.Module:
    """``module`` with its conv→batch-norm pairs folded (a copy, cached while ``module``'s tensors stay
    the same), or ``module`` itself where nothing can be folded or it cannot be traced. A pair with a
    module named in ``keep`` stays unfolded (folding would change a kept convolution's output)."""
    key = tuple((t.data_ptr(), t._version) for t in module.state_dict().values())
    copies = _cache.setdefault(module, {})
    hit = copies.get(keep)
    if hit is not None and hit[0] == key:
        return module if hit[1] is None else hit[1]
    result = _fold_copy(module, keep)
    copies[keep] = (key, None if result is module else result)  # no strong reference to the weak key
    return result


def _fold_copy(module: nn.Module, keep: frozenset[str]) -> nn.Module:
    if module.training or isinstance(module, torch.jit.ScriptModule):
        return module
    try:
        graph = _LeafTracer().trace(module)
    except Exception:  # data-dependent control flow and the like: run it as it is
        return module
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node in graph.nodes:
        src = node.args[0] if node.op == "call_module" and len(node.args) == 1 and not node.kwargs else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv_name, norm_name = str(src.target), str(node.target)  # call_module targets are module paths
        if calls[conv_name] != 1 or calls[norm_name] != 1:  # a module called twice is shared
            continue
        if conv_name in keep or norm_name in keep:
            continue
        conv, norm = module.get_submodule(conv_name), module.get_submodule(norm_name)
        if isinstance(conv, nn.Conv2d) and _foldable(norm) and norm.num_features == conv.out_channels:
            pairs.append((conv_name, norm_name))
    if not pairs:
        return module
    copied = copy.deepcopy(module)
    with torch.no_grad():
        for conv_name, norm_name in pairs:
            conv, norm = copied.get_submodule(conv_name), copied.get_submodule(norm_name)
            # what the pairing above checked, for the type checker
            assert isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
            assert norm.running_var is not None and norm.running_mean is not None
            scale = torch.rsqrt(norm.running_var + norm.eps)
            shift = -norm.running_mean * scale
            if norm.affine:
                scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
            bias = shift if conv.bias is None else conv.bias * scale + shift
            conv.weight.mul_(scale.to(conv.weight.dtype).view(-1, *[1] * (conv.weight.dim() - 1)))
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
            parent, _, name = norm_name.rpartition(".")
            setattr(copied.get_submodule(parent), name, _after_norm(norm))
    return copied


def _foldable(norm: nn.Module) -> bool:
    """An eval-mode batch norm with running statistics: plain, or timm's BatchNormAct2d."""
    if not isinstance(norm, nn.BatchNorm2d) or norm.training or norm.running_var is None:
        return False
    return type(norm) is nn.BatchNorm2d or _is_timm_norm_act(norm)


def _is_timm_norm_act(norm: nn.Module) -> bool:
    # timm's BatchNormAct2d: batch norm, then ``drop``, then ``act``
    return type(norm).__name__ == "BatchNormAct2d" and hasattr(norm, "drop") and hasattr(norm, "act")


def _after_norm(norm: nn.Module) -> nn.Module:
    """What remains of ``norm`` once its affine map is in the convolution."""
    if _is_timm_norm_act(norm):
        return nn.Sequential(cast(nn.Module, norm.drop), cast(nn.Module, norm.act))
    return nn.Identity()
