from __future__ import annotations

from .base import ForwardPass, Method, MethodOutput, cam_output


class LayerCAM(Method):
    """Layer-CAM (Jiang et al. 2021): ReLU(gradient) x activation summed over channels, pixel by pixel.
    Cost: the shared forward plus one backward to the layer per target (shared by all CAM methods)."""

    name = "layercam"
    needs = frozenset({"layer"})

    def explain(self, fp: ForwardPass) -> MethodOutput:
        grads = fp.gradients("layer")  # B×K×C×h×w
        cam = (grads.clamp_min(0) * fp.layer_output.detach().float().unsqueeze(1)).sum(dim=2)
        return cam_output(cam, fp.input_size)
