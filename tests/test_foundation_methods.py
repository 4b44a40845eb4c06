"""Grad-CAM and saliency numerics, and the engine that shares one forward pass between them.

Closed forms on hand-built nets are checked to float32 round-off (1e-6 on maps in [0, 1]); captum on a
random-init resnet18 at 64 px is the independent reference (1e-5 on raw gradients, 1e-4 on maps); batch
independence is checked in float64 (see ``resnet18_f64``) to 1e-4 on maps, 1e-5 on gradients.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from salient_maps.workers.engine import BatchResult, Explainer
from salient_maps.workers.methods import build_methods
from salient_maps.workers.methods.base import cam_to_maps, scale_to_unit
from salient_maps.workers.models import LoadedModel, load_model
from salient_maps.workers.targets import Targets

MAP_TOL = 1e-4
GRAD_TOL = 1e-5


def wrap(module: nn.Module, n_classes: int, layers: list[str]) -> LoadedModel:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return LoadedModel(name="test", module=module, weights_digest="0" * 64,
                       class_names=[f"c{i}" for i in range(n_classes)], layer_candidates=layers)


def explain(model: LoadedModel, layer: str | None, x: Tensor, targets: Targets,
            methods: tuple[str, ...] = ("gradcam", "saliency"), **options) -> BatchResult:
    return Explainer(model, layer, build_methods(list(methods), options), targets, device="cpu").explain(x)


def bilinear_upsample(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize (align_corners=False, edges clamped), written out in float64."""

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, fy = axis(height, image.shape[0])
    x0, x1, fx = axis(width, image.shape[1])
    top = image[y0][:, x0] * (1 - fx) + image[y0][:, x1] * fx
    bottom = image[y1][:, x0] * (1 - fx) + image[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def min_max(a: np.ndarray) -> np.ndarray:
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


# --- closed forms -------------------------------------------------------------------------------------------------


def test_gradcam_closed_form_on_conv_gap_linear():
    """conv -> global average pool -> linear: d logit_n / d A_c,ij = W[n, c] / (h·w) everywhere, so the Grad-CAM
    weight of channel c is W[n, c] / (h·w) and the map is minmax(relu(Σ_c W[n, c] A_c / (h·w))) upsampled."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
    linear = nn.Linear(6, 5)
    net = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)
    x = torch.randn(2, 3, 12, 20)  # not square: h×w = 6×10 feature map, H×W order must survive
    classes = (0, 3, 4)
    result = explain(wrap(net, 5, ["0"]), "0", x, Targets(topk=None, classes=classes), methods=("gradcam",))
    maps = result.outputs["gradcam"].maps
    assert maps.shape == (2, 3, 12, 20)

    with torch.no_grad():
        acts = conv(x).double().numpy()  # B×C×h×w
    weights = linear.weight.double().numpy()
    h, w = acts.shape[-2:]
    for b in range(2):
        for k, n in enumerate(classes):
            cam = np.maximum(np.einsum("c,cij->ij", weights[n] / (h * w), acts[b]), 0)
            assert cam.max() > 0 and (cam == 0).any()  # the ReLU really cuts something here
            expected = bilinear_upsample(min_max(cam), 12, 20)
            np.testing.assert_allclose(maps[b, k].numpy(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("score", ["logit", "probability"])
def test_saliency_closed_form_on_a_linear_model(score):
    """logits = W x + b: d logit_n / dx = W[n]; d softmax_n / dx = p_n (W[n] − Σ_m p_m W[m]).
    The map is max over colour channels of |gradient|, min-max scaled; the raw gradient is stored beside it."""
    torch.manual_seed(1)
    c, h, w, n = 3, 7, 9, 4
    linear = nn.Linear(c * h * w, n)
    net = nn.Sequential(nn.Flatten(), linear)
    x = torch.randn(3, c, h, w)
    result = explain(wrap(net, n, []), None, x, Targets(topk=2), methods=("saliency",), score=score)
    out = result.outputs["saliency"]
    weights = linear.weight.double().numpy().reshape(n, c, h, w)
    with torch.no_grad():
        probs = net(x).double().softmax(1).numpy()
    for b in range(3):
        for k, cls in enumerate(result.targets[b].tolist()):
            if score == "logit":
                gradient = weights[cls]
            else:
                gradient = probs[b, cls] * (weights[cls] - np.einsum("m,mchw->chw", probs[b], weights))
            np.testing.assert_allclose(out.arrays["gradient"][b, k].numpy(), gradient, rtol=1e-5, atol=1e-7)
            expected = min_max(np.abs(gradient).max(axis=0))
            np.testing.assert_allclose(out.maps[b, k].numpy(), expected, atol=1e-6, rtol=0)


# --- captum on a real architecture --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18() -> LoadedModel:
    return load_model("resnet18")


@pytest.fixture(scope="module")
def resnet18_f64(resnet18) -> LoadedModel:
    """resnet18 in float64, for comparing a batch with its images one at a time. In float32 a batched conv
    rounds differently (~1e-8) from a single-image one, and once in a while that flips a ReLU whose input is
    ~0, which moves an input gradient by ~1 % of its peak: a true discontinuity, not leakage between images."""
    return wrap(copy.deepcopy(resnet18.module).double(), 1000, resnet18.layer_candidates)


def images(n: int, size: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_gradcam_and_saliency_match_captum(resnet18):
    from captum.attr import LayerAttribution, LayerGradCam, LayerGradientXActivation, Saliency

    x = images(2)
    result = explain(resnet18, "layer4", x, Targets(topk=2))
    module, layer = resnet18.module, resnet18.module.layer4
    for k in range(2):
        target = result.targets[:, k].tolist()
        cam = LayerGradCam(module, layer).attribute(x, target=target, relu_attributions=True)  # B×1×2×2
        # captum's own upsampling (bilinear, align_corners=False) after our min-max, as Grad-CAM's paper does
        expected = LayerAttribution.interpolate(scale_to_unit(cam), (64, 64), "bilinear")[:, 0]
        torch.testing.assert_close(result.outputs["gradcam"].maps[:, k], expected, atol=MAP_TOL, rtol=0)

        gradient = Saliency(module).attribute(x.clone().requires_grad_(True), target=target, abs=False)
        torch.testing.assert_close(result.outputs["saliency"].arrays["gradient"][:, k], gradient,
                                   atol=GRAD_TOL, rtol=GRAD_TOL)
        expected = scale_to_unit(gradient.abs().amax(dim=1))  # captum's abs=True is this abs
        torch.testing.assert_close(result.outputs["saliency"].maps[:, k], expected, atol=MAP_TOL, rtol=0)

    # the layer gradients Grad-CAM reads, against captum's plain layer gradient
    layer_grad = LayerGradientXActivation(module, layer, multiply_by_inputs=False)
    explainer = Explainer(resnet18, "layer4", build_methods(["gradcam"]), Targets(topk=2), device="cpu")
    fp, _ = explainer._forward(x)
    ours = fp.gradients("layer")
    for k in range(2):
        reference = layer_grad.attribute(x, target=fp.targets[:, k].tolist())
        torch.testing.assert_close(ours[:, k], reference, atol=GRAD_TOL, rtol=GRAD_TOL)


def test_top3_from_one_forward_equals_three_single_class_runs(resnet18):
    x = images(1, seed=3)  # same batch, same forward: only the target handling differs, so float32 is exact
    together = explain(resnet18, "layer4", x, Targets(topk=3))
    for k, cls in enumerate(together.targets[0].tolist()):
        alone = explain(resnet18, "layer4", x, Targets(topk=None, classes=(cls,)))
        for name in ("gradcam", "saliency"):
            torch.testing.assert_close(together.outputs[name].maps[0, k], alone.outputs[name].maps[0, 0],
                                       atol=MAP_TOL, rtol=0)
        torch.testing.assert_close(together.outputs["saliency"].arrays["gradient"][0, k],
                                   alone.outputs["saliency"].arrays["gradient"][0, 0], atol=GRAD_TOL, rtol=GRAD_TOL)


def test_a_batch_of_eight_gives_each_image_its_own_maps(resnet18_f64):
    x = images(8, size=48, seed=4, dtype=torch.float64)
    batch = explain(resnet18_f64, "layer4", x, Targets(topk=2))
    for b in range(8):
        alone = explain(resnet18_f64, "layer4", x[b:b + 1], Targets(topk=2))
        assert torch.equal(alone.targets[0], batch.targets[b])
        torch.testing.assert_close(alone.probs[0], batch.probs[b], atol=1e-6, rtol=0)
        for name in ("gradcam", "saliency"):
            torch.testing.assert_close(batch.outputs[name].maps[b], alone.outputs[name].maps[0], atol=MAP_TOL, rtol=0)
        torch.testing.assert_close(batch.outputs["saliency"].arrays["gradient"][b],
                                   alone.outputs["saliency"].arrays["gradient"][0], atol=GRAD_TOL, rtol=GRAD_TOL)


# --- hygiene ------------------------------------------------------------------------------------------------------


def hooks_left(module: nn.Module) -> list[str]:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [f"{name or 'root'}.{kind}" for name, m in module.named_modules() for kind in kinds if getattr(m, kind)]


def test_hooks_are_removed_after_use_and_after_a_failure(resnet18):
    assert hooks_left(resnet18.module) == []
    explain(resnet18, "layer4", images(2), Targets(topk=1))
    assert hooks_left(resnet18.module) == []
    with pytest.raises(RuntimeError):
        explain(resnet18, "layer4", torch.zeros(1, 5, 64, 64), Targets(topk=1))  # 5 channels: conv1 refuses
    assert hooks_left(resnet18.module) == []
    assert all(p.grad is None for p in resnet18.module.parameters())  # gradients went to activations only


def test_constant_maps_become_zeros_never_nan():
    flat = torch.full((2, 3, 5, 5), 0.7)
    assert torch.equal(scale_to_unit(flat), torch.zeros_like(flat))
    negative = -torch.rand(1, 2, 4, 4) - 0.1  # all-negative CAM: ReLU leaves a constant zero map
    assert torch.equal(cam_to_maps(negative, (8, 8)), torch.zeros(1, 2, 8, 8))

    # a dead layer (all-zero activations) and an input the score ignores: zero maps end to end
    dead = nn.Conv2d(3, 4, 3, padding=1)
    nn.init.zeros_(dead.weight)
    nn.init.zeros_(dead.bias)
    net = nn.Sequential(dead, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    result = explain(wrap(net, 3, ["0"]), "0", torch.randn(2, 3, 8, 8), Targets(topk=2))
    for name in ("gradcam", "saliency"):
        maps = result.outputs[name].maps
        assert torch.isfinite(maps).all() and torch.equal(maps, torch.zeros_like(maps)), name


def test_maps_are_in_unit_range_at_input_size(resnet18):
    result = explain(resnet18, "layer4", images(2, size=72), Targets(topk=2))
    for name in ("gradcam", "saliency"):
        maps = result.outputs[name].maps
        assert maps.shape == (2, 2, 72, 72) and maps.dtype == torch.float32
        assert maps.min() >= 0 and maps.max() <= 1 and torch.isfinite(maps).all()
    saliency = result.outputs["saliency"].maps.flatten(-2)  # min-max at full size: each map spans [0, 1]
    assert torch.equal(saliency.amax(-1), torch.ones(2, 2)) and torch.equal(saliency.amin(-1), torch.zeros(2, 2))
