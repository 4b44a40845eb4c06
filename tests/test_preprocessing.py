"""Preprocessing from the models' own metadata (no download), its overrides on the command line and in
messages, and its place in the results' identity."""

from __future__ import annotations

import json

import pytest
import torch

from salient_maps.storage.database import connect
from salient_maps.storage.job_options import job_spec
from salient_maps.storage.messages import MessageError, chunk_message, parse_chunk
from salient_maps.storage.objects import open_store
from salient_maps.storage.settings import Settings
from salient_maps.workers.explainers import SpecError, load_setup
from salient_maps.workers.models import IMAGENET_MEAN, load_model


def test_metadata_gives_size_and_normalisation_without_download():
    with torch.device("meta"):
        tiny = load_model("timm:vit_tiny_patch16_224")
        resnet = load_model("resnet50")
        vit = load_model("vit_b_16", input_size=64)
    assert (tiny.input_size, tiny.mean, tiny.std) == (224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert tiny.declared_transform["interpolation"] == "bicubic" and tiny.declared_transform["crop_pct"] == 0.9
    assert resnet.mean == IMAGENET_MEAN and resnet.declared_transform["resize_size"] == 232  # IMAGENET1K_V2
    assert vit.input_size == 64 and vit.module.image_size == 64  # built for the size asked: a 4×4 grid
    assert vit.default_layer == "encoder.layers.encoder_layer_11.ln_1"
    record = tiny.preprocessing()
    assert record["input_size"] == 224 and record["mean"] == [0.5, 0.5, 0.5] and record["declared"]


def processor_digest(tmp_path, **options) -> tuple[str, object]:
    message = json.loads(json.dumps(chunk_message("job", [(1, "file:///x.png")], job_spec(
        model="resnet18", methods="gradcam", topk=1, **options))))
    settings = Settings().with_data_dir(tmp_path / "worker")
    setup = load_setup(parse_chunk(message).spec, settings, "cpu")
    processor = setup.processor(settings, connect(settings.resolved_database_url),
                                open_store(settings.resolved_object_store_url))
    return processor.digest, setup.explainer.model


def test_overrides_travel_in_the_message_and_change_the_identity(tmp_path):
    plain, _ = processor_digest(tmp_path, input_size=32)
    again, _ = processor_digest(tmp_path, input_size=32)
    other_mean, model = processor_digest(tmp_path, input_size=32, mean="0.5,0.5,0.5", std=[0.25, 0.25, 0.25])
    bigger, _ = processor_digest(tmp_path, input_size=48)
    assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.25, 0.25, 0.25) and model.input_size == 32
    assert plain == again and len({plain, other_mean, bigger}) == 3


@pytest.mark.parametrize("preprocessing", [{"size": 3}, {"input_size": 8}, {"mean": [0.5, 0.5]}, {"std": "0.5"},
                                           {"input_size": True}])
def test_bad_preprocessing_in_a_message_is_refused(preprocessing):
    spec = {"model": "resnet18", "methods": ["gradcam"], "targets": {"topk": 1}, "preprocessing": preprocessing}
    with pytest.raises(MessageError, match="preprocessing"):
        parse_chunk(chunk_message("job", [(1, "file:///x.png")], spec))


def test_a_vit_that_cannot_take_the_size_fails_before_any_image(tmp_path):
    settings = Settings().with_data_dir(tmp_path / "worker")
    with pytest.raises(SpecError, match="cannot build vit_b_16 for a 50 px input: .*divisible by patch size"):
        load_setup(job_spec(model="vit_b_16", methods="gradcam", input_size=50), settings, "cpu")
    with pytest.raises(SpecError, match="timm has no model 'vit_tiny_patch16'; did you mean: vit_tiny_patch16_"):
        load_setup(job_spec(model="timm:vit_tiny_patch16", methods="gradcam"), settings, "cpu")
