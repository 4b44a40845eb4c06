"""Message spec -> ready ItemProcessor, cached: a worker loads each (model, weights digest, layer,
methods, options, targets, precision) once and reuses it for every later message with that spec."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sqlalchemy.engine import Engine

from storage.objects import ObjectStore
from storage.settings import Settings
from storage.sources import allowed_local_path, read_uri

from .batching import guard_model
from .process import ItemProcessor

MAX_DOWNLOAD_BYTES = 8 << 30


class SpecError(ValueError):
    """The spec cannot be explained by this worker (unknown model, method or option, bad weights);
    every item of the message fails with this reason."""


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
    if expected_sha256 and (cache / expected_sha256).is_file():
        return cache / expected_sha256
    data = read_uri(location, MAX_DOWNLOAD_BYTES, settings)
    digest = hashlib.sha256(data).hexdigest()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / digest
    if not path.is_file():
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


def build_processor(spec: dict[str, Any], settings: Settings, db: Engine, store: ObjectStore,
                    device: str) -> ItemProcessor:
    """The same construction as ``salient run`` (workers/cli.py), from a message spec."""
    from storage.sources import SourceError

    # The run command's own option parsing, so a worker reads the options exactly as `run` does.
    from .cli import METHOD_OPTIONS, _output_settings
    from .engine import Explainer
    from .methods import MethodError, build_methods
    from .models import ModelError, _file_digest, load_model, resolve_layer
    from .targets import Targets, parse_classes

    options = dict(spec.get("options") or {})
    localize = bool(options.pop("localize", False))
    try:
        metrics, overlay_style = _output_settings(options)
        unknown = set(options) - set(METHOD_OPTIONS)
        if unknown:
            raise SpecError(f"unknown options {sorted(unknown)}")
        methods = build_methods(spec["methods"], options)
        expected = spec.get("weights_sha256")
        weights = _local_file(spec.get("weights"), settings, expected)
        if weights is not None and expected and _file_digest(weights) != expected:
            raise SpecError(f"weights {spec['weights']} differ from the file that was submitted (sha256 {expected})")
        model = spec["model"]
        if "/" in model or "." in model:  # a TorchScript file is a program: only from under the file roots
            model = str(allowed_local_path(model, settings))
        loaded = load_model(model, weights, _local_file(spec.get("labels"), settings))
        layer = resolve_layer(loaded, spec.get("layer"), needed=any("layer" in m.needs for m in methods))
        classes = spec["targets"].get("classes")
        targets = Targets(topk=None, classes=parse_classes(",".join(map(str, classes)), loaded.class_names)) \
            if classes else Targets(topk=spec["targets"]["topk"])
        explainer = Explainer(loaded, layer, methods, targets, device=device, precision=spec["precision"])
    except (ModelError, MethodError, SourceError, FileNotFoundError, TypeError, ValueError) as exc:
        raise SpecError(str(exc)) from None
    return ItemProcessor(settings, db, store, explainer, batch_size=spec["batch_size"], metrics=metrics,
                         overlay_style=overlay_style, localize=localize)


class ProcessorCache:
    """The last few processors by spec; building one (loading a model) happens under a lock, once."""

    def __init__(self, settings: Settings, db: Engine, store: ObjectStore, device: str,
                 model_lock: threading.Lock, size: int = 2):
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
