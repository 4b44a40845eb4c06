from __future__ import annotations

import torch

from .base import ForwardPass, Method, MethodOutput, cam_output


class XGradCAM(Method):
    """XGrad-CAM (Fu et al. 2020): channel weight = sum over pixels of gradient x activation, divided
    by the channel's activation sum (weight 0 for a channel whose activations sum to 0).
    Cost: the shared forward plus one backward to the layer per target (shared by all CAM methods)."""

    name = "xgradcam"
    needs = frozenset({"layer"})

    def explain(self, fp: ForwardPass) -> MethodOutput:
        grads = fp.gradients("layer")  # B×K×C×h×w
        acts = fp.layer_output.detach().float().unsqueeze(1)  # B×1×C×h×w
        total = acts.sum(dim=(-2, -1), keepdim=True)
        weighted = (grads * acts).sum(dim=(-2, -1), keepdim=True)
        weights = torch.where(total != 0, weighted / torch.where(total != 0, total, 1.0), 0.0)
        cam = (weights * acts).sum(dim=2)
        return cam_output(cam, fp.input_size)
