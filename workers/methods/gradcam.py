from __future__ import annotations

from .base import ForwardPass, Method, MethodOutput, cam_output


class GradCAM(Method):
    """Grad-CAM (Selvaraju et al. 2017): channels weighted by their spatially averaged gradient."""

    name = "gradcam"
    needs = frozenset({"layer"})

    def explain(self, fp: ForwardPass) -> MethodOutput:
        grads = fp.gradients("layer")  # B×K×C×h×w
        weights = grads.mean(dim=(-2, -1), keepdim=True)
        cam = (weights * fp.layer_output.detach().float().unsqueeze(1)).sum(dim=2)
        return cam_output(cam, fp.input_size)
