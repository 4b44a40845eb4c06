"""`salient sanity`: the randomisation cascade tells a method that reads the model (Grad-CAM) from one
that only reads the image (a test-only edge detector), and its pieces are right on their own."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from salient_maps.workers.images import to_input
from salient_maps.workers.methods.base import ForwardPass, Method, MethodOutput, scale_to_unit
from salient_maps.workers.methods.gradcam import GradCAM
from salient_maps.workers.models import load_model
from salient_maps.workers.sanity import cascade_stops, run_cascade, spearman, ssim, weight_layers


class EdgeDetector(Method):
    """Test-only "explanation": Sobel gradient magnitude of the input's grey level. It never looks at
    the model, so randomising the model must not change it."""

    name = "test_edges"

    def explain(self, fp: ForwardPass) -> MethodOutput:
        grey = fp.x.detach().float().mean(dim=1, keepdim=True)
        kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=grey.device).view(1, 1, 3, 3)
        edges = torch.sqrt(F.conv2d(grey, kx, padding=1) ** 2 + F.conv2d(grey, kx.transpose(2, 3), padding=1) ** 2)
        return MethodOutput(maps=scale_to_unit(edges.expand(-1, fp.targets.shape[1], -1, -1)))


@pytest.fixture(scope="module")
def small_model():
    return load_model("resnet18")  # random init, seeded


def inputs(smooth_rgb, model, n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.stack([to_input(smooth_rgb(size, size, seed=i), size, model.mean, model.std) for i in range(n)])


def test_gradcam_decorrelates_while_an_image_only_method_stays(small_model, smooth_rgb):
    x = inputs(smooth_rgb, small_model)
    weights_before = small_model.module.fc.weight.clone()
    layers, steps = run_cascade(small_model, "layer4", [GradCAM(), EdgeDetector()], x, topk=2, stops=4, device="cpu")
    assert layers[0] == "fc" and layers[-1] == "conv1"
    assert [s.randomised for s in steps] == [1, 8, 14, 21]
    for step in steps:
        assert step.scores["test_edges"]["spearman"] == pytest.approx(1.0, abs=1e-9)
        assert step.scores["test_edges"]["ssim"] == pytest.approx(1.0, abs=1e-9)
    gradcam = [s.scores["gradcam"]["spearman"] for s in steps]
    assert min(gradcam) < 0.5, gradcam  # well below 1: Grad-CAM depends on the weights
    assert torch.equal(small_model.module.fc.weight, weights_before)  # the caller's model is untouched


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(6, 40)).astype(float)  # many ties
    b = a + rng.normal(0, 1.5, size=a.shape)
    want = [spearmanr(x, y).statistic for x, y in zip(a, b)]
    np.testing.assert_allclose(spearman(a, b), want, atol=1e-12)
    constant = np.zeros((2, 40))
    np.testing.assert_array_equal(spearman(constant, np.stack([constant[0], a[0]])), [1.0, 0.0])


def test_ssim_is_one_for_equal_maps_and_lower_for_different_ones():
    rng = np.random.default_rng(1)
    maps = rng.random((2, 32, 32))
    np.testing.assert_allclose(ssim(maps, maps), 1.0)
    assert (ssim(maps, 1 - maps) < 0).all()


def test_cascade_stops_and_layer_order(small_model):
    assert cascade_stops(21, 4) == [1, 8, 14, 21]
    assert cascade_stops(3, 8) == [1, 2, 3]
    order = weight_layers(small_model.module, 64)
    assert order[0] == "conv1" and order[-1] == "fc" and len(order) == 21  # 20 convolutions (3 shortcut) + fc
    assert not any("bn" in name for name in order)


def test_cli_checks_a_job_and_stores_the_result(tiny_images, run_cli, tmp_path):
    images = tiny_images(2)
    data = tmp_path / "data"
    run_cli(["run", images, "--model", "resnet18", "--topk", "1", "--methods", "gradcam", "--out", data])
    job_id = sqlite3.connect(data / "salient.db").execute("SELECT id FROM jobs").fetchone()[0]
    result = run_cli(["sanity", "--job", job_id, "--data", data, "--sample", "1", "--stops", "2",
                      "--out", tmp_path / "checks"])
    assert "gradcam" in result.output and "SSIM" in result.output
    saved = json.loads((tmp_path / "checks" / f"sanity-{job_id}.json").read_text())
    assert [s["randomised"] for s in saved["steps"]] == [1, 21] and len(saved["images"]) == 1
    assert set(saved["steps"][0]["scores"]["gradcam"]) == {"spearman", "spearman_std", "ssim", "ssim_std"}
    assert (data / "objects" / "sanity" / f"{job_id}.json").read_bytes() == \
        (tmp_path / "checks" / f"sanity-{job_id}.json").read_bytes()
    run_cli(["sanity", "--data", data], expect_exit=2)  # neither a job nor sources
