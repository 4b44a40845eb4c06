"""salient visualize-class: gradient ascent on the input raises the class score; the image is stored and recorded."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from sqlalchemy import select
from torch import nn

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

from salient_maps.storage.database import ClassVisualization, connect
from salient_maps.workers.class_visualization import visualize_class
from salient_maps.workers.models import LoadedModel

SIZE = 32
LR = 1.0


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    net[-1].weight.mul_(100)  # a random network's class scores barely depend on the input otherwise
    return LoadedModel(name="tiny", module=net, weights_digest="0" * 12, class_names=list("abcd"), input_size=SIZE)


def test_gradient_ascent_raises_the_class_logit(model):
    image = visualize_class(model, 2, steps=30, lr=LR, l2=1e-3, device="cpu")
    scores = np.array(image.scores)
    assert len(scores) == 31 and scores[-1] > scores[0] + 1.0
    assert (np.diff(scores) > 0).mean() >= 0.9  # monotonic, but for the odd overshoot
    assert image.rgb.shape == (SIZE, SIZE, 3) and image.rgb.dtype == np.uint8


def test_first_step_is_one_plain_gradient_step_from_the_mean_image(model):
    lr = LR
    image = visualize_class(model, 1, steps=1, lr=lr, l2=1e-3, device="cpu")
    x = torch.zeros(1, 3, SIZE, SIZE, requires_grad=True)
    (grad,) = torch.autograd.grad(model.module(x)[0, 1], x)  # the L2 term's gradient is 0 at x = 0
    with torch.no_grad():
        expected = [model.module(torch.zeros_like(x))[0, 1].item(), model.module(lr * grad)[0, 1].item()]
    np.testing.assert_allclose(image.scores, expected, rtol=1e-5)
    mean = np.array(model.mean) * 255
    assert np.abs(visualize_class(model, 1, steps=0, device="cpu").rgb - mean).max() <= 0.5  # the mean image


def test_a_stronger_l2_penalty_keeps_the_image_closer_to_the_mean(model):
    def spread(l2: float) -> float:
        rgb = visualize_class(model, 3, steps=20, lr=LR, l2=l2, device="cpu").rgb.astype(float)
        return np.abs(rgb - np.array(model.mean) * 255).mean()

    assert spread(0.3) < 0.5 * spread(0.0)
    with pytest.raises(ValueError, match="must be below 1"):
        visualize_class(model, 3, steps=1, lr=LR, l2=1 / LR, device="cpu")


def test_cli_stores_the_image_and_records_a_row_once(tmp_path, run_cli, model):
    path = tmp_path / "tiny.pt"
    torch.jit.script(model.module).save(str(path))
    args = ["visualize-class", "--model", path, "--class", "2", "--steps", "5", "--lr", "1", "--device", "cpu",
            "--out", tmp_path / "out"]
    result = run_cli(args)
    assert "class_2 (2): logit" in result.output
    run_cli(args)
    with connect(f"sqlite:///{tmp_path / 'out' / 'salient.db'}").connect() as conn:
        rows = conn.execute(select(ClassVisualization)).all()
    assert len(rows) == 1
    row = rows[0]._mapping
    assert row["class_id"] == 2 and row["final_score"] > row["initial_score"]
    assert row["params"]["steps"] == 5 and row["model"].startswith("tiny-")
    png = cv2.imdecode(np.frombuffer((tmp_path / "out" / "objects" / row["image_key"]).read_bytes(), np.uint8),
                       cv2.IMREAD_COLOR)
    assert png.shape == (224, 224, 3)
    run_cli(["visualize-class", "--model", path, "--class", "zebra", "--out", tmp_path / "out"], expect_exit=1)
