"""Faithfulness metrics: the batched implementation against a one-image-at-a-time loop written from the
papers' definitions, a hand-built model where the right answer is known, and the stored results of a run."""

from __future__ import annotations

import json
import sqlite3

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from salient_maps.workers.metrics import Faithfulness

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def small_cnn(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes),
    ).eval()


def brute_force(model, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, steps: int) -> dict:
    """The definitions, one perturbed image per forward, pixels chosen and replaced with numpy."""
    mean, std = np.array(MEAN).reshape(3, 1, 1), np.array(STD).reshape(3, 1, 1)

    def prob(image: np.ndarray, cls: int) -> float:
        with torch.no_grad():
            logits = model(torch.from_numpy(image.astype(np.float32))[None])
        return float(logits.softmax(1)[0, cls])

    out = {key: np.zeros(targets.shape) for key in ("deletion_auc", "insertion_auc", "drop")}
    out["deletion_curve"] = np.zeros((*targets.shape, steps + 1))
    out["insertion_curve"] = np.zeros((*targets.shape, steps + 1))
    for b in range(x.shape[0]):
        image = x[b].numpy().astype(np.float64)
        pixels = image * std + mean  # back to [0, 1] RGB
        black = (0 - mean) / std * np.ones_like(image)
        # RISE's blur, done by OpenCV (reflect-101 border = torch's reflect): kernel 11 / sigma 5 at 224 px.
        scale = image.shape[-1] / 224
        kernel = max(3, int(round(11 * scale)) | 1)
        blurred = np.stack([cv2.GaussianBlur(c.astype(np.float32), (kernel, kernel), 5 * scale,
                                             borderType=cv2.BORDER_REFLECT_101) for c in image])
        for k in range(targets.shape[1]):
            cls = int(targets[b, k])
            m = maps[b, k].numpy()
            order = np.argsort(-m.ravel(), kind="stable")
            h, w = m.shape
            for s in range(steps + 1):
                chosen = np.zeros(h * w, bool)
                chosen[order[: s * h * w // steps]] = True
                chosen = chosen.reshape(h, w)
                deleted = np.where(chosen, black, image)
                inserted = np.where(chosen, image, blurred)
                out["deletion_curve"][b, k, s] = prob(deleted, cls)
                out["insertion_curve"][b, k, s] = prob(inserted, cls)
            y = prob(image, cls)
            o = prob((pixels * m - mean) / std, cls)
            out["drop"][b, k] = max(0.0, y - o) / y
    for curve in ("deletion", "insertion"):
        out[f"{curve}_auc"] = np.trapezoid(out[f"{curve}_curve"], dx=1 / steps, axis=-1)
    return out


def test_batched_metrics_match_a_brute_force_loop():
    model = small_cnn()
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    # Maps with ties (8 levels) check that both sides break them by pixel order.
    maps = (torch.rand(3, 2, 32, 32) * 8).floor() / 7
    targets = torch.tensor([[0, 3], [1, 2], [4, 0]])
    metrics = Faithfulness(steps=5, batch_size=7)  # 7 does not divide the 3·2·6 variants: chunk edges are crossed
    got = metrics.evaluate(model, x, maps, targets, MEAN, STD)
    want = brute_force(model, x, maps, targets, steps=5)
    for key in ("deletion_curve", "insertion_curve", "deletion_auc", "insertion_auc", "drop"):
        np.testing.assert_allclose(got[key].numpy(), want[key], atol=2e-5, err_msg=key)
    assert got["increase"].dtype == torch.bool
    assert metrics.forwards_per_explanation() == 2 * 6 + 1


class LeftHalfDetector(nn.Module):
    """Class 0's logit is 20 × the mean red value of the left half; class 1's is a constant 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = x[:, 0] * STD[0] + MEAN[0]
        left = red[:, :, : x.shape[-1] // 2].mean(dim=(1, 2))
        return torch.stack([20 * (left - 0.5), torch.zeros_like(left)], dim=1)


def test_a_map_on_the_evidence_scores_better_than_one_off_it():
    x = (torch.ones(1, 3, 16, 16) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    left = torch.zeros(16, 16)
    left[:, :8] = 1.0
    maps = torch.stack([left, 1 - left]).unsqueeze(0)  # 1×2 maps: on the evidence, off it
    targets = torch.tensor([[0, 0]])
    got = Faithfulness(steps=4, baseline="black").evaluate(LeftHalfDetector(), x, maps, targets, MEAN, STD)
    on, off = 0, 1
    assert got["deletion_auc"][0, on] < got["deletion_auc"][0, off] - 0.2
    assert got["insertion_auc"][0, on] > got["insertion_auc"][0, off] + 0.2
    assert got["drop"][0, on] == pytest.approx(0, abs=1e-6)  # image × map keeps the whole left half
    assert got["drop"][0, off] > 0.9


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown metric"):
        Faithfulness(metrics=("deletion", "pointing"))
    with pytest.raises(ValueError, match="baseline"):
        Faithfulness(baseline="grey")
    assert Faithfulness(metrics=("drop",)).params() == {"metrics": ["drop"], "score": "probability"}


def test_run_stores_metrics_with_each_explanation(tiny_images, run_cli, tmp_path):
    images = tiny_images(2)
    out = tmp_path / "data"
    run_cli(["run", images, "--model", "resnet18", "--topk", "1", "--methods", "gradcam,saliency", "--out", out,
             "--metrics", "deletion,insertion,drop", "--metric-steps", "3"])
    rows = sqlite3.connect(out / "salient.db").execute("SELECT score, extra FROM explanations").fetchall()
    assert len(rows) == 4
    for score, extra in rows:
        metrics = json.loads(extra)["metrics"]
        assert set(metrics) == {"deletion_curve", "deletion_auc", "insertion_curve", "insertion_auc",
                                "masked_score", "drop", "increase"}
        assert len(metrics["deletion_curve"]) == len(metrics["insertion_curve"]) == 4
        # Deleting nothing and inserting everything leave the image as it was: the explained class's score.
        assert metrics["deletion_curve"][0] == pytest.approx(score, abs=1e-4)
        assert metrics["insertion_curve"][-1] == pytest.approx(score, abs=1e-4)
        assert 0 <= metrics["deletion_auc"] <= 1 and 0 <= metrics["drop"] <= 1
        assert json.loads(extra)["metric_settings"]["insertion"] == {"steps": 3, "baseline": "blurred"}
