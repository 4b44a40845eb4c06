"""``explain``: the library call. Images in (paths, URIs, encoded bytes, numpy arrays, PIL images, tensors),
maps, class probabilities and targets out as CPU tensors; no database, no object store, no queue.

The model, methods and options go through the pipeline's own setup (``storage.job_options.job_spec`` then
``workers.explainers.load_setup``), the pixels through its decoder and resize (``workers.images``), and each
batch of ``batch_size`` images through the same engine (``workers.engine.Explainer``): a map from here equals
the one ``salient run`` stores for the same image and settings.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from salient_maps.storage.job_options import DEFAULT_METHODS, DEFAULT_MODEL, METHOD_OPTIONS, job_spec
from salient_maps.storage.settings import Settings
from salient_maps.storage.sources import SourceError, read_uri, with_command_line_roots

from .engine import Explainer
from .explainers import Setup, SpecError, load_setup, spec_key
from .images import decode_image, stack_inputs, to_input


class ImageInputError(ValueError):
    """One of the images given to ``explain`` cannot be read or is not a picture; says which and why."""


@dataclass
class Explanations:
    """What ``explain`` returns for B images, K target classes each, N classes, on the CPU.

    ``maps[method]``: B×K×H×W float32 in [0, 1] at the model's input size (H×W), covering the part of each image
    the model saw: all of it for a whole-image resize, else the box ``storage.input_crop.input_box(preprocessing,
    width, height)`` gives (fractions of the image's width and height) for the model's centre crop.
    ``arrays[method]``: further B×K×... tensors a method returns beside its map (saliency's signed
    ``gradient`` and its renderings, for instance). ``probs``: B×N softmax of the clean image. ``targets``:
    B×K class ids, the order of the maps' K axis (top-k by probability, or the ``classes`` asked for).
    """

    maps: dict[str, Tensor]
    arrays: dict[str, dict[str, Tensor]]
    probs: Tensor
    targets: Tensor
    class_names: list[str]
    model: str  # the network's tag: architecture and weights digest
    layer: str  # the target layer of the CAM methods ("input" when none is hooked)
    preprocessing: dict  # input size, crop, resize, interpolation, mean, std (``LoadedModel.preprocessing``)

    def target_names(self) -> list[list[str]]:
        """B lists of K class names, as ``targets``."""
        return [[self.class_names[c] for c in row] for row in self.targets.tolist()]


_cache_lock = threading.Lock()
_engine_lock = threading.Lock()
_cached: tuple[tuple, Setup] | None = None  # the last setup: a notebook calling again reuses the loaded model


def explain(images: Any, model: str = DEFAULT_MODEL, methods: str | Sequence[str] = DEFAULT_METHODS, topk: int = 3,
            classes: str | Iterable[int | str] | None = None, *, weights: str | Path | None = None,
            labels: str | Path | None = None, layer: str | None = None, batch_size: int = 16, device: str = "auto",
            precision: str = "fp32", input_size: int | None = None, mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None, crop: str | None = None, resize: int | None = None,
            interpolation: str | None = None, **method_options: Any) -> Explanations:
    """Explain ``images`` with ``methods`` for each image's ``topk`` most probable classes (or ``classes``:
    ids or names), in batches of ``batch_size`` on ``device``.

    ``images``: one image or a list of them. An image is a path or URI (``file://``, ``s3://``, ``http(s)://``,
    read under the settings' limits), encoded bytes, a PIL image, an RGB numpy array H×W×3 (uint8, or float
    in [0, 1]; H×W is grey) or a torch tensor 3×H×W (uint8, or float in [0, 1]); a 4-D array (B×H×W×3) or
    tensor (B×3×H×W) is B images. ``model``, ``weights``, ``labels``, ``layer``, ``precision``, the
    preprocessing overrides (``input_size``, ``mean``, ``std``, ``crop``, ``resize``, ``interpolation``) and
    ``method_options`` (``score``, ``steps``, ``smooth``, ``max_channels``, ...) mean what the ``salient run``
    options of the same names mean. Raises ``ImageInputError`` naming the image that cannot be used, and
    ``ValueError`` for a spec that cannot run (unknown model, method, layer or class).
    """
    unknown = set(method_options) - set(METHOD_OPTIONS)
    if unknown:
        raise TypeError(f"explain() got unknown options {sorted(unknown)}; method options are: "
                        f"{', '.join(METHOD_OPTIONS)}")
    pictures = _as_list(images)
    named = [str(p) for p in (*[p for p in pictures if isinstance(p, (str, os.PathLike))], weights, labels, model)
             if p is not None and _is_local_path(p)]
    # What the caller names is readable, as on an in-process command line (storage/uri_policy.py).
    settings = with_command_line_roots(Settings(), named)
    spec = job_spec(model=model, weights=weights, labels=labels, layer=layer, topk=topk,
                    methods=methods if isinstance(methods, str) else list(methods),
                    classes=classes, precision=precision, batch_size=batch_size, input_size=input_size, mean=mean,
                    std=std, crop=crop, resize=resize, interpolation=interpolation, **method_options)
    setup = _setup(spec, settings, device)
    engine, size = setup.explainer, setup.batch_size
    parts: list = []
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="salient-decode") as pool:
        def decoding(start: int) -> list:  # the next batch decodes while the model runs on this one
            return [pool.submit(_model_input, start + j, image, engine, settings)
                    for j, image in enumerate(pictures[start:start + size])]

        pending = decoding(0)
        for start in range(0, len(pictures), size):
            inputs = [future.result() for future in pending]
            pending = decoding(start + size)
            with _engine_lock:  # one model call at a time on the shared, cached engine
                result = engine.explain(stack_inputs(inputs))
            parts.append((result.probs.cpu(), result.targets.cpu(),
                          {name: (out.maps.float().cpu(), {k: v.cpu() for k, v in out.arrays.items()})
                           for name, out in result.outputs.items()}))
    names = [m.name for m in engine.methods]
    return Explanations(
        maps={name: torch.cat([p[2][name][0] for p in parts]) for name in names},
        arrays={name: {key: torch.cat([p[2][name][1][key] for p in parts]) for key in parts[0][2][name][1]}
                for name in names},
        probs=torch.cat([p[0] for p in parts]), targets=torch.cat([p[1] for p in parts]),
        class_names=list(engine.model.class_names), model=engine.model.tag, layer=engine.layer_name,
        preprocessing=engine.model.preprocessing())


def _setup(spec: dict[str, Any], settings: Settings, device: str) -> Setup:
    """The pipeline's setup for ``spec``; the last one is kept while neither the spec nor a file it names changes."""
    global _cached
    files = tuple((p, os.stat(p).st_mtime_ns) for p in (spec["weights"], spec["labels"], spec["model"])
                  if p is not None and os.path.isfile(p))
    key = (spec_key(spec), device, files)
    with _cache_lock:
        if _cached is not None and _cached[0] == key:
            return _cached[1]
        try:
            setup = load_setup(spec, settings, device)
        except SpecError as exc:
            raise ValueError(str(exc)) from None
        _cached = (key, setup)
        return setup


