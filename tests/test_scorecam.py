"""Score-CAM: each weight definition against a brute-force loop (one masked image per forward, fp32,
every channel including the constant ones), against pytorch-grad-cam, and the cost claims (masked
passes streamed in batches, all target classes from the same passes).

Tolerances: 1e-5 on the [0, 1] maps against the brute force (batched vs single-image convolutions
differ by float rounding only); 1e-4 against pytorch-grad-cam (it adds 1e-8 to each mask's range
and resizes with cv2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from salient_maps.workers.engine import Explainer
from salient_maps.workers.methods import build_methods
from salient_maps.workers.methods.base import ForwardPass, cam_to_maps, scale_to_unit
from salient_maps.workers.methods.scorecam import WEIGHT_DEFINITIONS, ScoreCAM, upsampled_range
from salient_maps.workers.models import LoadedModel
from salient_maps.workers.targets import Targets

SIZE = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyNet(nn.Module):
    """conv-relu-conv-relu-pool-linear, 10 classes (top probability ~0.25). The target layer is
    ``features.2`` (the second conv, before its ReLU), so activations are signed; its channels 0-2 have
    zero weights, so each is the constant ``constants[i]`` (a constant channel adds its value times its
    weight to the whole CAM, which matters once the ReLU clips part of it)."""

    def __init__(self, constants: tuple[float, float, float] = (-1.0, 0.5, 0.0)):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 10))
        with torch.no_grad():
            conv = self.features[2]
            conv.weight[:3] = 0
            conv.bias[:3] = torch.tensor(constants)
            self.head[2].weight *= 20  # peaked class probabilities, so the three definitions disagree
        self.eval().requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class CountingNet(nn.Module):
    """Wraps a model and records the batch size of every forward call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls.append(x.shape[0])
        return self.inner(x)


def images(n: int, size: int = SIZE, seed: int = 1) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def forward_pass(model: nn.Module, layer: nn.Module, x: Tensor, k: int = 3) -> ForwardPass:
    """The shared forward, built here without the engine: top-``k`` targets, fp32."""
    captured = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    return ForwardPass(model=model, layer=layer, x=x, logits=logits, activations=captured[0],
                       targets=logits.topk(k, dim=1).indices, autocast=contextlib.nullcontext)


