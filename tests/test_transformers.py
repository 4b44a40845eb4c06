"""Vision transformers in the layer methods: token and channel-last layouts against pytorch-grad-cam (its
``reshape_transform``, test-only reference) and against a brute-force computation on a tiny transformer.

Random-init torchvision models at small inputs (a ViT's size is fixed at construction: vit_b_16 is built
for 64 px, a 4×4 patch grid, and 32 px for Score-CAM's 768 masked passes). torchvision initialises a
ViT's head to zeros, which makes every gradient zero: the head is re-initialised (normal, std 0.02).
Comparison as in tests/test_cam_family.py: ``scale_to_unit(ours)`` against its maps, 1e-4.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM, HiResCAM
from pytorch_grad_cam import ScoreCAM as TheirScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from salient_maps.workers.engine import Explainer
from salient_maps.workers.layouts import Layout, layout_of
from salient_maps.workers.methods import build_methods
from salient_maps.workers.methods.base import scale_to_unit
from salient_maps.workers.models import (
    LoadedModel,
    ModelError,
    load_model,
    resolve_layer,
)
from salient_maps.workers.targets import Targets

FACTORIES = Path(__file__).parent / "model_factories.py"


def vit_tokens_to_map(tensor: Tensor) -> Tensor:
    """pytorch-grad-cam's ViT reshape transform (its tutorial), grid side from the token count."""
    side = math.isqrt(tensor.shape[1] - 1)
    result = tensor[:, 1:, :].reshape(tensor.size(0), side, side, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def swin_to_map(tensor: Tensor) -> Tensor:
    """torchvision's Swin keeps B×h×w×C (its tutorial's transform for timm's older B×N×C, reshaped)."""
    return tensor.permute(0, 3, 1, 2)


def loaded(name: str, size: int) -> LoadedModel:
    model = load_model(name, input_size=size)
    if hasattr(model.module, "heads"):  # torchvision ViT: zero-initialised head
        with torch.no_grad():
            torch.manual_seed(1)
            model.module.heads.head.weight.normal_(0, 0.02)
    for p in model.module.parameters():  # pytorch-grad-cam differentiates through the weights
        p.requires_grad_(True)
    return model


MODELS = {
    "vit_b_16": (64, "encoder.layers.encoder_layer_11.ln_1", vit_tokens_to_map, {"kind": "tokens", "prefix_tokens": 1}),
    "swin_t": (64, "features.7.1.norm1", swin_to_map, {"kind": "nhwc"}),
}


@pytest.fixture(scope="module", params=list(MODELS))
def transformer(request) -> tuple[str, LoadedModel]:
    size = MODELS[request.param][0]
    return request.param, loaded(request.param, size)


def images(n: int, size: int, seed: int = 1) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,cam_class", [("gradcam", GradCAM), ("hirescam", HiResCAM)])
def test_gradient_cams_on_transformers_equal_pytorch_grad_cam(transformer, name: str, cam_class):
    arch, model = transformer
    size, layer, reshape, layout = MODELS[arch]
    x = images(2, size)
    explainer = Explainer(model, layer, build_methods([name]), Targets(topk=2), device="cpu")
    assert explainer.layout.params() == layout
    result = explainer.explain(x)
    maps = result.outputs[name].maps
    assert maps.shape == (2, 2, size, size) and maps.amax() > 0
    with cam_class(model=model.module, target_layers=[model.module.get_submodule(layer)],
                   reshape_transform=reshape) as cam:
        for k in range(2):
            theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in result.targets[:, k]])
            np.testing.assert_allclose(scale_to_unit(maps[:, k]).numpy(), theirs, rtol=0, atol=1e-4)


# One masked pass per channel: vit_b_16 at 32 px (a 2×2 grid, 768 channels); Swin's third stage (384).
@pytest.mark.parametrize("arch,size,layer", [("vit_b_16", 32, MODELS["vit_b_16"][1]),
                                             ("swin_t", 64, "features.5.5.norm1")])
