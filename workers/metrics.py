"""Faithfulness of a map to the model: does removing what the map points at change the class score?

- **deletion** / **insertion** (Petsiuk et al. 2018, RISE): pixels are removed from the image (replaced by
  a baseline), or revealed on top of the baseline, in the map's order, most salient first, in ``steps``
  equal steps; the curve is the class probability after each step (``steps + 1`` points, 0 % to 100 %)
  and the AUC its trapezoid area over the fraction of pixels. Lower deletion AUC and higher insertion
  AUC mean a more faithful map. Baselines as in RISE: black for deletion, blurred for insertion, unless
  one baseline is given for both.
- **drop** / **increase** (Chattopadhay et al. 2018, used by Score-CAM): ``Y`` is the class probability
  of the image, ``O`` that of the image multiplied by the map (in pixel space, so a 0 in the map means
  a black pixel); drop = max(0, Y − O) / Y and increase = O > Y. Their means over a dataset are the
  papers' "Average Drop %" and "Increase in Confidence %".

Cost in forward passes per image and explained class: ``steps + 1`` for each curve and 1 for drop, plus
1 per image for the clean score. All of them run in large batches under ``torch.inference_mode``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torchvision.transforms.functional as TF
from torch import Tensor, nn

from .folding import for_plain_passes
from .methods.base import compute_dtype

METRICS = ("deletion", "insertion", "drop")
BASELINES = ("black", "blurred")
# RISE's insertion blur (11 px kernel, sigma 5 at 224 px), scaled with the input size.
_BLUR_KERNEL_AT_224, _BLUR_SIGMA_AT_224 = 11, 5.0


@dataclass(frozen=True)
class Faithfulness:
    """Which metrics to compute and how; ``batch_size`` is the number of perturbed images per forward."""

    metrics: tuple[str, ...] = METRICS
    steps: int = 16
    baseline: str | None = None  # None: black for deletion, blurred for insertion (RISE)
    batch_size: int = 64

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(METRICS)}")
        if self.steps < 1:
            raise ValueError("metric steps must be at least 1")
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ValueError(f"metric baseline must be one of {', '.join(BASELINES)}")

    def baseline_for(self, curve: str) -> str:
        return self.baseline or {"deletion": "black", "insertion": "blurred"}[curve]

    def params(self) -> dict:
        """Result-changing settings (the batch size only changes speed)."""
        params: dict = {"metrics": list(self.metrics), "score": "probability"}
        for curve in ("deletion", "insertion"):
            if curve in self.metrics:
                params[curve] = {"steps": self.steps, "baseline": self.baseline_for(curve)}
        return params

    def forwards_per_explanation(self) -> int:
        """Forward passes per image and class (the one clean pass per image not counted)."""
        return sum({"deletion": self.steps + 1, "insertion": self.steps + 1, "drop": 1}[m] for m in self.metrics)

    def evaluate(
        self, model: nn.Module, x: Tensor, maps: Tensor, targets: Tensor, mean: Sequence[float],
        std: Sequence[float], autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> dict[str, Tensor]:
        """Scores of each map.

        ``x`` B×3×H×W normalised input (on the model's device), ``maps`` B×K×H×W in [0, 1], ``targets`` B×K.
        Returns B×K tensors ``deletion_auc``, ``insertion_auc``, ``drop``, ``increase`` (bool) and
        ``masked_score`` (O), and B×K×(steps+1) ``deletion_curve`` / ``insertion_curve``, for the metrics asked.
        """
        device = x.device
        maps = maps.to(device=device, dtype=torch.float32)
        targets = targets.to(device)
        b_count, k_count = targets.shape
        # Black in pixel space is -mean/std once normalised.
        black = (-torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(1, 3, 1, 1).expand_as(x)

        # (steps + 1) forwards per image and class
        plain = for_plain_passes(model, device, compute_dtype(autocast, x))

        def probabilities(make: Callable[[Tensor], Tensor], classes: Tensor) -> Tensor:
            return _class_probabilities(plain, make, classes, self.batch_size, autocast)

        out: dict[str, Tensor] = {}
        with torch.inference_mode():
            if "deletion" in self.metrics or "insertion" in self.metrics:
                baselines = {"black": black, "blurred": _blur(x)}
                # rank[b, k, p]: position of pixel p in map (b, k)'s order, most salient first; ties keep pixel order.
                order = maps.flatten(2).argsort(dim=-1, descending=True, stable=True)
                rank = order.argsort(dim=-1).view_as(maps)
                n_steps = self.steps + 1
                # Pixels changed after step s: the first s/steps of them in the map's order.
                counts = torch.arange(n_steps, device=device) * rank[0, 0].numel() // self.steps
                variant = torch.arange(b_count * k_count * n_steps, device=device)
                b, k, s = variant // (k_count * n_steps), (variant // n_steps) % k_count, variant % n_steps
                for curve in ("deletion", "insertion"):
                    if curve not in self.metrics:
                        continue
                    base = baselines[self.baseline_for(curve)]
                    changed, kept = (base, x) if curve == "deletion" else (x, base)

                    def perturbed(i: Tensor) -> Tensor:
                        top = (rank[b[i], k[i]] < counts[s[i]].view(-1, 1, 1)).unsqueeze(1)  # n×1×H×W
                        return torch.where(top, changed[b[i]], kept[b[i]])

                    scores = probabilities(perturbed, targets[b, k]).view(b_count, k_count, n_steps)
                    out[f"{curve}_curve"] = scores
                    out[f"{curve}_auc"] = (scores[..., 1:] + scores[..., :-1]).sum(-1) / (2 * self.steps)
            if "drop" in self.metrics:
                clean = probabilities(lambda i: x[i], targets)  # B×K: one pass per image serves all its classes
                pair = torch.arange(b_count * k_count, device=device)
                b, k = pair // k_count, pair % k_count
                masked = probabilities(
                    lambda i: black[b[i]] + maps[b[i], k[i]].unsqueeze(1) * (x[b[i]] - black[b[i]]),
                    targets[b, k],
                ).view(b_count, k_count)
                out["masked_score"] = masked
                out["drop"] = (clean - masked).clamp_min(0) / clean.clamp_min(torch.finfo(clean.dtype).tiny)
                out["increase"] = masked > clean
        return out


def _class_probabilities(
    model: nn.Module, make: Callable[[Tensor], Tensor], classes: Tensor, batch_size: int,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> Tensor:
    """Softmax probability of ``classes[i]`` (N, or N×K for several classes of one image) on image
    ``make(i)`` for every i < N, ``batch_size`` images per forward. Returns N (or N×K) float32."""
    n = classes.shape[0]
    chunks = []
    for start in range(0, n, batch_size):
        index = torch.arange(start, min(start + batch_size, n), device=classes.device)
        with autocast():
            logits = model(make(index))
        wanted = classes[index]
        probs = logits.float().softmax(dim=1).gather(1, wanted.view(len(index), -1))
        chunks.append(probs.view(wanted.shape))
    return torch.cat(chunks)


def _blur(x: Tensor) -> Tensor:
    """RISE's blurred copy of ``x`` (B×3×H×W), its kernel scaled from 224 px to the input size."""
    scale = x.shape[-1] / 224
    kernel = max(3, int(round(_BLUR_KERNEL_AT_224 * scale)) | 1)
    return TF.gaussian_blur(x, kernel_size=[kernel, kernel], sigma=[_BLUR_SIGMA_AT_224 * scale] * 2)
