"""Methods that attribute a class score to input pixels, and SmoothGrad over any of them.

Such a method is split in two: ``attribute`` gives a signed B×K×3×H×W tensor in the model's input
space, ``render`` turns it into maps and stored arrays. SmoothGrad (Smilkov et al. 2017) sits between
the two: it averages the attribution of N noisy copies of each image and renders the average once.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from typing import Callable

import torch
from torch import Tensor

from .base import ForwardPass, Method, MethodOutput

# Extra passes (noisy copies, integration points) hold the engine's batch size of inputs, which the
# user sized to fit the device, but at least this many, so a batch of one still fills an accelerator.
MIN_ROWS_PER_PASS = 16
NOISE_SEED = 0


def rows_per_pass(batch: int) -> int:
    return max(batch, MIN_ROWS_PER_PASS)


def forward_again(fp: ForwardPass, x: Tensor, targets: Tensor) -> ForwardPass:
    """The same model on other inputs ``x`` R×3×H×W with ``targets`` R×K, its graph kept for input
    gradients. The target layer is not hooked, so ``activations`` is None: only for input gradients."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), fp.autocast():
        logits = fp.model(x)
    return dataclasses.replace(fp, x=x, logits=logits, activations=None, targets=targets, _grads={}, _memo={})


def smoothgrad_noise(n: int, x: Tensor) -> Tensor:
    """N×3×H×W standard normal noise from a fixed seed, moved to ``x``'s device: every image of every batch
    gets the same N patterns, so a result depends neither on the run, nor on the image's batch mates, nor
    on the device (CPU and CUDA generators draw different numbers from one seed, so it is drawn on the CPU)."""
    generator = torch.Generator().manual_seed(NOISE_SEED)
    noise = torch.randn((n, *x.shape[1:]), generator=generator, dtype=torch.float32)
    return noise.to(x.device, x.dtype)


def smoothgrad(attribute: Callable[[ForwardPass], Tensor], fp: ForwardPass, n: int, noise: float) -> Tensor:
    """Mean of ``attribute`` over N copies of each image, copy i being x + noise·(max(x) − min(x))·ε_i
    with ε_i from ``smoothgrad_noise`` (max and min over that image's whole input tensor). B×K×3×H×W.

    The copies of all B images go through the model together, as many copies per pass as
    ``rows_per_pass`` allows; noisy passes are not hooked.
    """
    x = fp.x.detach()
    b = x.shape[0]
    sigma = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))  # B
    eps = smoothgrad_noise(n, x)
    copies_per_pass = max(1, rows_per_pass(b) // b)
    total: Tensor | None = None
    for start in range(0, n, copies_per_pass):
        e = eps[start:start + copies_per_pass]  # m×3×H×W
        noisy = (x.unsqueeze(0) + e.unsqueeze(1) * sigma.view(1, b, 1, 1, 1)).flatten(0, 1)  # (m·B)×3×H×W
        part = attribute(forward_again(fp, noisy, fp.targets.repeat(len(e), 1)))
        part = part.unflatten(0, (len(e), b)).sum(dim=0)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("SmoothGrad needs at least one noisy copy")
    return total / n


class InputAttribution(Method):
    """A method whose result is an attribution over input pixels; ``smooth`` > 0 applies SmoothGrad
    with ``smooth`` noisy copies at noise level ``noise`` (fraction of the input's value range)."""

    needs = frozenset({"input"})

    def __init__(self, smooth: int = 0, noise: float = 0.15):
        if smooth < 0 or noise < 0:
            raise ValueError(f"SmoothGrad needs smooth >= 0 and noise >= 0, not {smooth} and {noise}")
        self.smooth = smooth
        self.noise = noise
        if smooth:
            # The shared pass's input gradient is not read, so the engine need not keep its graph.
            self.needs = frozenset()  # type: ignore[misc]  # this instance's, not the class's

    def params(self) -> dict:
        # Only when on, so results made without SmoothGrad keep their identity.
        return {"smooth": self.smooth, "noise": self.noise} if self.smooth else {}

    @abstractmethod
    def attribute(self, fp: ForwardPass) -> Tensor:
        """B×K×3×H×W signed attribution of each target's score to each input value."""

    @abstractmethod
    def render(self, attribution: Tensor) -> MethodOutput:
        """Maps (B×K×H×W in [0, 1]) and stored arrays from a B×K×3×H×W attribution."""

    def explain(self, fp: ForwardPass) -> MethodOutput:
        if self.smooth:
            return self.render(smoothgrad(self.attribute, fp, self.smooth, self.noise))
        return self.render(self.attribute(fp))


def _unit_by_max(maps: Tensor) -> Tensor:
    """Non-negative B×K×H×W maps divided by their own maximum (zero stays zero); all-zero stays zero."""
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), 0.0)


def gradient_renderings(grads: Tensor) -> dict[str, Tensor]:
    """The usual pictures of a B×K×3×H×W input gradient g, each per image and target:

    ``color`` 3×H×W: g min-max scaled over all three channels to [0, 1] (0 gradient is mid-grey only
    when g is symmetric); ``gray`` H×W: Σ_c |g_c| / its max; ``positive`` H×W: Σ_c max(g_c, 0) / its
    max; ``negative`` H×W: Σ_c max(−g_c, 0) / its max. Pixels with no gradient are 0 in the last three.
    """
    flat = grads.flatten(-3)
    lo = flat.amin(-1, keepdim=True)
    span = flat.amax(-1, keepdim=True) - lo
    color = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return {
        "color": color.view_as(grads),
        "gray": _unit_by_max(grads.abs().sum(dim=2)),
        "positive": _unit_by_max(grads.clamp_min(0).sum(dim=2)),
        "negative": _unit_by_max((-grads).clamp_min(0).sum(dim=2)),
    }
