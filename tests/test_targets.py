"""--classes by id or name, --topk, and --labels for custom models."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from salient_maps.workers.engine import Explainer
from salient_maps.workers.methods import build_methods
from salient_maps.workers.models import IMAGENET_MEAN, LoadedModel, ModelError, imagenet_class_names, load_labels, load_model
from salient_maps.workers.targets import TargetError, Targets, parse_classes

NAMES = imagenet_class_names()
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def test_ids_and_names_mix_in_order_without_duplicates():
    assert parse_classes("281, tabby,Egyptian cat ,egyptian CAT,7", NAMES) == (281, 285, 7)
    assert parse_classes("TIGER CAT", NAMES) == (282,)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(TargetError, match=r"unknown class name 'tabbby'; did you mean: 'tabby' \(281\)"):
        parse_classes("tabbby", NAMES)
    with pytest.raises(TargetError, match="no similar class name"):
        parse_classes("qqqqqqqq", NAMES)


def test_names_differing_only_in_case_need_the_exact_spelling():
    assert parse_classes("Cardigan", NAMES) == (264,)  # the corgi
    assert parse_classes("cardigan", NAMES) == (474,)  # the sweater
    with pytest.raises(TargetError, match="ambiguous.*264.*474"):
        parse_classes("CARDIGAN", NAMES)


@pytest.mark.parametrize("text, message", [("1000", "outside 0..999"), ("-1", "outside"), ("281,,285", "empty entry")])
def test_bad_entries_are_refused(text, message):
    with pytest.raises(TargetError, match=message):
        parse_classes(text, NAMES)


def test_commas_always_separate_so_a_name_with_a_comma_is_given_by_id():
    names = ["crane, bird", "crane, machine"]
    assert parse_classes("1", names) == (1,)
    with pytest.raises(TargetError, match="unknown class name 'crane'"):
        parse_classes("crane, bird", names)


def test_labels_from_json_and_csv(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps(["cat", "dog", "fish"]))
    assert load_labels(tmp_path / "l.json") == ["cat", "dog", "fish"]
    (tmp_path / "l.csv").write_text('id,name\n1,dog\n0,cat\n2,"fish, gold"\n3,crane, bird\n')
    assert load_labels(tmp_path / "l.csv") == ["cat", "dog", "fish, gold", "crane, bird"]
    (tmp_path / "plain.csv").write_text("0,cat\n1,dog\n")
    assert load_labels(tmp_path / "plain.csv") == ["cat", "dog"]


@pytest.mark.parametrize("content, message", [
    ("0,cat\n2,dog\n", "ids must be 0..1"),
    ("0,cat\n0,dog\n", "appears twice"),
    ('["cat", 3]', "only strings"),
    ("[\"cat\",", "invalid JSON"),
    ("0,cat\n1,\n", "empty name"),
])
def test_bad_labels_files_are_refused(tmp_path, content, message):
    path = tmp_path / ("l.json" if content.startswith("[") else "l.csv")
    path.write_text(content)
    with pytest.raises(ModelError, match=message):
        load_labels(path)


def test_labels_replace_imagenet_names_and_must_match_the_model_outputs(tmp_path):
    torch.manual_seed(0)
    net = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))
    net.save(str(tmp_path / "net.pt"))
    (tmp_path / "three.json").write_text(json.dumps(["Cat", "Dog", "Fish"]))
    (tmp_path / "four.json").write_text(json.dumps(["a", "b", "c", "d"]))
    loaded = load_model(str(tmp_path / "net.pt"), labels=tmp_path / "three.json")
    assert loaded.class_names == ["Cat", "Dog", "Fish"]
    assert parse_classes("dog,2", loaded.class_names) == (1, 2)
    with pytest.raises(ModelError, match="name 4 classes but the model has 3 outputs"):
        load_model(str(tmp_path / "net.pt"), labels=tmp_path / "four.json")
    assert load_model(str(tmp_path / "net.pt")).class_names == ["class_0", "class_1", "class_2"]


def test_targets_select_fixed_classes_or_the_top_k():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    assert Targets(topk=2).select(probs).tolist() == [[1, 2], [0, 2]]
    assert Targets(topk=None, classes=(2, 0)).select(probs).tolist() == [[2, 0], [2, 0]]
    assert Targets(topk=2).describe() == {"topk": 2}
    assert Targets(topk=None, classes=(2, 0)).describe() == {"classes": [2, 0]}


def test_topk_and_class_ids_are_checked_against_the_model():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    model = LoadedModel(name="t", module=net, weights_digest="0", class_names=["a", "b", "c"], mean=IMAGENET_MEAN)
    methods = build_methods(["saliency"])
    with pytest.raises(ValueError, match="--topk 5 but the model has 3 classes"):
        Explainer(model, None, methods, Targets(topk=5), device="cpu")
    with pytest.raises(ValueError, match=r"class ids \[3\] outside 0..2"):
        Explainer(model, None, methods, Targets(topk=None, classes=(3,)), device="cpu")
