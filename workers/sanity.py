"""Model-parameter randomisation test (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

The weight layers of the model are re-initialised one by one from the output towards the input (a
cascade); at chosen steps every method explains the same images and classes again, and its maps are
compared with the maps of the trained model. A method that depends on what the model learned gives
maps that decorrelate as the cascade goes down (Spearman rank correlation and SSIM fall towards 0);
a method whose maps stay the same is explaining the image, not the model.

Cost: one explanation pass over the sample per measured step (``stops``), plus one before.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import rankdata
from skimage.metrics import structural_similarity
from sqlalchemy import select
from torch import Tensor, nn

from salient_maps.storage.database import Item, Job
from salient_maps.storage.settings import Settings
from salient_maps.storage.sources import SourceError, read_uri

from .engine import Explainer
from .images import decode_image, stack_inputs, to_input
from .methods import Method
from .models import LoadedModel
from .targets import Targets


@dataclass(frozen=True)
class PinnedTargets(Targets):
    """The classes each image of one batch was explained for (B×K), whatever the model now predicts."""

    ids: Tensor | None = None

    def select(self, probs: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.ids is None:
            raise ValueError("pinned targets need the class ids each image was explained for")
        return self.ids.to(probs.device)


@dataclass
class CascadeStep:
    """Maps after randomising ``randomised`` weight layers, the last being ``layer``; per method the
    mean and standard deviation over images and classes of the similarity to the trained model's maps."""

    layer: str
    randomised: int
    scores: dict[str, dict[str, float]] = field(default_factory=dict)


