"""Vanilla gradient, SmoothGrad and Integrated Gradients against captum, closed forms and brute-force loops."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torchvision
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import Saliency as CaptumSaliency
from torch import nn

from salient_maps.workers.engine import Explainer
from salient_maps.workers.methods import build_methods
from salient_maps.workers.methods.attribution import smoothgrad_noise
from salient_maps.workers.methods.integrated_gradients import baseline_input
from salient_maps.workers.models import IMAGENET_MEAN, IMAGENET_STD, LoadedModel
from salient_maps.workers.targets import Targets

SIZE = 40


def classifier(module: nn.Module, n: int = 10) -> LoadedModel:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return LoadedModel(name="test", module=module, weights_digest="0" * 12, class_names=[f"c{i}" for i in range(n)],
                       input_size=SIZE)


@pytest.fixture(scope="module")
def resnet() -> LoadedModel:
    torch.manual_seed(0)
    return classifier(torchvision.models.resnet18(num_classes=10))


@pytest.fixture(scope="module")
def smooth_net() -> LoadedModel:
    """A small CNN with smooth activations: its path integrals converge fast, so completeness is tight."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Softplus(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    return classifier(net, n=5)


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def explain(model: LoadedModel, names: list[str], x: torch.Tensor, targets=Targets(topk=2), **options):
    layer = "layer4" if hasattr(model.module, "layer4") else None
    return Explainer(model, layer, build_methods(names, options), targets, device="cpu").explain(x)


def black(x: torch.Tensor) -> torch.Tensor:
    return baseline_input(x, "black", IMAGENET_MEAN, IMAGENET_STD).contiguous()


def softmax_of(module: nn.Module) -> nn.Module:
    return nn.Sequential(module, nn.Softmax(dim=1))


def close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    """Equal up to ``rtol`` of the larger tensor's peak magnitude (element-wise relative error is
    meaningless where gradients cross zero)."""
    return (a - b).abs().max().item() <= rtol * max(a.abs().max().item(), b.abs().max().item())


@pytest.mark.parametrize("score", ["logit", "probability"])
def test_saliency_is_captum_gradient_and_renderings_follow_their_definitions(resnet, score):
    x = images(3)
    result = explain(resnet, ["saliency"], x, score=score)
    out = result.outputs["saliency"]
    reference = CaptumSaliency(resnet.module if score == "logit" else softmax_of(resnet.module))
    for k in range(2):
        expected = reference.attribute(x, target=result.targets[:, k], abs=False)
        assert close(out.arrays["gradient"][:, k], expected, 1e-5)
    g = out.arrays["gradient"].numpy().astype(np.float64)  # B×K×3×H×W
    simonyan = np.abs(g).max(axis=2)
    lo, hi = simonyan.min(axis=(-2, -1), keepdims=True), simonyan.max(axis=(-2, -1), keepdims=True)
    np.testing.assert_allclose(out.maps.numpy(), (simonyan - lo) / (hi - lo), atol=1e-5)
    glo, ghi = g.min(axis=(2, 3, 4), keepdims=True), g.max(axis=(2, 3, 4), keepdims=True)
    np.testing.assert_allclose(out.arrays["color"].numpy(), (g - glo) / (ghi - glo), atol=1e-5)
    for name, reduced in [("gray", np.abs(g).sum(2)), ("positive", np.maximum(g, 0).sum(2)),
                          ("negative", np.maximum(-g, 0).sum(2))]:
        assert out.arrays[name].shape == (3, 2, SIZE, SIZE)
        np.testing.assert_allclose(out.arrays[name].numpy(), reduced / reduced.max(axis=(-2, -1), keepdims=True),
                                   atol=1e-5)


def test_smoothgrad_is_the_mean_gradient_over_noisy_copies_one_image_at_a_time(resnet):
    x = images(3)
    n, noise = 5, 0.2
    out = explain(resnet, ["saliency"], x, targets=Targets(classes=(1, 7)), smooth=n, noise=noise)
    smoothed = out.outputs["saliency"].arrays["gradient"]
    eps = smoothgrad_noise(n, x)
    for b in range(3):
        sigma = noise * (x[b].max() - x[b].min())
        for k, target in enumerate((1, 7)):
            grads = []
            for i in range(n):
                xi = (x[b] + sigma * eps[i]).unsqueeze(0).requires_grad_(True)
                grads.append(torch.autograd.grad(resnet.module(xi)[0, target], xi)[0][0])
            assert close(smoothed[b, k], torch.stack(grads).mean(0), 1e-5)
    # Noise patterns are per copy, not per batch slot: an image alone gets the same result as in a batch.
    alone = explain(resnet, ["saliency"], x[2:], targets=Targets(classes=(1, 7)), smooth=n, noise=noise)
    assert close(alone.outputs["saliency"].arrays["gradient"][0], smoothed[2], 1e-5)


def test_smoothgrad_without_noise_is_the_plain_gradient(resnet):
    x = images(2)
    plain = explain(resnet, ["saliency"], x).outputs["saliency"]
    smooth = explain(resnet, ["saliency"], x, smooth=3, noise=0.0).outputs["saliency"]
    assert close(smooth.arrays["gradient"], plain.arrays["gradient"], 1e-6)


def test_smoothgrad_wraps_integrated_gradients(smooth_net):
    x = images(2, seed=3)
    n, noise, steps = 3, 0.1, 8
    out = explain(smooth_net, ["integrated_gradients"], x, targets=Targets(classes=(2,)), smooth=n, noise=noise,
                  steps=steps)
    smoothed = out.outputs["integrated_gradients"].arrays["attribution"][:, 0]
    eps = smoothgrad_noise(n, x)
    sigma = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
    ig = CaptumIG(smooth_net.module)
    expected = torch.stack([ig.attribute(x + sigma * eps[i], baselines=black(x), target=2, n_steps=steps)
                            for i in range(n)]).mean(0)
    assert close(smoothed, expected, 1e-5)


