"""Class model visualisation (Simonyan et al. 2014, section 2): the image that maximises a class score."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from sqlalchemy.engine import Engine

from salient_maps.storage.database import ClassVisualization, insert_ignore
from salient_maps.storage.objects import ObjectStore

from .engine import resolve_device
from .models import LoadedModel


@dataclass
class ClassImage:
    """``rgb`` H×W×3 uint8; ``scores`` the class logit before each step and after the last (steps + 1)."""

    rgb: np.ndarray
    scores: list[float]


def visualize_class(model: LoadedModel, class_id: int, steps: int = 200, lr: float = 1.0, l2: float = 1e-3,
                    device: str = "auto") -> ClassImage:
    """Gradient ascent on the input x (normalised space, model.input_size square) from x = 0, the
    dataset-mean image: each step adds ``lr`` × ∇[S_c(x) − l2·‖x‖²], with S_c the class's logit (not its
    probability, which can also rise by pushing the other classes down). Pixels = x·std + mean,
    clipped to [0, 1]. Costs one forward and one backward per step.

    The penalty alone scales x by (1 − 2·lr·l2) per step, so lr·l2 must stay below 1 or x diverges.
    """
    if lr * l2 >= 1:
        raise ValueError(f"lr × l2 = {lr * l2:g} must be below 1: each step would overshoot the L2 penalty and diverge")
    dev = resolve_device(device)
    module = model.module.to(dev)
    size = model.input_size
    x = torch.zeros(1, 3, size, size, device=dev, requires_grad=True)
    scores = torch.empty(steps + 1, device=dev)
    with torch.enable_grad():
        for step in range(steps + 1):
            score = module(x)[0, class_id].float()
            scores[step] = score.detach()
            if step == steps:
                break
            (grad,) = torch.autograd.grad(score - l2 * x.pow(2).sum(), x)
            with torch.no_grad():
                x += lr * grad
    mean = torch.tensor(model.mean, device=dev).view(3, 1, 1)
    std = torch.tensor(model.std, device=dev).view(3, 1, 1)
    pixels = (x.detach()[0] * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return ClassImage(rgb=pixels.permute(1, 2, 0).cpu().numpy(), scores=scores.cpu().tolist())


def params_digest(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def record_class_image(db: Engine, store: ObjectStore, model: LoadedModel, class_id: int, params: dict,
                       image: ClassImage, seconds: float) -> str:
    """PNG into the object store and a ``class_visualizations`` row (a rerun with the same model,
    class and params is a no-op); returns the object key."""
    digest = params_digest(params)
    key = f"class-visualizations/{model.tag}/{class_id}/{digest[:12]}.png"
    ok, png = cv2.imencode(".png", cv2.cvtColor(image.rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    store.put(key, png.tobytes(), "image/png")
    with db.begin() as conn:
        conn.execute(insert_ignore(db, ClassVisualization.__table__, [{
            "model": model.tag, "class_id": class_id, "class_name": model.class_names[class_id],
            "params": params, "params_digest": digest, "image_key": key,
            "initial_score": image.scores[0], "final_score": image.scores[-1], "seconds": seconds,
        }]))
    return key


def make_class_image(db: Engine, store: ObjectStore, model: LoadedModel, class_id: int, steps: int, lr: float,
                     l2: float, device: str = "auto") -> tuple[str, ClassImage]:
    """Visualise ``class_id`` and record it; returns (object key, image)."""
    start = time.perf_counter()
    image = visualize_class(model, class_id, steps=steps, lr=lr, l2=l2, device=device)
    params = {"steps": steps, "lr": lr, "l2": l2, "input_size": model.input_size, "start": "mean image",
              "score": "logit"}
    return record_class_image(db, store, model, class_id, params, image, time.perf_counter() - start), image
