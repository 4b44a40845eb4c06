from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur

from .attribution import InputAttribution, forward_again, rows_per_pass
from .base import ForwardPass, MethodOutput, scale_to_unit

BASELINES = ("black", "blurred")
# Blurred baseline: Gaussian σ as a fraction of the input's shorter side (14 px at 224), enough to
# wash out object-scale detail.
BLUR_SIGMA_FRACTION = 1 / 16


def gauss_legendre(steps: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Nodes α in (0, 1) and weights (summing to 1) of ``steps``-point Gauss–Legendre quadrature on
    [0, 1]: captum's default ``method="gausslegendre"``, computed the same way."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    alphas = torch.tensor(0.5 * (nodes + 1), dtype=dtype, device=device)
    return alphas, torch.tensor(0.5 * weights, dtype=dtype, device=device)


def baseline_input(x: Tensor, kind: str, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """B×3×H×W baseline in the model's (normalised) input space for inputs ``x`` B×3×H×W.

    ``black``: an all-black image, i.e. pixel value 0 normalised, (0 − mean) / std per channel; not
    zero in normalised space, which is the dataset-mean grey. ``blurred``: x under a Gaussian blur.
    """
    if kind == "black":
        black = -torch.tensor(mean, device=x.device) / torch.tensor(std, device=x.device)
        return black.view(1, 3, 1, 1).expand_as(x)
    if kind == "blurred":
        sigma = BLUR_SIGMA_FRACTION * min(x.shape[-2:])
        radius = min(int(np.ceil(3 * sigma)), min(x.shape[-2:]) - 1)  # reflect padding needs pad < side
        return gaussian_blur(x, kernel_size=[2 * radius + 1] * 2, sigma=[sigma, sigma])
    raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, not {kind!r}")


class IntegratedGradients(InputAttribution):
    """Integrated Gradients (Sundararajan et al. 2017): (x − x′) ⊙ ∫₀¹ ∇score(x′ + α(x − x′)) dα with
    baseline x′ black or blurred, the integral by ``steps``-point Gauss–Legendre quadrature (as captum
    by default). Attributions sum to about score(x) − score(x′) (completeness). The map is
    Σ over colour channels of |attribution|, min-max scaled; the raw attribution is stored (3×H×W).
    Cost: ``steps`` forwards and ``steps`` × K backwards per image, in passes of whole steps."""

    name = "integrated_gradients"
    needs = frozenset()  # its own passes along the path: the shared pass's gradients are never read

    def __init__(self, score: str = "logit", steps: int = 32, baseline: str = "black", smooth: int = 0,
                 noise: float = 0.15):
        super().__init__(smooth=smooth, noise=noise)
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, not {baseline!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, not {steps}")
        self.score = score
        self.steps = steps
        self.baseline = baseline

    def params(self) -> dict:
        return {"score": self.score, "steps": self.steps, "baseline": self.baseline, **super().params()}

    def attribute(self, fp: ForwardPass) -> Tensor:
        x = fp.x.detach()
        base = baseline_input(x, self.baseline, fp.mean, fp.std)
        alphas, weights = gauss_legendre(self.steps, x.device, x.dtype)
        b = x.shape[0]
        steps_per_pass = max(1, rows_per_pass(b) // b)
        integral: Tensor | None = None  # B×K×3×H×W, Σ_s w_s ∇score(point_s)
        for start in range(0, self.steps, steps_per_pass):
            a = alphas[start:start + steps_per_pass]
            w = weights[start:start + steps_per_pass]
            points = (base.unsqueeze(0) + a.view(-1, 1, 1, 1, 1) * (x - base).unsqueeze(0)).flatten(0, 1)
            grads = forward_again(fp, points, fp.targets.repeat(len(a), 1)).gradients("input", self.score)
            part = (grads.unflatten(0, (len(a), b)) * w.view(-1, 1, 1, 1, 1, 1)).sum(dim=0)
            integral = part if integral is None else integral + part
        if integral is None:
            raise ValueError("Integrated Gradients needs at least one step")
        return (x - base).unsqueeze(1) * integral

    def render(self, attribution: Tensor) -> MethodOutput:
        return MethodOutput(maps=scale_to_unit(attribution.abs().sum(dim=2)), arrays={"attribution": attribution},
                            attribution="attribution", reduce="sum")
