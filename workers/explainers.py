"""Spec -> ready ItemProcessor: the one setup path of ``salient run`` and the queue workers. A worker
caches processors, so it loads each (model, weights digest, layer, methods, options, targets,
precision) once and reuses it for every later message with that spec."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sqlalchemy.engine import Engine

from salient_maps.storage.job_options import METHOD_OPTIONS, OVERLAY_FILES, OVERLAY_OPTIONS, SPEC_OPTIONS
from salient_maps.storage.objects import ObjectStore
from salient_maps.storage.overlays import OverlayStyle
from salient_maps.storage.settings import Settings
from salient_maps.storage.sources import allowed_local_path, file_sha256, read_uri

from . import factories
from .batching import ModelLock, guard_model
from .engine import Explainer
from .metrics import Faithfulness
from .process import ItemProcessor

MAX_DOWNLOAD_BYTES = 8 << 30


class SpecError(ValueError):
    """The spec cannot be explained (unknown model, method or option, bad weights, ...): ``salient run``
    stops with the reason before any image; a worker fails every item of the message with it."""


def spec_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _local_file(location: str | None, settings: Settings, expected_sha256: str | None = None) -> Path | None:
    """A local file for a spec's weights or labels: a path under the file roots (storage/uri_policy.py), an
    s3:// or http(s):// URI downloaded once into DATA_DIR/downloads/ (named by its sha256)."""
    if location is None:
        return None
    scheme = urlparse(location).scheme
    if scheme not in ("s3", "http", "https"):
        return allowed_local_path(location, settings)
    cache = settings.data_dir / "downloads"
    cached = cache / expected_sha256 if expected_sha256 else None
    # A damaged copy (a disk error, a hand edit) is fetched again rather than failing every image.
    if cached is not None and cached.is_file() and file_sha256(cached) == expected_sha256:
        return cached
    data = read_uri(location, MAX_DOWNLOAD_BYTES, settings)
    digest = hashlib.sha256(data).hexdigest()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / digest
    if not path.is_file() or path == cached:
        # Named per process and thread: workers sharing the folder may download the same file at once.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


@dataclass(frozen=True)
class Setup:
    """What a spec asks for, loaded and checked: the engine and the processor's settings. No database
    or object store is touched yet, so a bad spec fails before a job exists."""

    explainer: Explainer
    batch_size: int
    metrics: Faithfulness | None
    overlay_style: OverlayStyle
    localize: bool
    store_overlays: bool = False  # --overlays store

    def processor(self, settings: Settings, db: Engine, store: ObjectStore) -> ItemProcessor:
        return ItemProcessor(settings, db, store, self.explainer, batch_size=self.batch_size, metrics=self.metrics,
                             overlay_style=self.overlay_style, localize=self.localize,
                             store_overlays=self.store_overlays)


def load_setup(spec: dict[str, Any], settings: Settings, device: str) -> Setup:
    """Load and check everything a spec (``storage.job_options.job_spec``) names: model, weights,
    labels, layer, methods and their options, targets, metrics, overlay style. ``salient run`` and
    the queue workers both build their pipeline here; raises ``SpecError`` with the reason."""
    from salient_maps.storage.sources import SourceError

    from .methods import MethodError, build_methods
    from .models import ModelError, load_model, resolve_layer
    from .targets import Targets, parse_classes

    options = dict(spec.get("options") or {})
    localize = bool(options.pop("localize", False))
    overlays = options.pop("overlays", None) or "none"
    try:
        unknown = set(options) - set(SPEC_OPTIONS)
        if unknown:
            raise SpecError(f"unknown options {sorted(unknown)}")
        if overlays not in OVERLAY_FILES:
            raise SpecError(f"overlays must be one of {', '.join(OVERLAY_FILES)}, not {overlays!r}")
        metrics, overlay_style = _output_settings(options)
        methods = build_methods(spec["methods"], {k: v for k, v in options.items() if k in METHOD_OPTIONS})
        expected = spec.get("weights_sha256")
        weights = _local_file(spec.get("weights"), settings, expected)
        if weights is not None and expected and file_sha256(weights) != expected:
            raise SpecError(f"weights {spec['weights']} differ from the file that was submitted (sha256 {expected})")
        model = spec["model"]
        if factories.is_factory(model):  # code: only the factories the operator allows
            factories.check_allowed(model, settings.model_factories)
        elif not model.startswith("timm:") and ("/" in model or "." in model):
            # a TorchScript file is a program: only from under the file roots
            model = str(allowed_local_path(model, settings))
        loaded = load_model(model, weights, _local_file(spec.get("labels"), settings),
                            **(spec.get("preprocessing") or {}))
        layer = resolve_layer(loaded, spec.get("layer"), needed=any("layer" in m.needs for m in methods))
        if loaded.scripted and (python_only := [m.name for m in methods if m.python_model_only]):
            raise SpecError(
                f"{', '.join(python_only)} cannot run on a TorchScript model ({loaded.name}): the compiled graph "
                "calls its ReLUs where the guided rule cannot reach them, so the result would be the plain "
                "gradient; load the model as Python code (--model ARCH --weights FILE) or use saliency, "
                "integrated_gradients")
        classes = spec["targets"].get("classes")
        targets = Targets(topk=None if classes else spec["targets"].get("topk"),
                          classes=parse_classes(",".join(map(str, classes)), loaded.class_names) if classes else (),
                          label=bool(spec["targets"].get("label")))
        explainer = Explainer(loaded, layer, methods, targets, device=device, precision=spec["precision"])
    except (ModelError, MethodError, SourceError, factories.FactoryError, FileNotFoundError, TypeError,
            ValueError) as exc:
        raise SpecError(str(exc)) from None
    return Setup(explainer, spec["batch_size"], metrics, overlay_style, localize, overlays == "store")


def build_processor(spec: dict[str, Any], settings: Settings, db: Engine, store: ObjectStore,
                    device: str) -> ItemProcessor:
    """A ready processor for a spec (see ``load_setup``)."""
    return load_setup(spec, settings, device).processor(settings, db, store)


def _output_settings(options: dict[str, Any]) -> tuple[Faithfulness | None, OverlayStyle]:
    """Faithfulness metrics (None when not asked for) and the overlay style from a spec's options."""
    style = OverlayStyle(**{name: options[name] for name in OVERLAY_OPTIONS if options.get(name) is not None})
    if not options.get("metrics"):
        return None, style
    metrics = Faithfulness(
        metrics=tuple(m.strip() for m in options["metrics"].split(",") if m.strip()),
        **{key: value for key, value in (("steps", options.get("metric_steps")),
                                         ("baseline", options.get("metric_baseline"))) if value is not None},
    )
    return metrics, style


class ProcessorCache:
    """The last few processors by spec; building one (loading a model) happens under a lock, once."""

    def __init__(self, settings: Settings, db: Engine, store: ObjectStore, device: str,
                 model_lock: ModelLock, size: int = 2):
        self.settings, self.db, self.store, self.device, self.size = settings, db, store, device, size
        self.model_lock = model_lock  # one device: every model call of every processor takes it
        self._lock = threading.Lock()
        self._processors: OrderedDict[str, ItemProcessor] = OrderedDict()

    def get(self, spec: dict[str, Any]) -> ItemProcessor:
        key = spec_key(spec)
        with self._lock:
            processor = self._processors.get(key)
            if processor is None:
                processor = guard_model(build_processor(spec, self.settings, self.db, self.store, self.device),
                                        self.model_lock)
                self._processors[key] = processor
                while len(self._processors) > self.size:
                    self._processors.popitem(last=False)
            self._processors.move_to_end(key)
            return processor