def brute_force_maps(model: nn.Module, fp: ForwardPass, definition: str,
                     channels: list[list[int]] | None = None) -> Tensor:
    """The definition read literally: for every image and every channel (or the listed ``channels``),
    one forward of the input times that channel's upsampled, min-max scaled map (all zeros if constant)."""
    x, acts, targets = fp.x, fp.activations.detach(), fp.targets
    size = x.shape[-2:]
    cams = []
    with torch.no_grad():
        clean = model(x).softmax(dim=1)
        for b in range(len(x)):
            kept = list(range(acts.shape[1])) if channels is None else channels[b]
            scores = []
            for c in kept:
                up = F.interpolate(acts[b, c][None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
                span = up.max() - up.min()
                mask = (up - up.min()) / span if span > 0 else torch.zeros_like(up)
                logits = model((x[b] * mask)[None])[0]
                scores.append(logits[targets[b]] if definition == "logit-softmax" else logits.softmax(0)[targets[b]])
            s = torch.stack(scores)  # C×K
            if definition == "cic-softmax":
                s = s - clean[b, targets[b]]
            weights = s if definition == "probability" else s.softmax(dim=0)
            cams.append(torch.einsum("ck,chw->khw", weights, acts[b, kept]))
    return cam_to_maps(torch.stack(cams), tuple(size))


def constant_channels(acts: Tensor) -> Tensor:
    flat = acts.flatten(2)
    return flat.amax(-1) == flat.amin(-1)  # B×C


@pytest.mark.parametrize(("small", "size"), [(7, (224, 224)), (13, (100, 64)), (2, (64, 64)), (1, (9, 9)), (5, (3, 4))])
def test_upsampled_range_equals_the_range_of_the_resized_map(small: int, size: tuple[int, int]):
    maps = torch.randn(3, 8, small, small, generator=torch.Generator().manual_seed(small))
    resized = F.interpolate(maps, size=size, mode="bilinear", align_corners=False).flatten(2)
    lo, hi = upsampled_range(maps, size)
    torch.testing.assert_close(lo, resized.amin(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(hi, resized.amax(-1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("definition", WEIGHT_DEFINITIONS)
def test_each_definition_equals_the_brute_force_loop(definition: str):
    model = TinyNet()
    fp = forward_pass(model, model.features[2], images(3))
    assert constant_channels(fp.activations)[:, :3].all()  # skipped by Score-CAM, scored by the brute force
    ours = ScoreCAM(definition, masked_batch=7).explain(fp).maps
    assert ours.shape == (3, 3, SIZE, SIZE) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, brute_force_maps(model, fp, definition), rtol=0, atol=1e-5)


def test_definitions_differ():
    """The three definitions are distinct maps here, so the test above can tell them apart."""
    model = TinyNet()
    fp = forward_pass(model, model.features[2], images(3))
    maps = [ScoreCAM(d).explain(fp).maps for d in WEIGHT_DEFINITIONS]
    for i, j in ((0, 1), (1, 2), (0, 2)):
        assert (maps[i] - maps[j]).abs().max() > 0.1


def test_a_nonzero_constant_channel_changes_the_map():
    """Why constant channels get the zero image's score instead of being dropped: with signed
    activations the constant shifts the CAM before the ReLU."""
    fp_with = forward_pass(model := TinyNet(constants=(-1.0, 0.5, 0.0)), model.features[2], images(3))
    fp_without = forward_pass(model := TinyNet(constants=(0.0, 0.0, 0.0)), model.features[2], images(3))
    assert (ScoreCAM().explain(fp_with).maps - ScoreCAM().explain(fp_without).maps).abs().max() > 1e-2


@pytest.mark.parametrize("definition", WEIGHT_DEFINITIONS)
def test_all_constant_activations_give_zero_maps_not_nan(definition: str):
    model = TinyNet()
    model.features[2].weight.zero_()  # every channel is its bias
    fp = forward_pass(model, model.features[2], images(2))
    assert constant_channels(fp.activations).all()
    maps = ScoreCAM(definition).explain(fp).maps
    assert torch.isfinite(maps).all() and (maps == 0).all()


def test_masked_batch_size_does_not_change_the_maps():
    model = TinyNet()
    fp = forward_pass(model, model.features[2], images(3))
    maps = [ScoreCAM("logit-softmax", masked_batch=n).explain(fp).maps for n in (1, 5, 1000)]
    torch.testing.assert_close(maps[0], maps[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(maps[0], maps[2], rtol=0, atol=1e-5)


def test_masked_batch_option_sets_the_batch_and_not_the_result_identity():
    [method] = build_methods(["scorecam"], {"masked_batch": 3, "smooth": 2})
    assert method.batch_size_for((224, 224), 4) == 3
    assert "masked_batch" not in method.params()  # speed and memory only: a rerun with another batch is skipped
    # automatic: the 1.5 GB budget at ~128 bytes per input pixel per element byte
    assert ScoreCAM().batch_size_for((224, 224), 4) == 1536 * 2**20 // (128 * 4 * 224 * 224)
    assert ScoreCAM(memory_budget_mb=1).batch_size_for((224, 224), 4) == 1


def test_images_explained_together_equal_images_explained_alone():
    model = TinyNet()
    x = images(3)
    together = ScoreCAM("cic-softmax", masked_batch=8).explain(forward_pass(model, model.features[2], x)).maps
    alone = torch.cat([ScoreCAM("cic-softmax", masked_batch=8).explain(
        forward_pass(model, model.features[2], x[i:i + 1])).maps for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("constants", [(0.0, 0.0, 0.0), (-1.0, 0.5, 0.0)])
def test_top3_costs_the_masked_passes_of_top1_and_equals_three_single_class_runs(constants):
    """Passes = ceil(non-constant (image, channel) pairs / masked batch), whatever K; plus one
    single-image pass of the zero image when some constant channel is non-zero."""
    model = CountingNet(TinyNet(constants))
    layer = model.inner.features[2]
    fp3 = forward_pass(model, layer, images(3), k=3)
    pairs = int((~constant_channels(fp3.activations)).sum())
    model.calls.clear()
    top3 = ScoreCAM("probability", masked_batch=5).explain(fp3).maps
    zero_image_pass = [1] if any(constants) else []
    assert model.calls == [5] * (pairs // 5) + ([pairs % 5] if pairs % 5 else []) + zero_image_pass
    assert len(model.calls) == math.ceil(pairs / 5) + len(zero_image_pass)
    for k in range(3):
        fp1 = dataclasses.replace(fp3, targets=fp3.targets[:, k:k + 1], _grads={}, _memo={})
        model.calls.clear()
        single = ScoreCAM("probability", masked_batch=5).explain(fp1).maps
        assert len(model.calls) == math.ceil(pairs / 5) + len(zero_image_pass)
        torch.testing.assert_close(top3[:, k:k + 1], single, rtol=0, atol=1e-6)


def test_max_channels_keeps_the_channels_of_largest_variance():
    model = TinyNet()
    fp = forward_pass(model, model.features[2], images(3))
    full = ScoreCAM("logit-softmax").explain(fp).maps
    assert torch.equal(ScoreCAM("logit-softmax", max_channels=12).explain(fp).maps, full)
    variance = fp.activations.flatten(2).numpy().var(axis=-1)
    top5 = [sorted(np.argsort(-v)[:5].tolist()) for v in variance]
    faster = ScoreCAM("logit-softmax", max_channels=5).explain(fp).maps
    torch.testing.assert_close(faster, brute_force_maps(model, fp, "logit-softmax", top5), rtol=0, atol=1e-5)
    assert (faster - full).abs().max() > 1e-3


def test_logit_softmax_equals_pytorch_grad_cam(monkeypatch: pytest.MonkeyPatch):
    """pytorch-grad-cam upsamples the masks with align_corners=True; the paper's code and torchcam (and
    we) use align_corners=False, so its upsampler is swapped for ours. It min-max scales the map again
    after resizing; we compare ``scale_to_unit(ours)`` (see tests/test_cam_family.py)."""
    from pytorch_grad_cam import ScoreCAM as TheirScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    monkeypatch.setattr(torch.nn, "UpsamplingBilinear2d",
                        lambda size: nn.Upsample(size=size, mode="bilinear", align_corners=False))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = images(2, size=64)
    fp = forward_pass(model, model.layer3, x, k=2)
    ours = scale_to_unit(ScoreCAM("logit-softmax", masked_batch=128).explain(fp).maps)
    cam = TheirScoreCAM(model=model, target_layers=[model.layer3])
    cam.batch_size = 128
    for k in range(2):
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in fp.targets[:, k]])
        np.testing.assert_allclose(ours[:, k].numpy(), theirs, rtol=0, atol=1e-4)


def test_options_from_the_cli_and_bf16_through_the_engine():
    model = TinyNet()
    loaded = LoadedModel(name="tiny", module=model, weights_digest="test", class_names=[str(i) for i in range(10)])
    [method] = build_methods(["scorecam"], {"scorecam_weights": "cic-softmax", "max_channels": 6, "steps": 3})
    assert method.params() == {"weights": "cic-softmax", "max_channels": 6}
    x = images(4)
    maps = {precision: Explainer(loaded, "features.2", [method], Targets(topk=2), device="cpu",
                                 precision=precision).explain(x) for precision in ("fp32", "bf16")}
    fp32, bf16 = maps["fp32"].outputs["scorecam"].maps, maps["bf16"].outputs["scorecam"].maps
    assert torch.equal(maps["fp32"].targets, maps["bf16"].targets)
    assert np.corrcoef(fp32.flatten().numpy(), bf16.flatten().numpy())[0, 1] > 0.99
    with pytest.raises(ValueError, match="scorecam_weights"):
        ScoreCAM("softmax")
