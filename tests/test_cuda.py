"""The engine on a CUDA device: every method's maps equal the CPU's, bf16 autocast keeps the maps and the
top-1 class, Score-CAM sizes its masked batch from the GPU's memory, and a whole ``salient run`` completes
there. Skipped where no GPU is present (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision

from salient_maps.workers.engine import BatchResult, Explainer
from salient_maps.workers.methods import METHODS, build_methods
from salient_maps.workers.methods.scorecam import ScoreCAM
from salient_maps.workers.models import LoadedModel, load_model, resolve_layer
from salient_maps.workers.targets import Targets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Per method: the options that exercise it fully (SmoothGrad draws noise, which must not depend on the device).
OPTIONS = {"integrated_gradients": {"steps": 8}, "saliency": {"smooth": 4}}


def resnet18_f64() -> LoadedModel:
    """A random-init resnet18 in float64. In float32 the CPU and the GPU sum in other orders, and in a
    random deep ReLU net a rounding difference can flip a near-zero unit and move a pixel gradient by
    1e-2 (seen on an H200 with TF32 off): float64 leaves only real differences and float32 round-off."""
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None).eval().requires_grad_(False).double()
    return LoadedModel(name="resnet18-random", module=module, weights_digest="0" * 64,
                       class_names=[f"c{i}" for i in range(1000)], layer_candidates=["layer4"])


def photos(model: LoadedModel, size: int) -> torch.Tensor:
    import skimage.data

    from salient_maps.workers.images import to_input

    return torch.stack([to_input(getattr(skimage.data, name)(), size, model.mean, model.std)
                        for name in ("chelsea", "coffee", "astronaut")])


def explain(model: LoadedModel, names: list[str], x: torch.Tensor, device: str, precision: str = "fp32",
            options: dict | None = None) -> BatchResult:
    """A copy of ``model`` on ``device`` (the engine moves the module it is given)."""
    return Explainer(copy.deepcopy(model), resolve_layer(model, None), build_methods(names, options or {}),
                     Targets(topk=2), device=device, precision=precision).explain(x)


@pytest.mark.parametrize("name", list(METHODS))
def test_maps_on_cuda_equal_the_cpu_maps(name: str):
    model = resnet18_f64()
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cpu = explain(model, [name], x, "cpu", options=OPTIONS.get(name))
    gpu = explain(model, [name], x, "cuda", options=OPTIONS.get(name))
    assert gpu.outputs[name].maps.device.type == "cuda"
    assert torch.equal(cpu.targets, gpu.targets.cpu())
    diff = (cpu.outputs[name].maps - gpu.outputs[name].maps.cpu()).abs().max().item()
    # Maps leave the methods in float32 (Score-CAM and Eigen-CAM also compute in it): 2.3e-6 seen on an H200.
    assert diff < 1e-5, f"{name}: max |cpu - cuda| = {diff:.2e}"


@pytest.mark.parametrize("name", ["gradcam", "scorecam"])
def test_bf16_on_cuda_keeps_the_maps_and_the_top_class(name: str):
    """On the trained model and real photos: bf16 autocast against float32, both on the GPU. (Pixel
    gradients are left out: in bf16 they correlate about 0.8 with float32's, on the CPU as well.)"""
    model = load_model()
    x = photos(model, model.input_size)
    full = explain(model, [name], x, "cuda")
    half = explain(model, [name], x, "cuda", precision="bf16")
    assert torch.equal(full.targets[:, 0], half.targets[:, 0])
    for image, (a, b) in enumerate(zip(full.outputs[name].maps.cpu(), half.outputs[name].maps.cpu())):
        for rank, (u, v) in enumerate(zip(a, b), 1):
            corr = np.corrcoef(u.flatten().double(), v.flatten().double())[0, 1]
            # the second class's map rests on a smaller score margin: 0.9875 seen on an H200
            assert corr >= (0.99 if rank == 1 else 0.98), f"image {image} rank {rank}: correlation {corr:.4f}"


def test_scorecam_masked_batch_grows_with_the_gpu_memory():
    method = ScoreCAM()
    on_gpu = method.batch_size_for((224, 224), 2, torch.device("cuda"))
    assert on_gpu > method.batch_size_for((224, 224), 2, torch.device("cpu"))
    # the budget it chose fits the card with room to spare
    assert on_gpu * 128 * 2 * 224 * 224 <= torch.cuda.get_device_properties(0).total_memory // 2


def test_salient_run_on_cuda(tmp_path, tiny_images):
    """``salient run`` (the worker side alone: a GPU machine needs no queue packages) on the device in bf16."""
    from click.testing import CliRunner

    from salient_maps.storage.maps import MapReader
    from salient_maps.storage.results import iter_results
    from salient_maps.storage.settings import Settings
    from salient_maps.workers.cli import run

    data = tmp_path / "data"
    args = [str(tiny_images(5, size=(80, 96))), "--model", "resnet18", "--topk", "2", "--device", "cuda",
            "--methods", "gradcam,scorecam,guided_backprop", "--precision", "bf16", "--max-channels", "32",
            "--data", str(data)]
    result = CliRunner().invoke(run, args)
    assert result.exit_code == 0, result.output
    rows = list(iter_results(Settings().with_data_dir(data), None))
    assert len(rows) == 5 * 2 * 3 and {r["status"] for r in rows} == {"done"}
    reader = MapReader.for_settings(Settings().with_data_dir(data))
    for row in rows:
        heat = reader.map(row)
        assert heat.shape == (224, 224) and np.isfinite(heat).all() and heat.max() > 0
