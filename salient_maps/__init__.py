"""salient: saliency maps for image classifiers, as a reliable bulk job.

One import package with three parts, each its own folder in the repository:
``salient_maps.storage`` (settings, database, object stores; imports neither of the others),
``salient_maps.producer`` (the light side: the ``salient`` command, ``submit``; never imports torch) and
``salient_maps.workers`` (the heavy side: models, methods, the engine, Celery tasks).

The library API, importable from here without loading torch (it loads at the first ``explain`` call):
``explain(images, model=..., methods=..., topk=...)`` returns maps, probabilities and targets as tensors
(``salient_maps.workers.in_memory``); ``open_results(folder or database URL, job)`` opens a job's results
as an Arrow table or a pandas DataFrame and loads a record's map (``salient_maps.storage.result_tables``;
``MapReader``, ``salient_maps.storage.maps``, reads maps from any record's shard).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from salient_maps.storage.maps import MapReader
    from salient_maps.storage.result_tables import JobResults, open_results
    from salient_maps.workers.in_memory import Explanations

__all__ = ["explain", "open_results", "JobResults", "MapReader", "Explanations"]

_LIGHT = {"open_results": "salient_maps.storage.result_tables", "JobResults": "salient_maps.storage.result_tables",
          "MapReader": "salient_maps.storage.maps"}


def explain(images: Any, *args: Any, **kwargs: Any) -> "Explanations":
    """Explain images in this process; the arguments and the result are those of
    ``salient_maps.workers.in_memory.explain`` (needs the worker extra: torch)."""
    try:
        from salient_maps.workers.in_memory import explain as explain_in_memory
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("torch", "torchvision", "timm", "cv2", "PIL"):
            raise ImportError(f"salient_maps.explain needs the worker extra ({exc.name} is not installed): "
                              "pip install 'salient-maps[worker]'") from None
        raise
    return explain_in_memory(images, *args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "Explanations":
        from salient_maps.workers.in_memory import Explanations

        return Explanations
    if name in _LIGHT:
        import importlib

        return getattr(importlib.import_module(_LIGHT[name]), name)
    raise AttributeError(f"module 'salient_maps' has no attribute {name!r}")
