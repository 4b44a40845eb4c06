"""The team's own model code: factories by file or module, and the operator's allowlist on queue workers.

A message naming code is a request to run code: the refusal test runs the real worker path (``run_chunk``
with the worker's processor cache) on a factory file that would write a marker file, and checks that the
items fail with the reason and that the marker never appears."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from salient_maps.storage.database import (
    Item,
    add_items,
    close_listing,
    connect,
    create_job,
)
from salient_maps.storage.job_options import job_spec
from salient_maps.storage.messages import chunk_message, parse_chunk
from salient_maps.storage.objects import open_store
from salient_maps.storage.settings import Settings
from salient_maps.storage.sources import iter_uris
from salient_maps.workers.batching import DeviceLoop
from salient_maps.workers.explainers import ProcessorCache
from salient_maps.workers.factories import factory_allowed
from salient_maps.workers.models import ModelError, load_model
from salient_maps.workers.tasks import Runtime, run_chunk

FACTORIES = Path(__file__).parent / "model_factories.py"

HOSTILE = '''
from pathlib import Path
from torch import nn
Path({marker!r}).write_text("imported")  # runs on import


def build():
    Path({marker!r}).write_text("called")
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
'''


def test_factories_by_file_and_module_with_weights_and_labels(tmp_path: Path):
    model = load_model(f"{FACTORIES}:small_cnn", input_size=32)
    assert model.name == "small_cnn" and model.weights_digest.startswith("code-")
    assert model.class_names == [f"class_{i}" for i in range(4)] and model.default_layer == "3"  # the last ReLU
    weights = tmp_path / "w.pt"
    state = {k: torch.randn_like(v) for k, v in model.module.state_dict().items()}
    torch.save(state, weights)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["a", "b", "c", "d"]))
    trained = load_model(f"{FACTORIES}:small_cnn", weights, labels, input_size=32)
    assert torch.equal(trained.module.state_dict()["0.weight"], state["0.weight"])
    assert trained.class_names == ["a", "b", "c", "d"] and trained.tag != model.tag
    assert load_model("torchvision.models:resnet18", input_size=32).weights_digest.startswith("code-")
    with pytest.raises(ModelError, match="returned a str, not a torch.nn.Module"):
        load_model(f"{FACTORIES}:not_a_module")
    with pytest.raises(ModelError, match="has no function 'missing'"):
        load_model(f"{FACTORIES}:missing")


def test_the_allowlist_names_functions_files_and_folders(tmp_path: Path):
    file = tmp_path / "nets" / "a.py"
    file.parent.mkdir()
    file.write_text("")
    name = f"{file}:build"
    assert not factory_allowed(name, [])
    assert factory_allowed(name, [str(tmp_path)]) and factory_allowed(name, [str(file)])
    assert factory_allowed(name, [f"{tmp_path}/nets/../nets/a.py:build"])
    assert not factory_allowed(name, [f"{file}:other"]) and not factory_allowed(name, [str(tmp_path / "elsewhere")])
    assert factory_allowed("pkg.nets:build", ["pkg.nets:build"])
    assert not factory_allowed("pkg.nets:build", ["pkg.nets:other", "pkg:build", str(tmp_path)])
    assert Settings(model_factories="pkg.nets:build, /srv/models").model_factories == ["pkg.nets:build", "/srv/models"]


def worker_runs(factory: str, allowed: list[str], tmp_path: Path, tiny_images) -> dict[str, str]:
    """A job of two images whose message names ``factory``, through a worker allowing ``allowed``:
    the end of each item (status: reason)."""
    settings = Settings(model_factories=allowed).with_data_dir(tmp_path / "data")
    db = connect(settings.resolved_database_url)
    job_id = create_job(db, {})
    add_items(db, job_id, iter_uris([str(tiny_images(2))], settings))
    close_listing(db, job_id)
    with db.connect() as conn:
        items = [(row.id, row.uri) for row in conn.execute(select(Item.id, Item.uri))]
    message = json.loads(json.dumps(chunk_message(job_id, items, job_spec(model=factory, methods="gradcam", topk=1,
                                                                           input_size=32))))
    loop = DeviceLoop(db, settings, 1)
    rt = Runtime(settings, ProcessorCache(settings, db, open_store(settings.resolved_object_store_url), "cpu",
                                          model_lock=loop.model_lock), loop)
    run_chunk(parse_chunk(message), rt)
    with db.connect() as conn:
        rows = conn.execute(select(Item.uri, Item.status, Item.error))
        return {row.uri: f"{row.status}: {row.error}" for row in rows}


def test_a_message_naming_an_unlisted_factory_runs_nothing(tmp_path: Path, tiny_images):
    marker = tmp_path / "marker"
    hostile = tmp_path / "code" / "hostile.py"
    hostile.parent.mkdir()
    hostile.write_text(HOSTILE.format(marker=str(marker)))
    ends = worker_runs(f"{hostile}:build", [f"{FACTORIES}:small_cnn", str(tmp_path / "other")], tmp_path, tiny_images)
    assert len(ends) == 2
    assert all(end.startswith("failed: cannot explain with this spec: refused: model factory") and
               "SALIENT_MODEL_FACTORIES" in end for end in ends.values()), ends
    assert not marker.exists()


def test_a_listed_factory_runs_on_the_worker(tmp_path: Path, tiny_images):
    marker = tmp_path / "marker"
    code = tmp_path / "code" / "allowed.py"
    code.parent.mkdir()
    code.write_text(HOSTILE.format(marker=str(marker)))
    ends = worker_runs(f"{code}:build", [str(code.parent)], tmp_path, tiny_images)
    assert set(ends.values()) == {"done: None"}, ends
    assert marker.read_text() == "called"


def test_a_fine_tuned_timm_state_dict_brings_its_own_head(tmp_path: Path):
    """timm:NAME --weights: a head trained for 3 classes is built for 3 (timm's reset_classifier), and the
    DeiT's class and distillation heads both load."""
    import timm

    torch.manual_seed(5)
    tuned = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=3, img_size=32)
    weights = tmp_path / "tuned.pth"
    torch.save(tuned.state_dict(), weights)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["cat", "dog", "fox"]))
    model = load_model("timm:deit_tiny_distilled_patch16_224", weights, labels, input_size=32)
    assert model.class_names == ["cat", "dog", "fox"] and model.name == "timm-deit_tiny_distilled_patch16_224"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.module(x), tuned.eval()(x))
    assert model.default_layer == "blocks.11.norm1" and model.layout("blocks.11.norm1").prefix_tokens == 2


def test_salient_run_runs_the_factory_its_command_line_names(tmp_path: Path, tiny_images, run_cli):
    """No allowlist needed on the command line: the user runs their own code. The job records the
    preprocessing and the layer's layout."""
    data = tmp_path / "run"
    result = run_cli(["run", tiny_images(2), "--model", f"{FACTORIES}:small_cnn", "--input-size", "32",
                      "--mean", "0.5,0.5,0.5", "--methods", "gradcam", "--topk", "1", "--device", "cpu", "--out", data])
    assert "done 2" in result.output
    from salient_maps.storage.database import Job

    with connect(f"sqlite:///{data / 'salient.db'}").connect() as conn:
        settings = conn.execute(select(Job.settings)).scalar_one()
    assert settings["preprocessing"]["input_size"] == 32 and settings["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert settings["layout"] == {"kind": "nchw"} and settings["model"] == f"{FACTORIES}:small_cnn"
