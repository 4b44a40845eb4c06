"""Batch-norm folding (workers/folding.py): the folded copy computes what the model computes, the model
itself is left alone, and what cannot be folded safely is not."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from salient_maps.workers.folding import folded, for_plain_passes
from salient_maps.workers.models import load_model


def with_running_statistics(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random-init BatchNorms are identities (mean 0, var 1, weight 1, bias 0): give them real work."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return module.eval().requires_grad_(False)


def norms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def test_folded_resnet_computes_the_same_logits_without_batch_norms():
    model = with_running_statistics(torchvision.models.resnet18(weights=None).double())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = folded(model)
    assert fast is not model and norms(fast) == 0 and norms(model) == 20
    torch.testing.assert_close(fast(x), model(x), rtol=1e-10, atol=1e-10)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model itself is unchanged


def test_bundled_efficientnet_folds_timm_norm_act_layers():
    model = load_model().module
    fast = folded(model)
    assert norms(model) > 0 and norms(fast) == 0
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


def test_the_copy_is_reused_until_the_weights_change():
    model = with_running_statistics(torchvision.models.resnet18(weights=None))
    fast = folded(model)
    assert folded(model) is fast
    with torch.no_grad():
        model.fc.weight.mul_(2)  # as the sanity check's randomisation does: in place
    again = folded(model)
    x = torch.randn(1, 3, 64, 64)
    assert again is not fast
    torch.testing.assert_close(again(x), model(x), rtol=1e-4, atol=1e-4)


class ConvReadTwice(nn.Module):
    """The conv's output feeds the batch norm and the sum: folding would change the second use."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.norm(y) + y


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.norm(self.conv(x)) if x.sum() > 0 else x


def test_what_cannot_be_folded_safely_is_run_as_it_is():
    for net in (ConvReadTwice(), DataDependent()):
        net = with_running_statistics(net)
        assert folded(net) is net
    training = with_running_statistics(torchvision.models.resnet18(weights=None)).train()
    assert folded(training) is training


def test_plain_passes_run_folded_except_in_cuda_half_precision():
    model = with_running_statistics(torchvision.models.resnet18(weights=None))
    assert norms(for_plain_passes(model, torch.device("cpu"), torch.bfloat16)) == 0
    assert norms(for_plain_passes(model, torch.device("cuda"), torch.float32)) == 0
    assert for_plain_passes(model, torch.device("cuda"), torch.bfloat16) is model
