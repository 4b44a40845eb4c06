"""Model loading, target-layer detection, weights files (including hostile ones) and the bundled trained model."""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from salient_maps.workers.images import to_input
from salient_maps.workers.models import ModelError, load_model, resolve_layer

# (auto layer, its output channels, its spatial size at 224 px): the last spatial map before global pooling
# (or, for VGG/AlexNet, before the last max-pool that feeds the classifier).
EXPECTED_LAYERS = {
    "resnet18": ("layer4", 512, 7),
    "resnet50": ("layer4", 2048, 7),
    "vgg16": ("features.29", 512, 14),
    "alexnet": ("features.11", 256, 13),
    "squeezenet1_1": ("classifier.2", 1000, 13),  # ReLU of the 1×1 class conv, then global average pool
    "googlenet": ("inception5b", 1024, 7),
    "mobilenet_v2": ("features", 1280, 7),
    "efficientnet_b0": ("features", 1280, 7),
    "densenet121": ("features", 1024, 7),
}


def layer_output_shape(module: torch.nn.Module, layer: str, device: str) -> tuple[int, ...]:
    shapes = []
    handle = module.get_submodule(layer).register_forward_hook(lambda _m, _i, out: shapes.append(out.shape))
    try:
        module(torch.zeros(1, 3, 224, 224, device=device))
    finally:
        handle.remove()
    return tuple(shapes[-1])


@pytest.mark.parametrize("name", list(EXPECTED_LAYERS))
def test_every_listed_torchvision_model_gets_the_last_spatial_map(name):
    # The meta device runs the real load_model and layer search on shapes only: the architecture decides the
    # layer, and nine networks cost well under a second each instead of ~60 s of CPU forwards.
    with torch.device("meta"):
        loaded = load_model(name)
        layer, channels, size = EXPECTED_LAYERS[name]
        assert resolve_layer(loaded, None) == layer
        assert layer_output_shape(loaded.module, layer, "meta") == (1, channels, size, size)
    assert loaded.class_names[285] == "Egyptian cat" and len(loaded.class_names) == 1000


def test_wrong_layer_names_the_candidates():
    with torch.device("meta"):
        loaded = load_model("resnet18")
    with pytest.raises(ModelError, match=r"no spatial layer 'layer9' in resnet18; candidates .*layer4\.1, layer4$"):
        resolve_layer(loaded, "layer9")
    with pytest.raises(ModelError, match="no spatial layer 'fc'"):  # exists, but has no spatial map
        resolve_layer(loaded, "fc")
    assert resolve_layer(loaded, "layer3.1.conv2") == "layer3.1.conv2"


def test_wrong_layer_fails_on_the_cli_before_any_work(run_cli, tiny_images, tmp_path):
    images = tiny_images(2)
    out = tmp_path / "out"
    result = run_cli(["run", images, "--model", "resnet18", "--layer", "layer9", "--out", out], expect_exit=1)
    assert "no spatial layer 'layer9'" in result.output and "layer4" in result.output
    assert not out.exists()  # no database, no objects: nothing was started


def test_unknown_model_lists_the_choices():
    with pytest.raises(ModelError, match="unknown model 'resnet19'.*resnet18"):
        load_model("resnet19")


@pytest.fixture(scope="module")
def resnet18_other_weights(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A resnet18 state dict that differs from salient's seed-0 random init, and the module it came from."""
    torch.manual_seed(1234)
    source = torchvision.models.resnet18().eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18-custom.pt"
    torch.save(source.state_dict(), path)
    return path, source


def test_state_dict_round_trip_gives_the_same_outputs(resnet18_other_weights, tmp_path):
    path, source = resnet18_other_weights
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    loaded = load_model("resnet18", weights=path)
    with torch.no_grad():
        expected = source(x)
        np.testing.assert_array_equal(loaded.module(x).numpy(), expected.numpy())
        torch.manual_seed(0)  # salient's own random init, which the weights file must have replaced
        assert not torch.allclose(torchvision.models.resnet18().eval()(x), expected)
    assert loaded.weights_digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.tag == f"resnet18-{loaded.weights_digest[:12]}"
    assert not any(p.requires_grad for p in loaded.module.parameters()) and not loaded.module.training

    wrapped = tmp_path / "checkpoint.pt"  # the common {"state_dict": ...} checkpoint layout
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, wrapped)
    with torch.no_grad():
        np.testing.assert_array_equal(load_model("resnet18", weights=wrapped).module(x).numpy(), expected.numpy())


def test_weights_of_another_architecture_are_a_clear_error(resnet18_other_weights, tmp_path):
    path, _ = resnet18_other_weights
    with pytest.raises(ModelError, match=r"do not fit the model: missing \['features\.0\.weight'"):
        load_model("squeezenet1_1", weights=path)
    head10 = tmp_path / "head10.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), head10)
    with pytest.raises(ModelError, match=r"do not fit the model: size mismatch for fc\.weight"):
        load_model("resnet18", weights=head10)
    not_a_dict = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), not_a_dict)
    with pytest.raises(ModelError, match="holds a Tensor, not a state dict"):
        load_model("resnet18", weights=not_a_dict)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ModelError, match=r"cannot load weights \S+garbage\.pt: not a readable PyTorch weights file"):
        load_model("resnet18", weights=garbage)


class _CreatesMarker:
    """Unpickling this calls open(marker, "w"): code execution, which a weights file must never get."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_malicious_pickle_weights_do_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"fc.weight": _CreatesMarker(marker)}, evil)
    with pytest.raises(ModelError) as refused:
        load_model("resnet18", weights=evil)
    message = str(refused.value)
    assert re.fullmatch(r"refusing weights \S*evil\.pt: loading it would call code it names \(Unsupported global: "
                        r"GLOBAL io\.open was not an allowed global by default\); .*weights_only=True.*", message)
    assert "weights_only=False" not in message and "\x1b" not in message and "\n" not in message
    assert not marker.exists()
    # control: the file really is hostile, so the refusal above is what protected us
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_malicious_plain_pickle_weights_do_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(_CreatesMarker(marker), protocol=2))  # a protocol torch's unpickler parses
    with pytest.raises(ModelError, match="refusing weights .*Unsupported global"):
        load_model("resnet18", weights=evil)
    assert not marker.exists()


@pytest.fixture(scope="module")
def bundled():
    return load_model()


@pytest.mark.parametrize("sample, expected_class, min_probability", [("chelsea", 285, 0.7), ("coffee", 967, 0.7)])
def test_bundled_model_is_trained(bundled, sample, expected_class, min_probability):
    import skimage.data

    assert bundled.name == "efficientnet_lite0" and resolve_layer(bundled, None) == "bn2"
    x = to_input(getattr(skimage.data, sample)(), bundled.input_size, bundled.mean, bundled.std)
    with torch.no_grad():
        probs = bundled.module(x[None]).softmax(dim=1)[0]
    assert int(probs.argmax()) == expected_class
    assert float(probs[expected_class]) > min_probability  # measured: chelsea 0.777, coffee 0.832
    if sample == "chelsea":
        assert set(probs.topk(3).indices.tolist()) <= set(range(281, 286))  # all three are cats
