from __future__ import annotations

from .base import ForwardPass, Method, MethodOutput, cam_to_maps, scale_to_unit
from .guided_backprop import guided_gradients


class GuidedGradCAM(Method):
    """Guided Grad-CAM (Selvaraju et al. 2017, captum's ``GuidedGradCam``): the Grad-CAM map (ReLU,
    scaled to [0, 1], bilinearly upsampled) times the guided-backprop gradient, colour channel by
    colour channel. The product is stored as ``guided_gradcam`` (3×H×W); the map is max over channels
    of its magnitude. Cost: Grad-CAM's (shared layer backward) plus Guided Backprop's (shared)."""

    name = "guided_gradcam"
    needs = frozenset({"layer"})

    def __init__(self, score: str = "logit"):
        self.score = score

    def params(self) -> dict:
        return {"score": self.score}

    def explain(self, fp: ForwardPass) -> MethodOutput:
        grads = fp.gradients("layer", self.score)  # B×K×C×h×w
        weights = grads.mean(dim=(-2, -1), keepdim=True)
        cam = (weights * fp.layer_output.detach().float().unsqueeze(1)).sum(dim=2)
        product = cam_to_maps(cam, fp.input_size).unsqueeze(2) * guided_gradients(fp, self.score)  # B×K×3×H×W
        return MethodOutput(maps=scale_to_unit(product.abs().amax(dim=2)), arrays={"guided_gradcam": product},
                            attribution="guided_gradcam")
