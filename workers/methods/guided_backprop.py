from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .attribution import InputAttribution, forward_again, smoothgrad
from .base import ForwardPass, MethodOutput, scale_to_unit


class _GuidedRectifier(torch.autograd.Function):
    """max(0, x), or min(max(0, x), upper), whose backward passes a gradient only where the input was
    inside the open interval (0, upper) *and* the incoming gradient is positive (Springenberg et al.)."""

    @staticmethod
    def forward(ctx, x: Tensor, upper: float | None, inplace: bool) -> Tensor:
        passing = x > 0 if upper is None else (x > 0) & (x < upper)
        ctx.save_for_backward(passing)
        if inplace:
            # The network may hold on to x and ignore the returned tensor (``x.relu_(); return x``).
            ctx.mark_dirty(x)
            return x.clamp_(0, upper)
        return x.clamp(0, upper)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (passing,) = ctx.saved_tensors
        return grad.clamp_min(0) * passing, None, None


_RELU = {F.relu, torch.relu, Tensor.relu}
_RELU_INPLACE = {torch.relu_, Tensor.relu_}
_HARDTANH = {F.hardtanh, F.hardtanh_}


def _as_rectifier(func, args: tuple, kwargs: dict) -> tuple[float | None, bool] | None:
    """``(upper clip, in place)`` when ``func(*args, **kwargs)`` computes max(0, x) or
    min(max(0, x), upper) (ReLU, ReLU6, Hardtanh with a lower bound of 0), else None."""
    if not args or not isinstance(args[0], Tensor):
        return None
    if func in _RELU:
        return None, bool(kwargs.get("inplace", False))
    if func in _RELU_INPLACE:
        return None, True
    if func is F.relu6:
        return 6.0, bool(kwargs.get("inplace", False))
    if func in _HARDTANH:
        bound = {"min_val": -1.0, "max_val": 1.0, "inplace": func is F.hardtanh_}
        bound.update(zip(("min_val", "max_val", "inplace"), args[1:]))
        bound.update(kwargs)
        if bound["min_val"] == 0:
            return float(bound["max_val"]), bool(bound["inplace"])
    return None


class _GuidedMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.rectifiers = 0  # calls guided so far

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rectifier = _as_rectifier(func, args, kwargs)
        if rectifier is None:
            return func(*args, **kwargs)
        self.rectifiers += 1
        return _GuidedRectifier.apply(args[0], *rectifier)


@contextlib.contextmanager
def guided_rectifiers() -> Iterator[_GuidedMode]:
    """Within this context, every ReLU / ReLU6 / Hardtanh(0, u) evaluated on this thread backpropagates
    by the guided rule, however the network calls it: ``nn.ReLU``/``nn.ReLU6`` modules (reused or
    in place), ``F.relu``, ``torch.relu``, ``x.relu_()``, ``F.relu6``, ``F.hardtanh``.

    A torch-function mode intercepts the calls, so no module or library attribute is patched and
    nothing needs restoring besides the mode itself, which Python pops on exit even after an error.
    Other activations (SiLU, Hardswish, GELU, LeakyReLU, a clamp written by hand) keep their plain
    gradient. Yields the mode; its ``rectifiers`` counts the calls it guided.
    """
    with _GuidedMode() as mode:
        yield mode


def guided_gradients(fp: ForwardPass, score: str = "logit") -> Tensor:
    """B×K×3×H×W guided-backpropagation gradient of each target's score w.r.t. the input.

    Runs its own forward (the shared one's graph uses plain ReLU gradients) and one backward per
    target column; computed once per forward pass and shared between the methods that use it.
    """
    _require_python(fp.model)

    def compute() -> Tensor:
        with guided_rectifiers() as mode:
            guided = forward_again(fp, fp.x, fp.targets)
        _warn_if_unguided(mode, fp.model)
        return guided.gradients("input", score)

    return fp.memo(("guided", score), compute)


def _require_python(model: torch.nn.Module) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        # Compiled graphs call their rectifiers without Python: the result would silently be the plain gradient.
        raise TypeError("guided backpropagation needs the model as Python code, not TorchScript "
                        "(load it with --model ARCH --weights FILE)")


def _warn_if_unguided(mode: _GuidedMode, model: torch.nn.Module) -> None:
    if not mode.rectifiers:
        warnings.warn(f"{type(model).__name__} calls no ReLU/ReLU6: its guided backpropagation is "
                      "the plain gradient", stacklevel=3)


class GuidedBackprop(InputAttribution):
    """Guided Backpropagation (Springenberg et al. 2015): the input gradient with every rectifier's
    backward replaced by the guided rule (see ``guided_rectifiers``); the map is max over colour
    channels of its magnitude, the signed gradient is stored as ``gradient`` (3×H×W). With ``smooth``
    N > 0, SmoothGrad: the mean guided gradient over N noisy copies (see ``smoothgrad``).
    Cost: one forward of its own plus one backward to the input per target (shared with Guided
    Grad-CAM); with SmoothGrad, N such forwards and N × K backwards per image instead."""

    name = "guided_backprop"
    needs = frozenset()  # its own forward: the shared one backpropagates through plain ReLUs
    python_model_only = True

    def __init__(self, score: str = "logit", smooth: int = 0, noise: float = 0.15):
        super().__init__(smooth=smooth, noise=noise)
        self.score = score

    def params(self) -> dict:
        return {"score": self.score, **super().params()}

    def attribute(self, fp: ForwardPass) -> Tensor:
        return guided_gradients(fp, self.score)  # B×K×3×H×W

    def explain(self, fp: ForwardPass) -> MethodOutput:
        if not self.smooth:
            return super().explain(fp)
        _require_python(fp.model)
        # The noisy copies' forwards run guided, so their plain input gradients are already the guided
        # ones: one forward per pass of copies, where ``attribute`` would add a second.
        with guided_rectifiers() as mode:
            smoothed = smoothgrad(lambda copies: copies.gradients("input", self.score), fp, self.smooth, self.noise)
        _warn_if_unguided(mode, fp.model)
        return self.render(smoothed)

    def render(self, attribution: Tensor) -> MethodOutput:
        return MethodOutput(maps=scale_to_unit(attribution.abs().amax(dim=2)), arrays={"gradient": attribution},
                            attribution="gradient")
