"""The library API: ``salient_maps.explain`` (images in, tensors out, no storage) checked against an independent
Grad-CAM in plain PyTorch and across every kind of image it takes; ``open_results`` against the records of
``iter_results``; and the README's Python example, run as written."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import salient_maps
from salient_maps import explain, open_results
from salient_maps.workers.in_memory import ImageInputError

MODEL = "resnet18"  # random init with seed 0, as salient loads it
SIDE = 224  # the model's input: pictures of this size are not resized, so the input is known exactly
WHOLE = {"crop": "whole"}  # not resnet18's own resize 256 + crop 224


def plain_gradcam(rgb: np.ndarray, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM written from the paper: (maps K×224×224, top-k class ids) for one 224×224 RGB picture."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval().double()
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(3, 1, 1)
    x = ((torch.from_numpy(rgb).permute(2, 0, 1).double() / 255 - mean) / std)[None]
    kept = {}
    handle = model.layer4.register_forward_hook(lambda _m, _i, out: kept.update(a=out))
    logits = model(x)
    handle.remove()
    targets = logits[0].topk(topk).indices
    maps = []
    for c in targets:
        (grad,) = torch.autograd.grad(logits[0, c], kept["a"], retain_graph=True)
        cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * kept["a"]).sum(1, keepdim=True))
        cam = (cam - cam.min()) / (cam.max() - cam.min())
        maps.append(F.interpolate(cam, size=(SIDE, SIDE), mode="bilinear", align_corners=False)[0, 0])
    return torch.stack(maps).float(), targets


@pytest.fixture(scope="module")
def pictures(smooth_rgb) -> list[np.ndarray]:
    return [smooth_rgb(SIDE, SIDE, seed=s) for s in (1, 2, 3)]


def test_gradcam_maps_equal_a_plain_pytorch_gradcam(pictures):
    result = explain(pictures, model=MODEL, methods="gradcam", topk=2, batch_size=2, **WHOLE)
    assert result.maps["gradcam"].shape == (3, 2, SIDE, SIDE) and result.probs.shape == (3, 1000)
    assert result.layer == "layer4" and result.model.startswith("resnet18-")
    for i, rgb in enumerate(pictures):
        maps, targets = plain_gradcam(rgb, topk=2)
        assert result.targets[i].tolist() == targets.tolist()
        torch.testing.assert_close(result.maps["gradcam"][i], maps, atol=2e-4, rtol=0)
    assert torch.allclose(result.probs.sum(1), torch.ones(3))
    names = result.target_names()
    assert names[0] == [result.class_names[c] for c in result.targets[0].tolist()]


def test_a_non_square_photo_is_cropped_as_torchvision_transforms_it():
    """resnet18's own eval transform (resize 256, centre crop 224, bilinear) on a 400×560 photo: salient's maps are
    the plain Grad-CAM of torchvision.transforms.v2's crop. The two crops' pixels may differ by one 8-bit level
    (tests/test_preprocessing.py), which moves these maps by ~3e-4; a crop one pixel off moves them by 0.07."""
    import skimage.data
    from torchvision.transforms import v2

    rgb = np.ascontiguousarray(skimage.data.coffee()[:, 40:])
    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    crop = v2.CenterCrop(224)(v2.Resize(256, antialias=True)(tensor)).permute(1, 2, 0).numpy().copy()
    maps, targets = plain_gradcam(crop, topk=2)
    result = explain(rgb, model=MODEL, methods="gradcam", topk=2)
    assert result.preprocessing["crop"] == "center" and result.preprocessing["resize"] == 256
    assert result.targets[0].tolist() == targets.tolist()
    torch.testing.assert_close(result.maps["gradcam"][0], maps, atol=2e-3, rtol=0)


def test_every_kind_of_image_gives_the_same_maps(pictures, encode_image, tmp_path):
    rgb = pictures[0]
    png = encode_image(rgb, "PNG")  # lossless: the same pixels as the array
    (tmp_path / "picture.png").write_bytes(png)
    from PIL import Image

    tensor = torch.from_numpy(rgb).permute(2, 0, 1)
    kinds = {
        "array": rgb, "float array": rgb / 255.0, "path": str(tmp_path / "picture.png"),
        "Path": tmp_path / "picture.png", "file URI": (tmp_path / "picture.png").as_uri(), "bytes": png,
        "PIL": Image.fromarray(rgb), "tensor": tensor, "float tensor": tensor.float() / 255,
    }
    reference = explain(rgb, model=MODEL, methods="gradcam,saliency", topk=1, **WHOLE)
    together = explain(list(kinds.values()), model=MODEL, methods="gradcam,saliency", topk=1, batch_size=4, **WHOLE)
    batch = explain(np.stack([rgb, rgb]), model=MODEL, methods="gradcam,saliency", topk=1, **WHOLE)
    assert together.maps["gradcam"].shape[0] == len(kinds) and batch.maps["gradcam"].shape[0] == 2
    for result in (together, batch):
        for i in range(result.targets.shape[0]):
            assert result.targets[i].tolist() == reference.targets[0].tolist()
            for method in ("gradcam", "saliency"):
                torch.testing.assert_close(result.maps[method][i], reference.maps[method][0], atol=1e-5, rtol=0)
            torch.testing.assert_close(result.arrays["saliency"]["gradient"][i],
                                       reference.arrays["saliency"]["gradient"][0], atol=1e-5, rtol=1e-4)


def test_an_image_that_cannot_be_used_is_named(pictures, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageInputError, match=r"image 1 \(.*notes.png\): not an image"):
        explain([pictures[0], tmp_path / "notes.png"], model=MODEL, methods="gradcam")
    with pytest.raises(ImageInputError, match=r"image 0 .*must lie in \[0, 1\]"):
        explain(pictures[0].astype(np.float32), model=MODEL, methods="gradcam")
    with pytest.raises(ImageInputError, match="image 0 .*not dict"):
        explain({"not": "an image"}, model=MODEL, methods="gradcam")
    with pytest.raises(ValueError, match="unknown method"):
        explain(pictures[0], model=MODEL, methods="gradcan")
    with pytest.raises(TypeError, match="unknown options"):
        explain(pictures[0], model=MODEL, methods="gradcam", colourmap="jet")


def test_open_results_tables_hold_the_records_of_a_run(tiny_images, run_cli, tmp_path):
    from salient_maps.storage.maps import MapReader
    from salient_maps.storage.results import FIELDS, iter_results
    from salient_maps.storage.settings import Settings

    out, folder = tmp_path / "out", tiny_images(3)
    (folder / "zz-broken.png").write_bytes(b"not an image")
    run_cli(["run", folder, "--model", "mobilenet_v3_small", "--methods", "gradcam", "--topk", "2", "--out", out])
    records = list(iter_results(Settings().with_data_dir(out), None))
    by_folder = open_results(out)
    by_url = open_results(f"sqlite:///{out / 'salient.db'}", by_folder.job_id, objects=(out / "objects").as_uri())
    table = by_folder.to_arrow()
    assert table.column_names == list(FIELDS) and table.num_rows == len(records) == 7  # 3 images × 2, 1 failed
    assert table.to_pylist() == [{k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
                                  for k, v in record.items()} for record in records]
    assert by_url.to_arrow().equals(table)
    # A record's map, from a dict, an Arrow row or a pandas row alike; a failed item has none.
    reader = MapReader.for_settings(Settings().with_data_dir(out))
    for record, row in zip(records[:6], table.to_pylist()):
        assert np.array_equal(by_folder.load_map(row), reader.map(record))
        assert by_folder.load_map(row).shape == (224, 224)
    with pytest.raises(ValueError, match="zz-broken.png has no map"):
        by_folder.load_map(records[6])
    frame = by_folder.to_pandas()
    assert np.array_equal(by_url.load_map(frame.iloc[5]), reader.map(records[5]))
    assert list(frame.columns) == list(FIELDS) and len(frame) == 7
    assert frame["class_id"].iloc[:6].tolist() == [r["class_id"] for r in records[:6]]
    with pytest.raises(LookupError, match="no job nope"):
        open_results(out, "nope")
    with pytest.raises(FileNotFoundError, match="no salient results"):
        open_results(tmp_path / "elsewhere")


def readme_python_block(title: str) -> str:
    """The first ```python block under the README heading ``title``."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split(f"\n## {title}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_library_example_runs_as_written(tiny_images, run_cli, tmp_path, monkeypatch):
    code = readme_python_block("Python library")
    monkeypatch.chdir(tmp_path)
    # The example opens the results of the README's `salient run photos/ ... --out audit/`.
    os.symlink(tiny_images(2), tmp_path / "photos")
    run_cli(["run", "photos/", "--model", "mobilenet_v3_small", "--methods", "gradcam", "--topk", "1",
             "--out", "audit/"])
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["result"].maps["gradcam"].shape == (2, 3, 224, 224)
    assert len(namespace["table"]) == 2
    assert namespace["heat"].shape == (224, 224) and 0 <= namespace["heat"].min() <= namespace["heat"].max() <= 1


def test_the_package_root_exports_the_library():
    assert {"explain", "open_results", "MapReader"} <= set(salient_maps.__all__)
    assert salient_maps.Explanations.__name__ == "Explanations"
    with pytest.raises(AttributeError):
        salient_maps.nothing_here  # noqa: B018
