"""Every torchvision classifier and a sample of timm families: Grad-CAM and saliency on one image each,
through ``load_model`` (default layer, layout, preprocessing) and the engine. Finite, non-constant maps and
the layout the engine reads the default layer with.

Construction is what costs here (a random init of regnet_y_128gf's 644 M weights takes tens of seconds):
the test skips the architectures' own initialisers and draws every weight once from a normal distribution
scaled by its fan-in (norm scales 1, biases small), which any network of these families runs on. Inputs
are small where the architecture allows (a ViT is built for the size asked; MaxViT's windows need 224).
Grad-CAM and saliency share the forward and each target's backward (``ForwardPass.gradients``), and
``load_model`` surveys the layers on the forward that counts the outputs. One intra-op thread: at these sizes
a second one gains little, and with other work on the cores its spinning cost 2.4-3x the wall time and 4x the
CPU (the first 20 torchvision models, interleaved runs: 33-41 s against 80-123 s).
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from salient_maps.workers.engine import Explainer
from salient_maps.workers.methods import build_methods
from salient_maps.workers.models import load_model, resolve_layer
from salient_maps.workers.targets import Targets

# 32-px patches: 96 px gives a 3×3 grid (at 64 px, 2×2, every top class of a random ViT-L/32 had a negative CAM)
SIZES = {"maxvit_t": 224, "inception_v3": 80, "vit_h_14": 56, "vit_b_32": 96, "vit_l_32": 96}
TIMM = {  # name: (input size, layout of its default layer)
    "timm:vit_tiny_patch16_224": (64, {"kind": "tokens", "prefix_tokens": 1}),
    "timm:deit_tiny_distilled_patch16_224": (64, {"kind": "tokens", "prefix_tokens": 2}),
    "timm:vit_small_patch14_reg4_dinov2": (56, {"kind": "tokens", "prefix_tokens": 5}),
    "timm:swin_tiny_patch4_window7_224": (224, {"kind": "nhwc"}),
    "timm:convnext_atto": (64, {"kind": "nchw"}),
    "timm:efficientnet_b0": (64, {"kind": "nchw"}),
    "timm:resnet10t": (64, {"kind": "nchw"}),
    "timm:mobilevit_xxs": (64, {"kind": "nchw"}),
}
_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "constant_", "zeros_", "ones_", "orthogonal_")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def expected_layout(name: str) -> dict:
    if name in TIMM:
        return TIMM[name][1]
    return {"kind": "tokens", "prefix_tokens": 1} if name.startswith("vit_") else {"kind": "nchw"}


def quick_weights(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                bound = math.sqrt(3 / p[0].numel())  # the variance of normal(0, 1/fan_in), drawn faster
                p.uniform_(-bound, bound, generator=generator)
            elif name.endswith(("weight", "gamma")):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=generator)


@pytest.mark.parametrize("name", [*torchvision.models.list_models(module=torchvision.models), *TIMM])
def test_gradcam_and_saliency_on_every_model(name: str, monkeypatch: pytest.MonkeyPatch):
    for initialiser in _INITIALISERS:
        monkeypatch.setattr(torch.nn.init, initialiser, lambda tensor, *args, **kwargs: tensor)
    size = TIMM[name][0] if name in TIMM else SIZES.get(name, 64)
    model = load_model(name, input_size=size)
    monkeypatch.undo()
    quick_weights(model.module)
    layer = resolve_layer(model, None)
    explainer = Explainer(model, layer, build_methods(["gradcam", "saliency"]), Targets(topk=3), device="cpu")
    assert explainer.layout.params() == expected_layout(name), layer
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    result = explainer.explain(x)
    for method in ("gradcam", "saliency"):
        maps = result.outputs[method].maps
        assert maps.shape == (1, 3, size, size) and torch.isfinite(maps).all(), (method, layer)
        # A random network's class can have a CAM negative everywhere (ReLU'd to zeros): one of three must vary.
        assert (maps.flatten(2).amax(-1) > maps.flatten(2).amin(-1)).any(), (method, layer)
