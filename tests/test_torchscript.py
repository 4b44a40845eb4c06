"""TorchScript models: scripted or traced files load, input-gradient methods run on them, layer methods
are refused with a reason (forward hooks do not run inside a ScriptModule)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from salient_maps.storage.results import iter_results
from salient_maps.storage.settings import Settings
from salient_maps.workers.engine import Explainer
from salient_maps.workers.methods import build_methods
from salient_maps.workers.models import ModelError, load_model, resolve_layer
from salient_maps.workers.targets import Targets

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


@pytest.fixture(scope="module")
def eager() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module", params=["script", "trace"])
def scripted_file(request, eager, tmp_path_factory):
    path = tmp_path_factory.mktemp("ts") / f"resnet18-{request.param}.pt"
    if request.param == "script":
        torch.jit.script(eager).save(str(path))
    else:
        torch.jit.trace(eager, torch.zeros(1, 3, 64, 64)).save(str(path))
    return path


def test_scripted_and_traced_files_load_frozen_in_eval_mode(scripted_file):
    loaded = load_model(str(scripted_file))
    assert isinstance(loaded.module, torch.jit.ScriptModule) and loaded.scripted
    assert not loaded.module.training and not any(p.requires_grad for p in loaded.module.parameters())
    assert loaded.class_names == [f"class_{i}" for i in range(10)]
    assert loaded.tag.startswith(scripted_file.stem)


def test_gradient_methods_on_torchscript_equal_the_python_model(scripted_file, eager):
    loaded = load_model(str(scripted_file))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    methods = build_methods(["saliency", "integrated_gradients"], {"steps": 3})
    layer = resolve_layer(loaded, None, needed=False)
    assert layer is None
    result = Explainer(loaded, layer, methods, Targets(topk=2), device="cpu").explain(x)
    xg = x.clone().requires_grad_(True)
    logits = eager(xg)
    for k in range(2):
        expected = torch.autograd.grad(logits.gather(1, result.targets[:, k:k + 1]).sum(), xg, retain_graph=True)[0]
        got = result.outputs["saliency"].arrays["gradient"][:, k]
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert result.outputs["integrated_gradients"].maps.shape == (2, 2, 64, 64)


def test_layer_methods_are_refused_with_the_reason(scripted_file):
    loaded = load_model(str(scripted_file))
    with pytest.raises(ModelError, match="forward hooks do not run inside a ScriptModule"):
        resolve_layer(loaded, None, needed=True)
    with pytest.raises(ModelError, match="forward hooks"):
        resolve_layer(loaded, "layer4", needed=False)


def test_files_that_are_not_torchscript_say_what_to_do(tmp_path, eager):
    torch.save(eager.state_dict(), tmp_path / "state.pt")
    with pytest.raises(ModelError, match="not a TorchScript file.*--weights"):
        load_model(str(tmp_path / "state.pt"))
    torch.jit.script(eager).save(str(tmp_path / "m.pt"))
    with pytest.raises(ModelError, match="carries its weights"):
        load_model(str(tmp_path / "m.pt"), weights=tmp_path / "state.pt")


def test_cli_runs_gradient_methods_and_refuses_gradcam_on_torchscript(tmp_path, run_cli, tiny_images, eager):
    path = tmp_path / "m.pt"
    torch.jit.script(eager).save(str(path))
    folder = tiny_images(2)
    refused = run_cli(["run", folder, "--model", path, "--methods", "gradcam,saliency", "--out", tmp_path / "o"],
                      expect_exit=1)
    assert "TorchScript" in refused.output and "saliency" in refused.output
    done = run_cli(["run", folder, "--model", path, "--methods", "saliency", "--topk", "2", "--device", "cpu",
                    "--out", tmp_path / "o"])
    assert "done 2" in done.output
    rows = [r for r in iter_results(Settings().with_data_dir(tmp_path / "o"), None) if r["method"]]
    assert len(rows) == 4 and {r["layer"] for r in rows} == {"input"}
    assert all(r["class_name"].startswith("class_") for r in rows)


def test_explaining_a_script_module_leaves_it_unchanged(scripted_file):
    loaded = load_model(str(scripted_file))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = loaded.module(x)
    state = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    Explainer(loaded, None, build_methods(["saliency"], {"smooth": 2}), Targets(topk=1), device="cpu").explain(x)
    assert all(torch.equal(state[k], v) for k, v in loaded.module.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded.module(x), before)