@pytest.mark.parametrize("baseline, score", [("black", "logit"), ("blurred", "probability")])
def test_integrated_gradients_is_captum_gauss_legendre(resnet, baseline, score):
    x = images(3, seed=1)
    steps = 6
    result = explain(resnet, ["integrated_gradients"], x, steps=steps, baseline=baseline, score=score)
    attribution = result.outputs["integrated_gradients"].arrays["attribution"]
    base = baseline_input(x, baseline, IMAGENET_MEAN, IMAGENET_STD).contiguous()
    ig = CaptumIG(resnet.module if score == "logit" else softmax_of(resnet.module))
    for k in range(2):
        expected = ig.attribute(x, baselines=base, target=result.targets[:, k], n_steps=steps, method="gausslegendre")
        assert close(attribution[:, k], expected, 1e-5)


def test_black_baseline_is_black_pixels_and_blurred_is_a_gaussian_blur():
    x = images(2, seed=4)
    assert black(x).shape == x.shape
    restored = black(x) * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert restored.abs().max() < 1e-6
    blurred = baseline_input(x, "blurred", IMAGENET_MEAN, IMAGENET_STD)
    sigma = SIZE / 16
    radius = int(np.ceil(3 * sigma))
    for b in range(2):
        hwc = x[b].permute(1, 2, 0).numpy()
        expected = cv2.GaussianBlur(hwc, (2 * radius + 1,) * 2, sigma, borderType=cv2.BORDER_REFLECT_101)
        np.testing.assert_allclose(blurred[b].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_integrated_gradients_completeness_on_a_smooth_network(smooth_net):
    x = images(3, seed=2)
    result = explain(smooth_net, ["integrated_gradients"], x, targets=Targets(topk=2), steps=32)
    attribution = result.outputs["integrated_gradients"].arrays["attribution"]
    with torch.no_grad():
        gap = (smooth_net.module(x) - smooth_net.module(black(x))).gather(1, result.targets)  # B×K
    total = attribution.sum(dim=(2, 3, 4))
    assert (total - gap).abs().max() <= 1e-3 * gap.abs().max()


def test_integrated_gradients_does_not_depend_on_how_steps_are_batched(resnet):
    x = images(3, seed=5)
    batched = explain(resnet, ["integrated_gradients"], x, steps=7).outputs["integrated_gradients"]
    alone = explain(resnet, ["integrated_gradients"], x[:1], steps=7).outputs["integrated_gradients"]
    assert close(alone.arrays["attribution"][0], batched.arrays["attribution"][0], 1e-5)


def test_same_inputs_give_bitwise_equal_maps_on_cpu(resnet):
    torch.use_deterministic_algorithms(True, warn_only=True)
    x = images(2, seed=6)
    runs = [explain(resnet, ["saliency", "integrated_gradients"], x, steps=4, smooth=2) for _ in range(2)]
    for name in ("saliency", "integrated_gradients"):
        first, second = runs[0].outputs[name], runs[1].outputs[name]
        assert torch.equal(first.maps, second.maps)
        for key in first.arrays:
            assert torch.equal(first.arrays[key], second.arrays[key])


def test_smoothing_and_integration_settings_are_part_of_the_identity():
    plain, smooth, noisier = (build_methods(["saliency"], options)[0]
                              for options in ({}, {"smooth": 8}, {"smooth": 8, "noise": 0.3}))
    assert plain.params() == {"score": "logit"}  # unchanged when SmoothGrad is off
    assert smooth.params() == {"score": "logit", "smooth": 8, "noise": 0.15}
    assert len({json.dumps(m.params(), sort_keys=True) for m in (plain, smooth, noisier)}) == 3
    ig = build_methods(["integrated_gradients"], {"steps": 16, "baseline": "blurred"})[0]
    assert ig.params() == {"score": "logit", "steps": 16, "baseline": "blurred"}
    with pytest.raises(ValueError, match="baseline"):
        build_methods(["integrated_gradients"], {"baseline": "white"})


def test_explaining_leaves_the_model_unchanged(resnet):
    module = resnet.module
    x = images(2, seed=7)
    with torch.no_grad():
        before_out = module(x)
    before_state = {k: v.clone() for k, v in module.state_dict().items()}
    explain(resnet, ["gradcam", "saliency", "integrated_gradients"], x, steps=2, smooth=1)
    explain(resnet, ["saliency"], x)
    assert not x.requires_grad  # the caller's input is left as it was too
    for sub in module.modules():
        assert not sub._forward_hooks and not sub._forward_pre_hooks and not sub._backward_hooks
        assert not sub.training
    assert all(torch.equal(before_state[k], v) for k, v in module.state_dict().items())
    assert not any(p.requires_grad or p.grad is not None for p in module.parameters())
    with torch.no_grad():
        assert torch.equal(module(x), before_out)


def test_gradcam_and_saliency_together_share_each_backward_and_give_what_each_gives_alone(resnet, monkeypatch):
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    alone = {name: Explainer(resnet, "layer4", build_methods([name]), Targets(topk=3), device="cpu").explain(x)
             for name in ("gradcam", "saliency")}
    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    both = Explainer(resnet, "layer4", build_methods(["gradcam", "saliency"]), Targets(topk=3), device="cpu").explain(x)
    assert len(calls) == 3  # one backward per target, not one per target and method
    for name in ("gradcam", "saliency"):
        torch.testing.assert_close(both.outputs[name].maps, alone[name].outputs[name].maps, atol=1e-6, rtol=0)
