from __future__ import annotations

from .base import ForwardPass, Method, MethodOutput, scale_to_unit


class Saliency(Method):
    """Vanilla gradient (Simonyan et al. 2014): the map is max over colour channels of |d score / d input|;
    the raw signed gradient is kept beside it."""

    name = "saliency"
    needs = frozenset({"input"})

    def __init__(self, score: str = "logit"):
        self.score = score

    def params(self) -> dict:
        return {"score": self.score}

    def explain(self, fp: ForwardPass) -> MethodOutput:
        grads = fp.gradients("input", self.score)  # B×K×3×H×W
        simonyan = grads.abs().amax(dim=2)
        return MethodOutput(maps=scale_to_unit(simonyan), arrays={"gradient": grads})
