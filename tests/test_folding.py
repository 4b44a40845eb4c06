"""Batch-norm folding (workers/folding.py): the folded copy computes what the model computes, the model
itself is left alone, what cannot be folded safely is not, and the explainer's maps are the unfolded
model's (computed here by plain autograd on the model as built)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from salient_maps.workers.engine import Explainer
from salient_maps.workers.folding import folded, for_plain_passes
from salient_maps.workers.methods import build_methods
from salient_maps.workers.models import LoadedModel, load_model
from salient_maps.workers.targets import Targets


def with_running_statistics(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random-init BatchNorms are identities (mean 0, var 1, weight 1, bias 0): give them real work."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return module.eval().requires_grad_(False)


def norms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def test_folded_resnet_computes_the_same_logits_without_batch_norms():
    model = with_running_statistics(torchvision.models.resnet18(weights=None).double())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = folded(model)
    assert fast is not model and norms(fast) == 0 and norms(model) == 20
    torch.testing.assert_close(fast(x), model(x), rtol=1e-10, atol=1e-10)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model itself is unchanged


def test_bundled_efficientnet_folds_timm_norm_act_layers():
    model = load_model().module
    fast = folded(model)
    assert norms(model) > 0 and norms(fast) == 0
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


def test_the_copy_is_reused_until_the_weights_change():
    model = with_running_statistics(torchvision.models.resnet18(weights=None))
    fast = folded(model)
    assert folded(model) is fast
    with torch.no_grad():
        model.fc.weight.mul_(2)  # as the sanity check's randomisation does: in place
    again = folded(model)
    x = torch.randn(1, 3, 64, 64)
    assert again is not fast
    torch.testing.assert_close(again(x), model(x), rtol=1e-4, atol=1e-4)


class ConvReadTwice(nn.Module):
    """The conv's output feeds the batch norm and the sum: folding would change the second use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.norm(y) + y


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.norm(self.conv(x)) if x.sum() > 0 else x


def test_what_cannot_be_folded_safely_is_run_as_it_is():
    for net in (ConvReadTwice(), DataDependent()):
        net = with_running_statistics(net)
        assert folded(net) is net
    training = with_running_statistics(torchvision.models.resnet18(weights=None)).train()
    assert folded(training) is training


def test_plain_passes_run_folded_except_in_cuda_half_precision():
    model = with_running_statistics(torchvision.models.resnet18(weights=None))
    assert norms(for_plain_passes(model, torch.device("cpu"), torch.bfloat16)) == 0
    assert norms(for_plain_passes(model, torch.device("cuda"), torch.float32)) == 0
    assert for_plain_passes(model, torch.device("cuda"), torch.bfloat16) is model


def test_the_explainer_runs_folded_and_its_maps_are_the_models_own():
    model = with_running_statistics(torchvision.models.resnet18(weights=None, num_classes=10))
    loaded = LoadedModel(name="test", module=model, weights_digest="0" * 12, class_names=[str(i) for i in range(10)],
                         input_size=64)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    explainer = Explainer(loaded, "layer4", build_methods(["gradcam", "saliency"]), Targets(topk=1), device="cpu")
    assert norms(explainer.module) == 0 and norms(model) == 20
    result = explainer.explain(x)

    # Independent: Grad-CAM and the input gradient of the top class on the model as built, in float64.
    ref = model.double()
    try:
        captured = []
        handle = ref.layer4.register_forward_hook(lambda _m, _i, out: captured.append(out))
        xd = x.double().requires_grad_(True)
        logits = ref(xd)
        handle.remove()
        top = logits.argmax(1)
        layer_grad, input_grad = torch.autograd.grad(logits.gather(1, top[:, None]).sum(), [captured[0], xd])
        cam = torch.relu((layer_grad.mean((2, 3), keepdim=True) * captured[0]).sum(1, keepdim=True))
        lo, hi = cam.amin((2, 3), keepdim=True), cam.amax((2, 3), keepdim=True)
        cam = nn.functional.interpolate((cam - lo) / (hi - lo), size=(64, 64), mode="bilinear", align_corners=False)
        saliency = input_grad.abs().amax(1, keepdim=True)
        lo, hi = saliency.amin((2, 3), keepdim=True), saliency.amax((2, 3), keepdim=True)
        saliency = (saliency - lo) / (hi - lo)
    finally:
        model.float()
    assert torch.equal(result.targets[:, 0], top)
    torch.testing.assert_close(result.outputs["gradcam"].maps.double(), cam, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.outputs["saliency"].maps.double(), saliency, rtol=0, atol=1e-5)


def test_a_hooked_convolution_keeps_its_batch_norm_and_its_own_output():
    model = with_running_statistics(torchvision.models.resnet18(weights=None, num_classes=10))
    loaded = LoadedModel(name="test", module=model, weights_digest="0" * 12, class_names=[str(i) for i in range(10)],
                         input_size=64)
    explainer = Explainer(loaded, "layer4.1.conv2", build_methods(["gradcam"]), Targets(topk=1), device="cpu")
    assert norms(explainer.module) == 1  # only the hooked conv's own batch norm is left
    assert isinstance(explainer.module.get_submodule("layer4.1.bn2"), nn.BatchNorm2d)
    assert torch.equal(explainer.layer.weight, model.layer4[1].conv2.weight)  # the layer's output is as built
