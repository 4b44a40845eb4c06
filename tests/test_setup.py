"""One setup path: `salient run` and a queue worker build their pipeline from the same spec with the
same function (workers/explainers.py), so a queued job keeps everything run would do: labels,
localisation, metrics, overlay style, TorchScript handling. No servers needed."""

from __future__ import annotations

import json

import pytest
import torch
from sqlalchemy import select

from salient_maps.producer.submit import build_spec
from salient_maps.storage.database import Job, connect
from salient_maps.storage.messages import chunk_message, parse_chunk
from salient_maps.storage.objects import open_store
from salient_maps.storage.results import iter_results
from salient_maps.storage.settings import Settings
from salient_maps.workers.explainers import SpecError, build_processor, load_setup

OPTIONS = {"model": "resnet18", "methods": "gradcam,saliency", "classes": "thing 5,7", "localize": True,
           "colormap": "viridis", "metrics": "drop", "smooth": 2, "batch_size": 4}


def queued_processor(spec: dict, tmp_path):
    """What a worker builds from the message carrying ``spec`` (JSON on the wire and back)."""
    message = json.loads(json.dumps(chunk_message("job", [(1, "file:///x.png")], spec)))
    settings = Settings().with_data_dir(tmp_path / "worker")
    return build_processor(parse_chunk(message).spec, settings, connect(settings.resolved_database_url),
                           open_store(settings.resolved_object_store_url), "cpu")


def test_a_queued_spec_builds_what_run_builds(tmp_path, tiny_images, run_cli):
    labels = tmp_path / "labels.json"
    names = [f"thing {i}" for i in range(1000)]
    labels.write_text(json.dumps(names))
    data = tmp_path / "run"
    args = [f"--{key.replace('_', '-')}" if value is True else f"--{key.replace('_', '-')}={value}"
            for key, value in OPTIONS.items()]
    run_cli(["run", tiny_images(1), *args, "--labels", labels, "--device", "cpu", "--out", data])
    db = connect(f"sqlite:///{data / 'salient.db'}")
    with db.connect() as conn:
        run_digest = conn.execute(select(Job.settings_digest)).scalar_one()
    rows = [r for r in iter_results(Settings().with_data_dir(data), None) if r["method"]]
    assert {r["class_name"] for r in rows} == {"thing 5", "thing 7"}
    assert all(r["drop"] is not None and r["localization_box"] for r in rows)

    processor = queued_processor(build_spec(**OPTIONS, labels=labels), tmp_path)
    assert processor.digest == run_digest  # model, layer, methods and options, targets, metrics, overlay, localize
    assert processor.explainer.model.class_names == names and processor.localize
    assert processor.batch_size == 4 and processor.overlay_style.colormap == "viridis"
    without = queued_processor(build_spec(**{**OPTIONS, "localize": False}, labels=labels), tmp_path)
    assert without.digest != run_digest and not without.localize


@pytest.fixture(scope="module")
def scripted_file(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 5)).eval()
    path = tmp_path_factory.mktemp("scripted") / "net.pt"
    torch.jit.script(net).save(str(path))
    return path


def test_torchscript_gets_input_gradients_and_guided_methods_are_refused_up_front(scripted_file, tmp_path,
                                                                                  tiny_images, run_cli):
    setup = load_setup(build_spec(model=str(scripted_file), methods="saliency", topk=1), Settings(), "cpu")
    assert setup.explainer.layer is None and setup.explainer.layer_name == "input"
    with pytest.raises(SpecError, match="guided_backprop cannot run on a TorchScript model"):
        queued_processor(build_spec(model=str(scripted_file), methods="saliency,guided_backprop"), tmp_path)
    data = tmp_path / "refused"
    refused = run_cli(["run", tiny_images(1), "--model", scripted_file, "--methods", "guided_backprop",
                       "--data", data], expect_exit=1)
    assert "guided_backprop cannot run on a TorchScript model" in refused.output and "--weights" in refused.output
    assert not data.exists()  # refused before a job, a database or any image