def test_scorecam_on_transformers_equals_pytorch_grad_cam(monkeypatch: pytest.MonkeyPatch, arch: str, size: int,
                                                          layer: str):
    """Its masks are upsampled with align_corners=True; swapped for ours (see tests/test_scorecam.py)."""
    monkeypatch.setattr(torch.nn, "UpsamplingBilinear2d",
                        lambda size: nn.Upsample(size=size, mode="bilinear", align_corners=False))
    reshape = MODELS[arch][2]
    model = loaded(arch, size)
    x = images(1, size)
    explainer = Explainer(model, layer, build_methods(["scorecam"], {"scorecam_weights": "logit-softmax"}),
                          Targets(topk=1), device="cpu")
    ours = scale_to_unit(explainer.explain(x).outputs["scorecam"].maps)
    target = int(model.module(x).argmax())
    cam = TheirScoreCAM(model=model.module, target_layers=[model.module.get_submodule(layer)],
                        reshape_transform=reshape)
    cam.batch_size = 256
    theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])
    np.testing.assert_allclose(ours[:, 0].numpy(), theirs, rtol=0, atol=1e-4)


class TinyViT(nn.Module):
    """A two-block ViT: 4-px patches of a 16-px image (a 4×4 grid), a class token and ``registers``
    register tokens, pre-norm blocks; the head reads the class token."""

    def __init__(self, registers: int = 0, dim: int = 8, classes: int = 5):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.prefix = nn.Parameter(torch.randn(1, 1 + registers, dim))
        self.position = nn.Parameter(torch.randn(1, 16, dim) * 0.1)
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(2))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        patches = self.patch(x).flatten(2).transpose(1, 2) + self.position
        tokens = torch.cat([self.prefix.expand(len(x), -1, -1), patches], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens)[:, 0])


class TinyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def tiny_loaded(module: nn.Module) -> LoadedModel:
    torch.manual_seed(0)
    for p in module.parameters():
        p.requires_grad_(False)
    return LoadedModel(name="tiny", module=module.eval(), weights_digest="0" * 12,
                       class_names=[f"c{i}" for i in range(5)], input_size=16)