def weight_layers(module: nn.Module, input_size: int) -> list[str]:
    """Dotted names of modules with their own weight matrix or kernel (convolutions, linear layers), in
    the order a forward pass runs them; normalisation layers are left out and keep their values."""
    names = {m: n for n, m in module.named_modules() if n}
    order: list[str] = []

    def hook(mod, _inp, _out):
        weight = getattr(mod, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() >= 2 and names[mod] not in order:
            order.append(names[mod])

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, input_size, input_size, device=next(module.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return order


def cascade_stops(layers: int, stops: int) -> list[int]:
    """Which cascade positions (1 = only the top layer randomised, ``layers`` = all) get measured:
    ``stops`` of them spread evenly, always the first and the last."""
    if stops >= layers:
        return list(range(1, layers + 1))
    return sorted({int(round(v)) for v in np.linspace(1, layers, max(stops, 2))})


def randomise(layer: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise a layer's weight (and bias) from a seeded normal distribution scaled like
    He initialisation, so activations keep their magnitude and the maps stay defined."""
    with torch.no_grad():
        weight: Tensor = layer.weight  # type: ignore[assignment]  # the layers randomised have one
        fan_in = weight[0].numel()
        noise = torch.randn(weight.shape, generator=generator, dtype=torch.float32)
        weight.copy_((noise * (2.0 / fan_in) ** 0.5).to(weight))
        bias = getattr(layer, "bias", None)
        if bias is not None:
            bias.zero_()


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of N pairs of flattened maps (N×P each), ties given their mean rank.
    A constant map has no ranking: the pair scores 1 if both are constant, else 0."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    norm = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    both_constant = (ra.std(axis=1) == 0) & (rb.std(axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(axis=1) / norm
    return np.where(norm > 0, rho, np.where(both_constant, 1.0, 0.0))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM (Wang et al. 2004: Gaussian window σ 1.5) of N pairs of H×W maps in [0, 1]."""
    return np.array([structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                           use_sample_covariance=False) for x, y in zip(a, b)])


def _explain(model: LoadedModel, layer: str | None, methods: list[Method], x: Tensor, targets: Tensor,
             device: str, batch_size: int) -> dict[str, np.ndarray]:
    """Per method N×K×H×W maps (float64, on the host) of images ``x`` for their pinned ``targets``."""
    maps: dict[str, list[np.ndarray]] = {m.name: [] for m in methods}
    for start in range(0, len(x), batch_size):
        batch = slice(start, start + batch_size)
        explainer = Explainer(model, layer, methods, PinnedTargets(topk=None, ids=targets[batch]), device=device)
        result = explainer.explain(x[batch])
        for m in methods:
            maps[m.name].append(result.outputs[m.name].maps.detach().float().cpu().numpy().astype(np.float64))
    return {name: np.concatenate(parts) for name, parts in maps.items()}


def run_cascade(model: LoadedModel, layer: str | None, methods: list[Method], x: Tensor, topk: int = 1,
                stops: int = 8, seed: int = 0, device: str = "auto",
                batch_size: int = 16) -> tuple[list[str], list[CascadeStep]]:
    """The randomisation cascade on images ``x`` (N×3×H×W model input) for their ``topk`` classes under
    the trained model. The caller's model is not changed (a copy is randomised). Returns the weight
    layers top first and one ``CascadeStep`` per measured stop."""
    trained = dataclasses.replace(model, module=copy.deepcopy(model.module))
    explainer = Explainer(trained, layer, methods, Targets(topk=topk), device=device)
    with torch.no_grad():
        probs = torch.cat([explainer.module(x[i:i + batch_size].to(explainer.device)).float().softmax(1)
                           for i in range(0, len(x), batch_size)])
    targets = probs.topk(topk, dim=1).indices
    before = _explain(trained, layer, methods, x, targets, device, batch_size)
    layers = weight_layers(trained.module, x.shape[-1])[::-1]
    generator = torch.Generator().manual_seed(seed)
    steps = []
    done = 0
    for stop in cascade_stops(len(layers), stops):
        for name in layers[done:stop]:
            randomise(trained.module.get_submodule(name), generator)
        done = stop
        after = _explain(trained, layer, methods, x, targets, device, batch_size)
        step = CascadeStep(layer=layers[stop - 1], randomised=stop)
        for name, maps in before.items():
            a, b = maps.reshape(-1, *maps.shape[-2:]), after[name].reshape(-1, *maps.shape[-2:])
            rho = spearman(np.abs(a).reshape(len(a), -1), np.abs(b).reshape(len(b), -1))
            similarity = ssim(a, b)
            step.scores[name] = {"spearman": float(rho.mean()), "spearman_std": float(rho.std()),
                                 "ssim": float(similarity.mean()), "ssim_std": float(similarity.std())}
        steps.append(step)
    return layers, steps


def format_table(steps: list[CascadeStep]) -> str:
    """Plain-text table: one row per cascade step, Spearman and SSIM per method."""
    methods = list(steps[0].scores) if steps else []
    head = f"{'randomised':>10}  {'down to layer':<28}" + "".join(f"  {m[:16] + ' ρ':>18}  {'SSIM':>6}"
                                                                  for m in methods)
    lines = [head, "-" * len(head)]
    for step in steps:
        cells = "".join(f"  {step.scores[m]['spearman']:>18.3f}  {step.scores[m]['ssim']:>6.3f}" for m in methods)
        lines.append(f"{step.randomised:>10}  {step.layer[-28:]:<28}{cells}")
    return "\n".join(lines)


def sample_uris(uris: list[str], n: int, seed: int = 0) -> list[str]:
    """``n`` of ``uris`` chosen at random with a fixed seed (all of them if there are no more), in order."""
    if len(uris) <= n:
        return uris
    chosen = set(random.Random(seed).sample(range(len(uris)), n))
    return [u for i, u in enumerate(uris) if i in chosen]


def job_config(conn, job_id: str) -> tuple[dict, list[str]]:
    """A job's settings and the URIs of its explained images."""
    job = conn.execute(select(Job).where(Job.id == job_id)).first()
    if job is None:
        raise LookupError(f"no job {job_id}")
    uris = conn.execute(select(Item.uri).where(Item.job_id == job_id, Item.status.in_(("done", "skipped")))
                        .order_by(Item.id)).scalars().all()
    return job.settings or {}, list(uris)


def load_inputs(uris: list[str], model: LoadedModel, settings: Settings) -> tuple[Tensor, list[str], dict[str, str]]:
    """Model inputs N×3×H×W of the readable images, their URIs, and the reason for each unreadable one."""
    inputs, used, failed = [], [], {}
    for uri in uris:
        try:
            rgb = decode_image(read_uri(uri, settings.max_image_bytes, settings, expect_image=True),
                               settings.max_image_pixels)
        except SourceError as exc:
            failed[uri] = str(exc)
            continue
        inputs.append(to_input(rgb, model.resizing, model.mean, model.std))
        used.append(uri)
    if not inputs:
        raise ValueError("no readable image to check")
    return stack_inputs(inputs), used, failed
