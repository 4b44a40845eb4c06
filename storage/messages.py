"""The message contract between producers and workers: a Celery task called by name with JSON kwargs.

Any service, in any language, can publish these to Redis directly (Celery's message protocol 2,
``content-type: application/json``) on queue ``salient`` with task name ``salient.explain``.
Items must exist in the database first (a producer creates the job and item rows, then publishes),
because a worker records each image's end against its item id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .input_crop import CROP_MODES, INTERPOLATIONS

TASK_NAME = "salient.explain"
MESSAGE_VERSION = 1

# JSON Schema (draft 2020-12) of the task's kwargs, for publishers in other languages.
MESSAGE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "salient.explain kwargs",
    "type": "object",
    "required": ["version", "job_id", "items", "spec"],
    "properties": {
        "version": {"const": MESSAGE_VERSION},
        "job_id": {"type": "string", "description": "jobs.id of an existing job"},
        "items": {
            "type": "array", "minItems": 1,
            "items": {"type": "object", "required": ["id", "uri"], "properties": {
                "id": {"type": "integer", "description": "items.id of a pending item of this job"},
                "uri": {"type": "string", "description": "file://, s3:// or http(s):// URI of the image"},
            }},
        },
        "spec": {
            "type": "object", "required": ["model", "methods", "targets"],
            "properties": {
                "model": {"type": "string", "description": "efficientnet_lite0, a torchvision classifier name, "
                          "timm:NAME, or a model factory (module:function or file.py:function) the workers allow"},
                "preprocessing": {"type": ["object", "null"], "additionalProperties": False,
                                  "description": "overrides of the model's own preprocessing",
                                  "properties": {"input_size": {"type": "integer", "minimum": 16},
                                                 "mean": {"type": "array", "items": {"type": "number"},
                                                          "minItems": 3, "maxItems": 3},
                                                 "std": {"type": "array", "items": {"type": "number"},
                                                         "minItems": 3, "maxItems": 3},
                                                 "crop": {"enum": list(CROP_MODES)},
                                                 "resize": {"type": "integer", "minimum": 16,
                                                            "description": "side before a center/squash crop"},
                                                 "interpolation": {"enum": list(INTERPOLATIONS)}}},
                "weights": {"type": ["string", "null"], "description": "state-dict path or URI the workers can read"},
                "weights_sha256": {"type": ["string", "null"]},
                "labels": {"type": ["string", "null"],
                           "description": "class names file (JSON list or CSV id,name) for a custom model"},
                "layer": {"type": ["string", "null"], "description": "dotted module path; null = last spatial layer"},
                "methods": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                "options": {"type": "object", "description": "`salient run` option values by name: method, metric "
                            "and overlay options, e.g. {\"score\": \"logit\", \"steps\": 32, "
                            "\"colormap\": \"viridis\", \"localize\": true}"},
                "targets": {"oneOf": [
                    {"type": "object", "required": ["topk"], "properties": {"topk": {"type": "integer", "minimum": 1}}},
                    {"type": "object", "required": ["classes"],
                     "properties": {"classes": {"type": "array", "minItems": 1, "description": "ids or names",
                                                "items": {"type": ["integer", "string"]}}}},
                    {"type": "object", "required": ["label"], "properties": {"label": {"const": True}}},
                ], "description": "label: true explains each item's ground-truth label too (alone, or beside "
                                  "topk or classes)"},
                "precision": {"enum": ["fp32", "bf16", "fp16"], "default": "fp32"},
                "batch_size": {"type": "integer", "minimum": 1, "default": 16},
            },
        },
    },
}

SPEC_DEFAULTS: dict[str, Any] = {"weights": None, "weights_sha256": None, "labels": None, "layer": None, "options": {},
                 "precision": "fp32", "batch_size": 16, "preprocessing": None}
PREPROCESSING_KEYS = ("input_size", "mean", "std", "crop", "resize", "interpolation")


class MessageError(ValueError):
    """A message that does not follow the contract."""


@dataclass(frozen=True)
class Chunk:
    job_id: str
    items: list[tuple[int, str]]  # (item id, uri)
    spec: dict[str, Any]


def chunk_message(job_id: str, items: list[tuple[int, str]], spec: dict[str, Any]) -> dict[str, Any]:
    """The task kwargs for ``items`` of ``job_id``."""
    return {"version": MESSAGE_VERSION, "job_id": job_id,
            "items": [{"id": item_id, "uri": uri} for item_id, uri in items], "spec": spec}


def parse_chunk(kwargs: dict[str, Any]) -> Chunk:
    """Validate task kwargs against the contract; the spec comes back with defaults filled in."""
    if kwargs.get("version") != MESSAGE_VERSION:
        raise MessageError(f"message version {kwargs.get('version')!r}, this worker reads {MESSAGE_VERSION}")
    job_id, items, spec = kwargs.get("job_id"), kwargs.get("items"), kwargs.get("spec")
    if not isinstance(job_id, str) or not job_id:
        raise MessageError("job_id must be a non-empty string")
    if not isinstance(items, list) or not items:
        raise MessageError("items must be a non-empty list")
    pairs = []
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("id"), int) and isinstance(item.get("uri"), str)):
            raise MessageError(f"an item must be {{'id': int, 'uri': str}}, got {item!r}")
        pairs.append((item["id"], item["uri"]))
    if not isinstance(spec, dict):
        raise MessageError("spec must be an object")
    spec = {**SPEC_DEFAULTS, **spec}
    if not isinstance(spec.get("model"), str):
        raise MessageError("spec.model must be a string")
    methods = spec.get("methods")
    if not (isinstance(methods, list) and methods and all(isinstance(m, str) for m in methods)):
        raise MessageError("spec.methods must be a non-empty list of method names")
    targets = spec.get("targets")
    topk_ok = isinstance(targets, dict) and isinstance(targets.get("topk"), int) and targets["topk"] >= 1
    classes = targets.get("classes") if isinstance(targets, dict) else None
    classes_ok = isinstance(classes, list) and bool(classes) and all(isinstance(c, (int, str)) for c in classes)
    label_ok = isinstance(targets, dict) and targets.get("label") is True
    if not (topk_ok or classes_ok or label_ok):
        raise MessageError("spec.targets must be {'topk': K}, {'classes': [ids]} or {'label': true}")
    if not isinstance(spec["options"], dict):
        raise MessageError("spec.options must be an object")
    _check_preprocessing(spec["preprocessing"])
    if spec["precision"] not in ("fp32", "bf16", "fp16"):
        raise MessageError("spec.precision must be fp32, bf16 or fp16")
    if not isinstance(spec["batch_size"], int) or spec["batch_size"] < 1:
        raise MessageError("spec.batch_size must be a positive integer")
    return Chunk(job_id=job_id, items=pairs, spec=spec)


def _check_preprocessing(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or set(value) - set(PREPROCESSING_KEYS):
        raise MessageError(f"spec.preprocessing must be an object with only {', '.join(PREPROCESSING_KEYS)}")
    for key in ("input_size", "resize"):
        size = value.get(key)
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 16):
            raise MessageError(f"spec.preprocessing.{key} must be an integer of at least 16")
    for key, choices in (("crop", CROP_MODES), ("interpolation", INTERPOLATIONS)):
        if value.get(key) is not None and value[key] not in choices:
            raise MessageError(f"spec.preprocessing.{key} must be one of {', '.join(choices)}")
    for key in ("mean", "std"):
        numbers = value.get(key)
        if numbers is not None and not (isinstance(numbers, list) and len(numbers) == 3 and all(
                isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers)):
            raise MessageError(f"spec.preprocessing.{key} must be three numbers (R, G, B)")


def broker_config(settings) -> dict[str, Any]:
    """Celery settings both sides share: JSON only, the queue, and the Redis visibility timeout.

    ``unacked_restore_interval`` with throttle 1 makes a worker sweep for a dead worker's messages
    that often; kombu's default (10 s x 10) would add up to ~100 s after the visibility timeout. A sweep
    holds a Redis lock, which a worker killed during its sweep leaves behind until it expires: ten sweep
    intervals (kombu's own 300 s at the default 30 s), not a fixed 300 s that would hold back every
    redelivery far past a short visibility timeout.
    """
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": settings.unacked_restore_interval,
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": max(1, round(10 * settings.unacked_restore_interval)),
    }
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_default_queue": settings.queue,
        "broker_connection_retry_on_startup": True,
    }
