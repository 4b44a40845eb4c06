from __future__ import annotations

import torch
from torch import Tensor

from .base import ForwardPass, Method, MethodOutput, cam_to_unit, upsample_maps


def first_principal_component(acts: Tensor) -> Tensor:
    """B×C×h×w activations -> B×h×w projection of each pixel's (channel-centred) activation vector
    onto the image's first principal direction, as pytorch-grad-cam's ``get_2d_projection``.

    An SVD gives that direction only up to sign (pytorch-grad-cam keeps whatever LAPACK returns).
    We fix it: the direction whose channel loadings sum to a positive number, which is the same as
    the projection correlating positively with the summed activation of all channels.
    """
    b, c = acts.shape[:2]
    pixels = acts.float().nan_to_num(0.0).reshape(b, c, -1).transpose(1, 2)  # B×hw×C
    centred = pixels - pixels.mean(dim=1, keepdim=True)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[:, 0]  # B×C
    sign = torch.where(direction.sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
    projection = centred @ (direction * sign).unsqueeze(-1)  # B×hw×1
    return projection.view(b, *acts.shape[-2:])


class EigenCAM(Method):
    """Eigen-CAM (Muhammad & Yeasin 2020): the target layer's first principal component. It does not
    depend on the class, so every target of an image gets the same map.
    Cost: the shared forward and one (h·w)×C SVD per image; no backward pass."""

    name = "eigencam"

    def explain(self, fp: ForwardPass) -> MethodOutput:
        cam = first_principal_component(fp.layer_output.detach())  # B×h×w
        k = fp.targets.shape[1]
        unit = cam_to_unit(cam.unsqueeze(1))
        return MethodOutput(maps=upsample_maps(unit, fp.input_size).expand(-1, k, -1, -1),
                            layer_maps=unit.expand(-1, k, -1, -1))
