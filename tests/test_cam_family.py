"""Grad-CAM++, XGrad-CAM, HiResCAM, Layer-CAM and Eigen-CAM against pytorch-grad-cam (test-only reference)
on a random-init resnet18 at 112 px.

pytorch-grad-cam min-max scales each low-resolution CAM, upsamples it with cv2.resize, then min-max
scales the upsampled map again; ours stops after the upsampling (its maximum can sit between output
pixels, so it may peak a little below 1). We therefore compare ``scale_to_unit(ours)`` with theirs.
Tolerance: 1e-4 on the [0, 1] maps (observed ~1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from pytorch_grad_cam import EigenCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
from torch import Tensor, nn

from salient_maps.workers.engine import BatchResult, Explainer
from salient_maps.workers.methods import build_methods
from salient_maps.workers.methods.base import scale_to_unit
from salient_maps.workers.models import LoadedModel
from salient_maps.workers.targets import Targets

SIZE = 112
CAMS = {"gradcampp": GradCAMPlusPlus, "xgradcam": XGradCAM, "hirescam": HiResCAM, "layercam": LayerCAM,
        "eigencam": EigenCAM}
# layer4 is the usual choice (resnet's global-average-pool head makes its gradient constant over space,
# so there HiResCAM equals Grad-CAM); layer3's gradient varies over space and tells the methods apart.
LAYERS = {"layer4": lambda m: m.layer4[-1], "layer3": lambda m: m.layer3[-1]}


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def explain(model: nn.Module, x: Tensor, names: list[str], targets: Targets, layer: str = "layer4") -> BatchResult:
    loaded = LoadedModel(name="test", module=model, weights_digest="test", class_names=[str(i) for i in range(1000)])
    return Explainer(loaded, layer, build_methods(names), targets, device="cpu").explain(x)


def images(n: int, size: int = SIZE, seed: int = 1) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_maps(cam_class, model: nn.Module, layer: nn.Module, x: Tensor, classes: Tensor) -> np.ndarray:
    with cam_class(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("name", ["xgradcam", "hirescam", "layercam"])
def test_matches_pytorch_grad_cam(resnet18: nn.Module, name: str, layer: str):
    x = images(4)
    result = explain(resnet18, x, [name], Targets(topk=2), layer)
    maps = result.outputs[name].maps
    assert maps.shape == (4, 2, SIZE, SIZE) and maps.amin() >= 0 and maps.amax() <= 1
    for k in range(2):
        theirs = reference_maps(CAMS[name], resnet18, LAYERS[layer](resnet18), x, result.targets[:, k])
        np.testing.assert_allclose(scale_to_unit(maps[:, k]).numpy(), theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_gradcam_plus_plus_matches_pytorch_grad_cam_without_its_epsilon(resnet18: nn.Module, layer: str):
    """pytorch-grad-cam's alpha is g²/(2g² + ΣA·g³ + 1e-6); with gradients of order 1e-3 the 1e-6 is as big
    as g² and moves its map by ~0.02 (checked below). Scaling the gradients by c and the activations by 1/c
    leaves the CAM unchanged but shrinks that epsilon to 1e-6/c² relative to the rest: we feed its own
    ``get_cam_image`` such rescaled tensors and run its own scaling and cv2 resizing."""
    x, c = images(4), 1e3
    module = LAYERS[layer](resnet18)
    result = explain(resnet18, x, ["gradcampp"], Targets(topk=2), layer)
    with GradCAMPlusPlus(model=resnet18, target_layers=[module]) as cam:
        for k in range(2):
            targets = [ClassifierOutputTarget(int(t)) for t in result.targets[:, k]]
            as_shipped = cam(input_tensor=x, targets=targets)
            activations = cam.activations_and_grads.activations[0].numpy()
            gradients = cam.activations_and_grads.gradients[0].numpy()
            raw = cam.get_cam_image(x, module, targets, activations / c, gradients * c, False)
            theirs = scale_cam_image(scale_cam_image(np.maximum(raw, 0), (SIZE, SIZE)))
            ours = scale_to_unit(result.outputs["gradcampp"].maps[:, k]).numpy()
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
            assert np.abs(ours - as_shipped).max() > 1e-3, "epsilon no longer matters: simplify this test"


def _principal_sign(activations: np.ndarray, projections: np.ndarray) -> np.ndarray:
    """Our sign convention stated independently: each projection correlates positively with the
    channel-summed (centred) activation map."""
    summed = activations.sum(axis=1).reshape(len(activations), -1)
    summed = summed - summed.mean(axis=1, keepdims=True)
    return np.where((projections.reshape(len(projections), -1) * summed).sum(axis=1) < 0, -1.0, 1.0)


class SignFixedEigenCAM(EigenCAM):
    def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth):
        projections = get_2d_projection(activations)
        return projections * _principal_sign(activations, projections)[:, None, None].astype(np.float32)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_eigencam_matches_pytorch_grad_cam_with_a_fixed_sign(resnet18: nn.Module, layer: str):
    x = images(8)
    result = explain(resnet18, x, ["eigencam"], Targets(topk=3), layer)
    maps = result.outputs["eigencam"].maps
    assert torch.equal(maps, maps[:, :1].expand_as(maps)), "Eigen-CAM ignores the class"
    theirs = reference_maps(SignFixedEigenCAM, resnet18, LAYERS[layer](resnet18), x, result.targets[:, 0])
    np.testing.assert_allclose(scale_to_unit(maps[:, 0]).numpy(), theirs, rtol=0, atol=1e-4)


def test_batch_and_targets_are_independent(resnet18: nn.Module):
    x, names, classes = images(8, 64), list(CAMS), (5, 17, 400)
    together = explain(resnet18, x, names, Targets(topk=None, classes=classes)).outputs
    one_image = [explain(resnet18, x[i:i + 1], names, Targets(topk=None, classes=classes)).outputs for i in range(8)]
    one_target = [explain(resnet18, x, names, Targets(topk=None, classes=(c,))).outputs for c in classes]
    for name in names:
        for i in range(8):
            torch.testing.assert_close(together[name].maps[i], one_image[i][name].maps[0], rtol=0, atol=1e-5)
        for k in range(len(classes)):
            torch.testing.assert_close(together[name].maps[:, k], one_target[k][name].maps[:, 0], rtol=0, atol=1e-5)


def test_dead_layer_gives_zero_maps_not_nan():
    """All activations 0 (a channel sum of 0 divides XGrad-CAM and enters Grad-CAM++; an SVD of zeros)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.constant_(conv.bias, -1.0)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()
    result = explain(model, images(2, 16), list(CAMS), Targets(topk=2), layer="1")
    for name in CAMS:
        assert torch.equal(result.outputs[name].maps, torch.zeros(2, 2, 16, 16)), name
