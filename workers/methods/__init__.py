"""Explanation methods: one small module each. A new method is a new file here defining a
``Method`` subclass with a unique ``name``; it is registered by discovery, no list to edit."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from .base import ForwardPass, Method, MethodOutput


def _discover() -> dict[str, type[Method]]:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    found: dict[str, type[Method]] = {}
    stack = list(Method.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if getattr(cls, "name", None):
            found[cls.name] = cls
    return dict(sorted(found.items()))


METHODS: dict[str, type[Method]] = _discover()


class MethodError(ValueError):
    pass


def build_methods(names: list[str], options: dict | None = None) -> list[Method]:
    """Instantiate methods by name; each gets the ``options`` its constructor accepts
    (e.g. ``score``, ``definition``, ``steps``), so one set of CLI flags serves every method."""
    if names == ["all"]:
        names = list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise MethodError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(METHODS)} or all")
    options = {k: v for k, v in (options or {}).items() if v is not None}
    methods = []
    for name in dict.fromkeys(names):
        cls = METHODS[name]
        accepted = inspect.signature(cls.__init__).parameters
        methods.append(cls(**{k: v for k, v in options.items() if k in accepted}))
    return methods


__all__ = ["ForwardPass", "Method", "MethodOutput", "METHODS", "MethodError", "build_methods"]
