from __future__ import annotations

from torch import Tensor

from .attribution import InputAttribution, gradient_renderings
from .base import ForwardPass, MethodOutput, scale_to_unit


class Saliency(InputAttribution):
    """Vanilla gradient (Simonyan et al. 2014): d score / d input. The map is Simonyan's, max over colour
    channels of |gradient|; stored beside it are the raw signed gradient (``gradient``, 3×H×W) and its
    usual renderings (``color``, ``gray``, ``positive``, ``negative``: see ``gradient_renderings``).
    Cost: the shared forward plus one backward per target (× N passes with SmoothGrad)."""

    name = "saliency"

    def __init__(self, score: str = "logit", smooth: int = 0, noise: float = 0.15):
        super().__init__(smooth=smooth, noise=noise)
        self.score = score

    def params(self) -> dict:
        return {"score": self.score, **super().params()}

    def attribute(self, fp: ForwardPass) -> Tensor:
        return fp.gradients("input", self.score)  # B×K×3×H×W

    def render(self, attribution: Tensor) -> MethodOutput:
        simonyan = attribution.abs().amax(dim=2)
        return MethodOutput(maps=scale_to_unit(simonyan),
                            arrays={"gradient": attribution, **gradient_renderings(attribution)},
                            attribution="gradient")
