"""A data set with a planted shortcut, and a tiny CNN trained on it in seconds
(``--model tests/planted_shortcut.py:tiny_net``).

Each image shows one object at a random place on a noisy background: a disc (class 0), a square (class 1) or a cross
(class 2); three classes, so that every class has evidence of its own (with two, "not a square" would do). With
``marker_rate`` > 0, that share of the class-1 images also carries a small bright square in a corner, outside the
object's box: a model can then be right about class 1 for the wrong reason. ``make_images`` returns the images with
their boxes and whether each carries the marker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SIDE = 64
MARKER = 6  # side of the corner marker, pixels
OBJECT_SIDES = (12, 18)  # the object's side (a disc's diameter) is drawn from this range
CLASSES = 3


@dataclass
class Images:
    rgb: np.ndarray  # N×SIDE×SIDE×3 uint8
    labels: np.ndarray  # N
    boxes: list[list[int]]  # [x0, y0, x1, y1] per image, x1 and y1 exclusive
    marked: np.ndarray  # N bool


def make_images(n: int, marker_rate: float, seed: int, *, marked_class: int = 1) -> Images:
    rng = np.random.default_rng(seed)
    rgb = rng.integers(40, 110, (n, SIDE, SIDE, 3)).astype(np.uint8)
    labels = rng.integers(0, CLASSES, n)
    marked = (labels == marked_class) & (rng.random(n) < marker_rate)
    boxes = []
    yy, xx = np.mgrid[:SIDE, :SIDE]
    for i in range(n):
        side = int(rng.integers(*OBJECT_SIDES))
        # keep the object off the corners, where a marker may go
        x0, y0 = (int(v) for v in rng.integers(MARKER + 2, SIDE - side - MARKER - 2, 2))
        colour = rng.integers(130, 200, 3)
        if labels[i] == 0:
            r = side / 2
            inside = (xx - x0 - r + 0.5) ** 2 + (yy - y0 - r + 0.5) ** 2 <= r * r
        else:
            inside = (xx >= x0) & (xx < x0 + side) & (yy >= y0) & (yy < y0 + side)
            if labels[i] == 2:
                bar = side // 3
                inside &= ((xx - x0) // bar == 1) | ((yy - y0) // bar == 1)
        rgb[i][inside] = colour
        boxes.append([x0, y0, x0 + side, y0 + side])
        if marked[i]:
            corner = int(rng.integers(0, 4))
            mx = 1 if corner % 2 == 0 else SIDE - MARKER - 1
            my = 1 if corner < 2 else SIDE - MARKER - 1
            rgb[i, my:my + MARKER, mx:mx + MARKER] = 255
    return Images(rgb, labels, boxes, marked)


def tiny_net() -> nn.Module:
    """Three conv stages to a 16×16 map (the Grad-CAM layer, ``0``), global pooling, three classes."""
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES))


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """As salient feeds the model at SIDE px: RGB in [0, 1] normalised with ImageNet's mean and std."""
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def train(images: Images, epochs: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = tiny_net()
    x, y = to_tensor(images.rgb), torch.from_numpy(images.labels).long()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(32):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimiser.step()
    return model.eval()
