from __future__ import annotations

from .base import ForwardPass, Method, MethodOutput, cam_output


class HiResCAM(Method):
    """HiResCAM (Draelos & Carin 2020): gradient x activation summed over channels, pixel by pixel
    (no spatial averaging of the gradient, so the map reflects the locations the score used).
    Cost: the shared forward plus one backward to the layer per target (shared by all CAM methods)."""

    name = "hirescam"
    needs = frozenset({"layer"})

    def explain(self, fp: ForwardPass) -> MethodOutput:
        grads = fp.gradients("layer")  # B×K×C×h×w
        cam = (grads * fp.layer_output.detach().float().unsqueeze(1)).sum(dim=2)
        return cam_output(cam, fp.input_size)
