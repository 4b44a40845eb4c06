"""Result shards give back, for every method, the map the method returned (what was stored per map before
shards: its float16 .npy at the input size) and its arrays; safetensors itself reads them without salient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.numpy import load as safetensors_load

from salient_maps.storage.shards import FORMAT, Shard, ShardError, encode, shard_key, upsample
from salient_maps.workers.engine import Explainer
from salient_maps.workers.methods import build_methods
from salient_maps.workers.methods.base import Method, MethodOutput, scale_to_unit
from salient_maps.workers.models import LoadedModel
from salient_maps.workers.targets import Targets
from salient_maps.workers.writer import shard_tensors

SIZE = (112, 144)  # not square: the layer map is 4×5 on layer4, 7×9 on layer3
TOPK = 2
CAMS = ("gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "eigencam", "scorecam")
INPUT_GRADIENTS = ("saliency", "guided_backprop", "guided_gradcam", "integrated_gradients")
FP16_STEP = float(np.spacing(np.float16(1)))  # one float16 step just below 1


class Edges(Method):
    """A method with neither layer maps nor an attribution: its maps and arrays are stored as they come."""

    name = "edges"

    def explain(self, fp):
        edges = (fp.x[:, :1, :, 1:] - fp.x[:, :1, :, :-1]).abs().detach().float()
        maps = scale_to_unit(F.pad(edges, (0, 1)).expand(-1, fp.targets.shape[1], -1, -1))
        return MethodOutput(maps=maps, arrays={"raw": edges.unsqueeze(1).expand(-1, fp.targets.shape[1], -1, -1, -1)})


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None).eval()
    return LoadedModel(name="test", module=module, weights_digest="test", class_names=[str(i) for i in range(1000)])


def explained(model: LoadedModel, methods: list[Method], layer: str = "layer4"):
    """(the batch result, the shard read back) for 3 images × TOPK targets."""
    x = torch.randn(3, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    explainer = Explainer(model, layer, methods, Targets(topk=TOPK), device="cpu")
    result = explainer.explain(x)
    tensors, described = shard_tensors(methods, result.outputs)
    data = encode(tensors, {"format": FORMAT, "input_size": list(SIZE), "targets": TOPK, "methods": described})
    return result, Shard(data), data


def old_map(result, name: str, i: int, k: int) -> np.ndarray:
    """What was stored for this map before shards: the method's map at the input size, as float16."""
    return result.outputs[name].maps[i, k].numpy().astype(np.float16)


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_cam_maps_are_stored_at_the_layer_size_and_upsample_to_the_old_map(model, layer):
    methods = build_methods(list(CAMS), {"max_channels": 32})  # Score-CAM on 32 channels keeps the test short
    result, shard, _ = explained(model, methods, layer)
    side = {"layer4": (4, 5), "layer3": (7, 9)}[layer]
    for name in CAMS:
        for i in range(3):
            for k in range(TOPK):
                slot = i * TOPK + k
                small = shard.map(name, slot, "layer")
                assert small.shape == side and small.dtype == np.float32
                # the stored layer map is exactly what the method upsampled (torch, as the method does)
                again = F.interpolate(torch.from_numpy(small)[None, None], size=SIZE, mode="bilinear",
                                      align_corners=False)[0, 0].clamp(0, 1)
                assert torch.equal(again, result.outputs[name].maps[i, k]), (name, slot)
                # and salient's numpy reader gives the old stored map back (to float rounding)
                ours = shard.map(name, slot)
                assert ours.shape == SIZE
                np.testing.assert_allclose(ours, result.outputs[name].maps[i, k].numpy(), rtol=0, atol=1e-6)
                assert np.abs(ours.astype(np.float16).astype(np.float32)
                              - old_map(result, name, i, k).astype(np.float32)).max() <= FP16_STEP, (name, slot)


def test_input_gradient_methods_keep_only_their_fp16_attribution_and_derive_the_rest(model):
    methods = build_methods(list(INPUT_GRADIENTS), {"steps": 4})
    result, shard, data = explained(model, methods)
    stored = set(safetensors_load(data))
    assert stored == {"saliency.gradient", "guided_backprop.gradient", "guided_gradcam.guided_gradcam",
                      "integrated_gradients.attribution"}
    for name in INPUT_GRADIENTS:
        out = result.outputs[name]
        for i in range(3):
            for k in range(TOPK):
                slot = i * TOPK + k
                signed = shard.array(name, slot, out.attribution)
                # the raw attribution comes back exactly as the old float16 .npy held it
                np.testing.assert_array_equal(signed.astype(np.float16),
                                              out.arrays[out.attribution][i, k].numpy().astype(np.float16))
                # the map, derived from the float16 attribution, is the old map to float16 precision
                np.testing.assert_allclose(shard.map(name, slot), old_map(result, name, i, k).astype(np.float32),
                                           rtol=0, atol=2e-3)
    saliency = result.outputs["saliency"]
    assert set(shard.arrays("saliency")) == {"gradient", "color", "gray", "positive", "negative"}
    for rendering in ("color", "gray", "positive", "negative"):
        for slot in range(3 * TOPK):
            np.testing.assert_allclose(shard.array("saliency", slot, rendering),
                                       saliency.arrays[rendering][slot // TOPK, slot % TOPK].numpy(), rtol=0, atol=2e-3)


def test_other_methods_are_stored_as_they_come(model):
    result, shard, _ = explained(model, [Edges()])
    out = result.outputs["edges"]
    for slot in range(3 * TOPK):
        i, k = divmod(slot, TOPK)
        np.testing.assert_array_equal(shard.map("edges", slot), old_map(result, "edges", i, k).astype(np.float32))
        np.testing.assert_array_equal(shard.array("edges", slot, "raw"),
                                      out.arrays["raw"][i, k].numpy().astype(np.float16).astype(np.float32))


def test_numpy_upsampling_matches_torch():
    rng = np.random.default_rng(0)
    for small, size in [((7, 7), (224, 224)), ((7, 9), (224, 300)), ((1, 1), (5, 8)), ((14, 14), (224, 224)),
                        ((3, 5), (17, 33)), ((7, 7), (7, 7))]:
        layer = rng.random(small, dtype=np.float32)
        expected = F.interpolate(torch.from_numpy(layer)[None, None], size=size, mode="bilinear",
                                 align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(upsample(layer, size), expected, rtol=0, atol=1e-6)


def test_the_format_is_plain_safetensors_and_keys_follow_the_content():
    tensors = {"a.layer": np.arange(12, dtype=np.float32).reshape(3, 2, 2), "thumbnail.0": np.arange(5, dtype=np.uint8)}
    data = encode(tensors, {"format": FORMAT, "input_size": [4, 4], "targets": 1, "methods": {"a": {"map": "layer"}}})
    loaded = safetensors_load(data)
    assert set(loaded) == set(tensors) and all(np.array_equal(loaded[n], tensors[n]) for n in tensors)
    assert shard_key(data) == shard_key(bytes(data)) and shard_key(data) != shard_key(data + b" ")
    assert shard_key(data).startswith("shards/") and shard_key(data).endswith(".safetensors")
    assert Shard(data).thumbnail(0) == bytes(range(5)) and Shard(data).thumbnail(1) is None
    with pytest.raises(ShardError, match="not a salient result shard"):
        Shard(encode(tensors, {}) .replace(b'"salient"', b'"other  "')).map("a", 0)
    with pytest.raises(ShardError, match="no method"):
        Shard(data).map("b", 0)
