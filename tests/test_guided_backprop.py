"""Guided Backpropagation and Guided Grad-CAM: guided however the network calls its rectifiers.

References: captum on a network where captum is right (plain, non-inplace, non-reused ``nn.ReLU``
modules), and everywhere else an independently built network whose every rectifier is an explicit
guided reference (module swap on a copy, plus a torch.fx rewrite of functional calls). Tolerances:
guided gradients equal the references to rtol 1e-4 / atol 1e-6 of the gradient's largest magnitude
(observed: bit-identical or ~1e-7); maps on [0, 1] to 1e-5.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.fx
import torch.nn.functional as F
import torchvision
from captum.attr import GuidedBackprop as CaptumGuidedBackprop
from captum.attr import GuidedGradCam as CaptumGuidedGradCam
from captum.attr import LayerGradCam
from pytorch_grad_cam import GuidedBackpropReLUModel
from torch import Tensor, nn

from salient_maps.workers.engine import BatchResult, Explainer
from salient_maps.workers.methods import build_methods
from salient_maps.workers.methods.attribution import smoothgrad_noise
from salient_maps.workers.methods.guided_backprop import guided_rectifiers
from salient_maps.workers.models import LoadedModel, load_model
from salient_maps.workers.targets import Targets


def explain(model: nn.Module, x: Tensor, names: list[str], targets: Targets,
            layer: str | None = "layer4", **options) -> BatchResult:
    loaded = LoadedModel(name="test", module=model, weights_digest="test", class_names=[str(i) for i in range(1000)])
    return Explainer(loaded, layer, build_methods(names, options), targets, device="cpu").explain(x)


def guided(model: nn.Module, x: Tensor, targets: Targets, layer: str = "layer4") -> Tensor:
    """Our B×K×3×H×W guided gradient."""
    return explain(model, x, ["guided_backprop"], targets, layer).outputs["guided_backprop"].arrays["gradient"]


def input_gradients(model: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
    """B×K×3×H×W d logit[classes[:, k]] / d x by plain autograd on ``model``."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    grads = [torch.autograd.grad(logits.gather(1, classes[:, k:k + 1]).sum(), x, retain_graph=True)[0]
             for k in range(classes.shape[1])]
    return torch.stack(grads, dim=1)


def assert_gradients_match(ours: Tensor, reference: Tensor) -> None:
    assert ours.abs().amax() > 0, "guided gradient vanished: the comparison would prove nothing"
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6 * reference.abs().amax().item())


# ---- the independent reference: explicit guided rectifiers -------------------------------------------------

def _reference_rectifier(x: Tensor, upper: float | None) -> Tensor:
    """Value: clamp(x, 0, upper). Gradient: ReLU(incoming) where 0 < x (< upper), else 0."""
    inside = (x > 0) if upper is None else (x > 0) & (x < upper)
    y = torch.where(inside, x, x.detach().clamp(0, upper))
    if y.requires_grad:
        y.register_hook(lambda g: g.clamp_min(0))
    return y


class ReferenceRectifier(nn.Module):
    def __init__(self, upper: float | None):
        super().__init__()
        self.upper = upper

    def forward(self, x: Tensor) -> Tensor:
        return _reference_rectifier(x, self.upper)


def _module_upper(module: nn.Module) -> tuple[bool, float | None]:
    if type(module) is nn.ReLU:
        return True, None
    if isinstance(module, nn.Hardtanh) and module.min_val == 0:  # nn.ReLU6 included
        return True, float(module.max_val)
    return False, None


def _functional_upper(node: torch.fx.Node) -> tuple[bool, float | None]:
    relus = {F.relu, torch.relu, torch.relu_}
    if (node.op == "call_function" and node.target in relus
            or node.op == "call_method" and node.target in ("relu", "relu_")):
        return True, None
    if node.op == "call_function" and node.target is F.relu6:
        return True, 6.0
    if node.op == "call_function" and node.target is F.hardtanh:
        low, high = (list(node.args[1:]) + [node.kwargs.get("min_val", -1.0), node.kwargs.get("max_val", 1.0)])[:2]
        return low == 0, float(high)
    return False, None


class _KeepReferenceLeaves(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ReferenceRectifier) or super().is_leaf_module(m, qualname)


