"""Model factories for the tests (``--model tests/model_factories.py:NAME``)."""

from __future__ import annotations

from torch import nn


def flat_mlp() -> nn.Module:
    """No spatial map and no token grid anywhere: only input-gradient methods apply."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, 4))



def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def not_a_module():
    return "a string"