def _is_local_path(value: Any) -> bool:
    return isinstance(value, os.PathLike) or (isinstance(value, str) and "://" not in value and Path(value).exists())


def _as_list(images: Any) -> list:
    """A list of single images: a 4-D array or tensor is a batch; a list or tuple is several images."""
    if isinstance(images, (list, tuple)):
        if not images:
            raise ImageInputError("no images given")
        return [single for image in images for single in _as_list(image)]
    if isinstance(images, (np.ndarray, Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


def _model_input(index: int, image: Any, engine: Explainer, settings: Settings) -> Tensor:
    """Image ``index`` as the engine's input: 3×S×S float32, resized (and cropped) and normalised as in the pipeline."""
    try:
        rgb = _pixels(image, settings)
    except (SourceError, ValueError, TypeError, OSError) as exc:
        raise ImageInputError(f"image {index} ({_describe(image)}): {exc}") from None
    m = engine.model
    return to_input(rgb, m.resizing, m.mean, m.std)


def _pixels(image: Any, settings: Settings) -> np.ndarray:
    """RGB H×W×3, uint8 or float32 on the 0-255 scale (``to_input`` takes either)."""
    if isinstance(image, (str, os.PathLike)):
        text = str(image)
        uri = text if "://" in text else Path(text).absolute().as_uri()
        return decode_image(read_uri(uri, settings.max_image_bytes, settings, expect_image=True),
                            settings.max_image_pixels)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), settings.max_image_pixels)
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"a tensor image must be 3×H×W (or 1×H×W), not {tuple(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    elif not isinstance(image, np.ndarray):
        from PIL import Image, ImageOps

        if not isinstance(image, Image.Image):
            raise TypeError(f"an image is a path, URI, bytes, PIL image, numpy array or tensor, not "
                            f"{type(image).__name__}")
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))  # as decode_image turns a file
    return _rgb_array(image)


def _rgb_array(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"an array image must be H×W, H×W×3 or H×W×4 (RGB, alpha dropped), not {array.shape}")
    array = array[..., :3] if array.shape[2] != 1 else np.repeat(array, 3, axis=2)
    if min(array.shape[:2]) < 1:
        raise ValueError(f"empty image {array.shape}")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"an array image is uint8 (0-255) or float (0-1), not {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError("the image holds NaN or infinite values")
    if array.min() < 0 or array.max() > 1:
        raise ValueError(f"a float image must lie in [0, 1] (it spans {array.min():.3g}..{array.max():.3g})")
    return np.ascontiguousarray(array, dtype=np.float32) * np.float32(255)


def _describe(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    shape = getattr(image, "shape", None) or getattr(image, "size", None)
    return f"{type(image).__name__} {tuple(shape)}" if shape is not None and not isinstance(image, bytes) \
        else type(image).__name__