def reference_network(model: nn.Module, functional: bool = True) -> nn.Module:
    """A copy of ``model`` with explicit guided rectifiers: every ReLU/ReLU6 module swapped for a
    ``ReferenceRectifier``; with ``functional``, the copy is traced with torch.fx and every
    functional / method rectifier call rewritten too (``functional=False`` for untraceable nets)."""
    ref = copy.deepcopy(model)
    for parent in list(ref.modules()):
        for child_name, child in parent.named_children():
            is_rectifier, upper = _module_upper(child)
            if is_rectifier:
                setattr(parent, child_name, ReferenceRectifier(upper))
    if not functional:
        return ref
    graph = _KeepReferenceLeaves().trace(ref)
    rewritten = 0
    for node in list(graph.nodes):
        is_rectifier, upper = _functional_upper(node)
        if is_rectifier:
            with graph.inserting_after(node):
                new = graph.call_function(_reference_rectifier, (node.args[0], upper))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            rewritten += 1
    ref = torch.fx.GraphModule(ref, graph)
    ref.rewritten = rewritten
    return ref


# ---- networks -----------------------------------------------------------------------------------------------

class PlainNet(nn.Module):
    """Plain, non-inplace, never reused nn.ReLU modules: the case captum handles."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
                                  nn.Linear(32, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class EveryRectifierNet(nn.Module):
    """Calls rectifiers every way a network can: a reused in-place module, F.relu(inplace=True),
    torch.relu, x.relu_(), F.relu6, in-place nn.ReLU6, F.hardtanh(0, 6); plus a SiLU (plain gradient)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(8))
        self.shared_relu = nn.ReLU(inplace=True)
        self.relu6 = nn.ReLU6(inplace=True)
        self.fc = nn.Linear(8 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        c = self.convs
        x = self.shared_relu(c[0](x))
        x = F.relu(c[1](x), inplace=True)
        x = torch.relu(c[2](x) * 3)
        x = c[3](x).relu_()
        x = F.relu6(c[4](x) * 4)
        x = self.relu6(c[5](x) * 4)
        x = F.hardtanh(c[6](x) * 4, 0.0, 6.0)
        x = self.shared_relu(F.silu(c[7](x)) + x)
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


def seeded(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory().eval()


def images(n: int, size: int, seed: int = 1) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- tests --------------------------------------------------------------------------------------------------

def test_matches_captum_on_plain_relu_network():
    model, x = seeded(PlainNet), images(4, 16)
    classes = torch.tensor([[3, 7]] * 4)
    ours = guided(model, x, Targets(topk=None, classes=(3, 7)), layer="features")
    captum = torch.stack([CaptumGuidedBackprop(model).attribute(x, target=classes[:, k]) for k in range(2)], dim=1)
    assert_gradients_match(ours, captum)
    assert not torch.allclose(ours, input_gradients(model, x, classes)), "the guided rule changed nothing"


def test_every_way_of_calling_a_rectifier_is_guided():
    model, x = seeded(EveryRectifierNet), images(3, 12)
    reference = reference_network(model)
    assert reference.rewritten == 5  # F.relu, torch.relu, relu_, F.relu6, F.hardtanh
    result = explain(model, x, ["guided_backprop"], Targets(topk=2), layer="convs.7")
    ours = result.outputs["guided_backprop"].arrays["gradient"]
    assert_gradients_match(ours, input_gradients(reference, x, result.targets))


@pytest.mark.parametrize("name, functional", [
    ("resnet18", True),      # one in-place nn.ReLU module reused twice per BasicBlock
    ("mobilenet_v2", True),  # in-place nn.ReLU6
    ("densenet121", True),   # in-place nn.ReLU modules plus a functional F.relu(inplace=True) at the end
])
def test_torchvision_models_are_guided(name: str, functional: bool):
    model = seeded(lambda: torchvision.models.get_model(name, weights=None))
    x = images(2, 32 if name == "densenet121" else 64)
    layer = "layer4" if name == "resnet18" else "features"
    result = explain(model, x, ["guided_backprop"], Targets(topk=2), layer)
    ours = result.outputs["guided_backprop"].arrays["gradient"]
    assert_gradients_match(ours, input_gradients(reference_network(model, functional), x, result.targets))
    assert not torch.allclose(ours, input_gradients(model, x, result.targets), atol=1e-3 * ours.abs().amax().item())


def test_bundled_efficientnet_lite0_relu6_is_guided():
    # timm's same-padding convolutions defeat torch.fx; its rectifiers are all nn.ReLU6 modules.
    model = load_model("efficientnet_lite0").module
    x = images(2, 64)
    result = explain(model, x, ["guided_backprop"], Targets(topk=2), layer="conv_head")
    ours = result.outputs["guided_backprop"].arrays["gradient"]
    assert_gradients_match(ours, input_gradients(reference_network(model, functional=False), x, result.targets))
    assert not torch.allclose(ours, input_gradients(model, x, result.targets), atol=1e-3 * ours.abs().amax().item())


def test_competitors_return_the_plain_gradient_on_relu6():
    """pytorch-grad-cam and captum only swap/hook nn.ReLU: on MobileNetV2 they give the plain gradient."""
    model = seeded(torchvision.models.mobilenet_v2)
    x = images(1, 64)
    result = explain(model, x, ["guided_backprop"], Targets(topk=1), layer="features")
    ours, target = result.outputs["guided_backprop"].arrays["gradient"][0, 0], int(result.targets[0, 0])
    plain = input_gradients(model, x, result.targets)[0, 0]
    tolerance = dict(rtol=1e-4, atol=1e-6 * plain.abs().amax().item())

    pgc = GuidedBackpropReLUModel(copy.deepcopy(model), device="cpu")(x.clone(), target_category=target)
    torch.testing.assert_close(torch.from_numpy(pgc).permute(2, 0, 1), plain, **tolerance)
    captum = CaptumGuidedBackprop(copy.deepcopy(model)).attribute(x.clone(), target=target)[0]
    torch.testing.assert_close(captum, plain, **tolerance)
    assert not torch.allclose(ours, plain, atol=1e-3 * plain.abs().amax().item())


def test_guided_gradcam_matches_captum():
    model, x = seeded(PlainNet), images(4, 16)
    layer = model.features
    ours = explain(model, x, ["guided_gradcam"], Targets(topk=None, classes=(3, 7)), layer="features")
    for k, target in enumerate((3, 7)):
        theirs = CaptumGuidedGradCam(model, layer).attribute(x, target=target, interpolate_mode="bilinear")
        # captum multiplies by the raw ReLU'd Grad-CAM; ours min-max scales it first. Bilinear upsampling
        # commutes with that affine map, so undo it with the low-resolution CAM's min and range.
        cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
        low, high = cam.amin(dim=(1, 2, 3), keepdim=True), cam.amax(dim=(1, 2, 3), keepdim=True)
        guided_captum = CaptumGuidedBackprop(model).attribute(x, target=target)
        expected = (theirs - low * guided_captum) / (high - low)
        assert_gradients_match(ours.outputs["guided_gradcam"].arrays["guided_gradcam"][:, k], expected)
    maps = ours.outputs["guided_gradcam"].maps
    assert maps.shape == (4, 2, 16, 16) and maps.amin() >= 0
    assert torch.allclose(maps.amax(dim=(-2, -1)), torch.ones(4, 2))


def test_batch_and_targets_are_independent():
    model, x = seeded(torchvision.models.resnet18), images(8, 48)
    methods, classes = ["guided_backprop", "guided_gradcam"], (5, 17, 400)
    together = explain(model, x, methods, Targets(topk=None, classes=classes)).outputs
    one_image = [explain(model, x[i:i + 1], methods, Targets(topk=None, classes=classes)).outputs for i in range(8)]
    one_target = [explain(model, x, methods, Targets(topk=None, classes=(c,))).outputs for c in classes]
    for method in methods:
        for i in range(8):
            for k in range(len(classes)):
                for alone, j, kk in ((one_image[i][method], 0, k), (one_target[k][method], i, 0)):
                    torch.testing.assert_close(together[method].maps[i, k], alone.maps[j, kk], rtol=0, atol=1e-5)
                    for name, array in together[method].arrays.items():
                        scale = array[i, k].abs().amax().item()
                        torch.testing.assert_close(array[i, k], alone.arrays[name][j, kk], rtol=1e-4,
                                                   atol=1e-5 * scale)


def test_smoothgrad_is_the_mean_guided_gradient_over_noisy_copies():
    model, x = seeded(EveryRectifierNet), images(3, 12)
    n, noise = 4, 0.2
    result = explain(model, x, ["guided_backprop"], Targets(topk=2), layer="convs.7", smooth=n, noise=noise)
    ours = result.outputs["guided_backprop"].arrays["gradient"]
    # One noisy copy at a time through the independent reference, the same noise as SmoothGrad's definition.
    reference, eps = reference_network(model), smoothgrad_noise(n, x)
    sigma = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
    copies = [input_gradients(reference, x + sigma.view(-1, 1, 1, 1) * eps[i], result.targets) for i in range(n)]
    assert_gradients_match(ours, torch.stack(copies).mean(dim=0))
    plain = guided(model, x, Targets(topk=2), layer="convs.7")
    assert not torch.allclose(ours, plain, atol=1e-3 * plain.abs().amax().item()), "the noise changed nothing"
    assert build_methods(["guided_backprop"], {"smooth": n})[0].params() == {"score": "logit", "smooth": n,
                                                                            "noise": 0.15}


def test_guided_gradcam_shares_the_guided_pass_and_is_not_smoothed():
    model, x = seeded(torchvision.models.resnet18), images(2, 48)
    methods, targets = ["guided_backprop", "guided_gradcam"], Targets(topk=None, classes=(5, 17))
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    try:
        explain(model, x, methods, targets)
        assert rows == [2, 2]  # the shared pass and one guided pass, read by both methods
        rows.clear()
        smoothed = explain(model, x, methods, targets, smooth=3).outputs
        assert sorted(rows) == [2, 2, 6]  # plus one pass of the 3 × 2 noisy copies
    finally:
        handle.remove()
    alone = explain(model, x, ["guided_gradcam"], targets).outputs["guided_gradcam"]
    torch.testing.assert_close(smoothed["guided_gradcam"].arrays["guided_gradcam"], alone.arrays["guided_gradcam"],
                               rtol=0, atol=0)


def _state(model: nn.Module) -> list:
    return [(name, type(m), getattr(m, "inplace", None), m.forward, dict(m._forward_hooks), dict(m._forward_pre_hooks),
             dict(m._backward_hooks), dict(m._backward_pre_hooks)) for name, m in model.named_modules()]


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_model_and_torch_left_unchanged(name: str):
    model = seeded(lambda: torchvision.models.get_model(name, weights=None))
    x = images(2, 32 if name == "densenet121" else 64)
    loaded = LoadedModel(name=name, module=model, weights_digest="test", class_names=[str(i) for i in range(1000)])
    layer = "layer4" if name == "resnet18" else "features"
    # The engine may set up the model (memory format) when it is built: measure what the methods do.
    explainer = Explainer(loaded, layer, build_methods(["guided_backprop", "guided_gradcam"]), Targets(topk=2),
                          device="cpu")
    before, weights, logits = _state(model), copy.deepcopy(model.state_dict()), model(x)
    functions = (F.relu, F.relu6, F.hardtanh, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_)
    explainer.explain(x)
    assert _state(model) == before
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert (F.relu, F.relu6, F.hardtanh, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_) == functions
    assert torch._C._len_torch_function_stack() == 0
    torch.testing.assert_close(model(x), logits, rtol=0, atol=0)
    # Plain gradients again: the guided rule does not outlive the method.
    z = torch.tensor([-1.0, 2.0], requires_grad=True)
    (F.relu(z) * torch.tensor([-3.0, -4.0])).sum().backward()
    assert z.grad.tolist() == [0.0, -4.0]


def test_guided_rule_ends_with_an_error_and_stays_on_its_thread():
    z = torch.tensor([-1.0, 2.0, 3.0], requires_grad=True)
    upstream = torch.tensor([5.0, -4.0, 2.0])
    other_thread: list[list[float]] = []

    def plain_elsewhere():
        w = z.detach().clone().requires_grad_(True)
        (F.relu(w) * upstream).sum().backward()
        other_thread.append(w.grad.tolist())

    with pytest.raises(RuntimeError, match="boom"), guided_rectifiers():
        (F.relu(z) * upstream).sum().backward()
        thread = threading.Thread(target=plain_elsewhere)
        thread.start()
        thread.join()
        raise RuntimeError("boom")
    assert z.grad.tolist() == [0.0, 0.0, 2.0]  # guided: negative input and negative gradient blocked
    assert other_thread == [[0.0, -4.0, 2.0]]  # plain ReLU gradient on the other thread
    assert torch._C._len_torch_function_stack() == 0


def test_in_place_rectifier_whose_result_is_ignored():
    """``y.relu_()`` without using its return value: the network reads ``y``, which must carry the rule."""
    z = torch.tensor([-1.0, 2.0, 3.0, 7.0], requires_grad=True)
    with guided_rectifiers():
        y = z * 1
        y.relu_()
        w = z * 1
        F.relu6(w, inplace=True)
        v = z * 1
        F.hardtanh_(v, 0.0, 6.0)
    assert y.tolist() == [0.0, 2.0, 3.0, 7.0] and w.tolist() == v.tolist() == [0.0, 2.0, 3.0, 6.0]
    ((y + w + v) * torch.tensor([5.0, -4.0, 2.0, 1.0])).sum().backward()
    assert z.grad.tolist() == [0.0, 0.0, 6.0, 1.0]  # 7 > 6 blocks ReLU6 but not ReLU


def test_torchscript_is_refused_not_silently_plain():
    scripted = torch.jit.script(seeded(PlainNet))
    with pytest.raises(TypeError, match="TorchScript"):
        explain(scripted, images(1, 16), ["guided_backprop"], Targets(topk=1), layer=None)


def test_network_without_rectifiers_gets_the_plain_gradient_and_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Conv2d(4, 4, 3), nn.GELU(), nn.Hardswish(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    x = images(2, 12)
    with pytest.warns(UserWarning, match="no ReLU"):
        result = explain(model, x, ["guided_backprop"], Targets(topk=2), layer=None)
    ours = result.outputs["guided_backprop"].arrays["gradient"]
    assert_gradients_match(ours, input_gradients(model, x, result.targets))