def brute_force_gradcam(module: nn.Module, layer: nn.Module, x: Tensor, target: int, prefix: int,
                        hires: bool = False) -> Tensor:
    """One image: the token tensor's own gradient, token (1 + prefix - 1 + i·4 + j) read as pixel (i, j)."""
    kept = []
    handle = layer.register_forward_hook(lambda _m, _i, out: kept.append(out.requires_grad_(True)) or out)
    try:
        with torch.enable_grad():
            score = module(x[None])[0, target]
            tokens = kept[0]
            (grad,) = torch.autograd.grad(score, tokens)
    finally:
        handle.remove()
    cam = torch.zeros(4, 4)
    channel_weights = grad[0, prefix:].mean(dim=0)
    for i in range(4):
        for j in range(4):
            t = prefix + 4 * i + j
            weights = grad[0, t] if hires else channel_weights
            cam[i, j] = (weights * tokens[0, t].detach()).sum()
    cam = cam.clamp_min(0)
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    return F.interpolate(cam[None, None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("name", ["gradcam", "hirescam"])
def test_tiny_transformer_equals_a_brute_force_gradcam(registers: int, name: str):
    torch.manual_seed(registers)
    model = tiny_loaded(TinyViT(registers))
    from salient_maps.workers.layouts import survey_layers

    survey = survey_layers(model.module, 16)
    model.layer_candidates, model.layer_layouts = survey.candidates, survey.layouts
    model.default_layer = survey.default()
    assert model.default_layer == "blocks.1.norm1"  # the last block's first norm
    assert survey.layouts["blocks.1.norm1"] == Layout("tokens", 1 + registers)
    x = images(3, 16)
    result = Explainer(model, "blocks.1.norm1", build_methods([name]), Targets(topk=2), device="cpu").explain(x)
    for b in range(3):
        for k in range(2):
            expected = brute_force_gradcam(model.module, model.module.blocks[1].norm1, x[b],
                                           int(result.targets[b, k]), 1 + registers, hires=name == "hirescam")
            torch.testing.assert_close(result.outputs[name].maps[b, k], expected, rtol=0, atol=1e-5)


def test_tiny_transformer_scorecam_masks_with_the_upsampled_patch_maps():
    """Score-CAM (probability weights) by hand: channel c's 4×4 patch map, min-max scaled and upsampled,
    masks the input; the class probability on the masked image weights that map."""
    torch.manual_seed(3)
    model = tiny_loaded(TinyViT(1))
    model.layer_layouts = {"blocks.1.norm1": Layout("tokens", 2)}
    x = images(1, 16)
    result = Explainer(model, "blocks.1.norm1", build_methods(["scorecam"]), Targets(topk=1),
                       device="cpu").explain(x)
    kept = []
    handle = model.module.blocks[1].norm1.register_forward_hook(lambda _m, _i, out: kept.append(out))
    with torch.no_grad():
        target = int(model.module(x).argmax())
    handle.remove()
    tokens = kept[0][0, 2:]  # 16×C, row-major patches
    cam = torch.zeros(4, 4)
    for c in range(tokens.shape[1]):
        small = tokens[:, c].reshape(4, 4)
        up = F.interpolate(small[None, None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
        mask = (up - up.min()) / (up.max() - up.min())
        with torch.no_grad():
            probability = model.module(x * mask).softmax(dim=1)[0, target]
        cam += probability * small
    cam = cam.clamp_min(0)
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    expected = F.interpolate(cam[None, None], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(result.outputs["scorecam"].maps[0, 0], expected, rtol=0, atol=1e-5)


def test_channel_last_maps_equal_their_channel_first_twin():
    """A B×h×w×C layer gives the map its permuted B×C×h×w twin gives (same weights, same maths)."""

    class Net(nn.Module):
        def __init__(self, channel_last: bool):
            super().__init__()
            self.channel_last = channel_last
            self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
            self.mix = nn.Identity()
            self.head = nn.Linear(6, 5)

        def forward(self, x):
            h = self.conv(x).relu()
            if self.channel_last:
                return self.head(self.mix(h.permute(0, 2, 3, 1)).mean(dim=(1, 2)))
            return self.head(self.mix(h).mean(dim=(2, 3)))

    torch.manual_seed(0)
    last, first = Net(True), Net(False)
    first.load_state_dict(last.state_dict())
    x = images(2, 16)
    maps = {}
    for net in (last, first):
        model = tiny_loaded(net)
        model.layer_layouts = {"mix": layout_of(torch.zeros(1, 8, 8, 6), None)} if net.channel_last else {}
        result = Explainer(model, "mix", build_methods(["gradcam", "scorecam", "eigencam"]), Targets(topk=2),
                           device="cpu").explain(x)
        maps[net.channel_last] = result.outputs
    for name in ("gradcam", "scorecam", "eigencam"):
        torch.testing.assert_close(maps[True][name].maps, maps[False][name].maps, rtol=0, atol=1e-6)


def test_layouts_are_read_from_shapes():
    assert layout_of(torch.zeros(1, 768, 14, 14), None) == Layout("nchw")
    assert layout_of(torch.zeros(1, 7, 7, 768), None) == Layout("nhwc")
    assert layout_of(torch.zeros(1, 197, 768), 1) == Layout("tokens", 1)
    assert layout_of(torch.zeros(1, 198, 192), None) == Layout("tokens", 2)  # DeiT: class + distillation
    assert layout_of(torch.zeros(1, 201, 384), 5) == Layout("tokens", 5)  # class + 4 registers
    assert layout_of(torch.zeros(1, 1000), None) is None
    assert layout_of(torch.zeros(1, 768, 1, 1), None) is None


def test_a_model_without_any_map_names_its_layers_and_still_gets_input_gradients():
    model = load_model(f"{FACTORIES}:flat_mlp", input_size=16)
    with pytest.raises(ModelError, match=r"no layer with a spatial feature map .* token grid.*1 \[1, 32\]"):
        resolve_layer(model, None)
    assert resolve_layer(model, None, needed=False) is None
    result = Explainer(model, None, build_methods(["saliency"]), Targets(topk=1), device="cpu").explain(
        images(1, model.input_size))
    assert torch.isfinite(result.outputs["saliency"].maps).all()


def test_input_gradient_methods_run_on_a_transformer_and_guided_backprop_warns_without_relu():
    model = tiny_loaded(TinyViT(1))
    methods = build_methods(["saliency", "integrated_gradients", "guided_backprop"], {"steps": 4})
    with pytest.warns(UserWarning, match="calls no ReLU/ReLU6: its guided backpropagation is the plain gradient"):
        result = Explainer(model, None, methods, Targets(topk=2), device="cpu").explain(images(2, 16))
    for name in ("saliency", "integrated_gradients", "guided_backprop"):
        maps = result.outputs[name].maps
        assert torch.isfinite(maps).all() and (maps.flatten(2).amax(-1) > 0).all()
    torch.testing.assert_close(result.outputs["guided_backprop"].maps, result.outputs["saliency"].maps)
