"""The team's own model code: ``path/to/file.py:FUNCTION`` or ``package.module:FUNCTION`` in, the
``nn.Module`` that function returns out, if the operator allows that factory.

Naming a factory asks a process to run code, so a factory loads only when ``SALIENT_MODEL_FACTORIES``
(storage/settings.py) lists it: an entry ``module:function`` or ``file.py:function`` allows exactly that
function, an entry without a colon (a file or a folder) allows every function of the Python files at or
under it (real paths, after ``..`` and symlinks). Nothing is imported before the check. ``salient run``
allows the one factory its own command line names.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path

from torch import nn

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_FUNCTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class FactoryError(Exception):
    """The factory is not allowed, cannot be found, or returns no module."""


def is_factory(name: str) -> bool:
    """True for ``TARGET:FUNCTION`` (``timm:NAME`` names a timm model, not a factory)."""
    return ":" in name and not name.startswith("timm:")


def _split(name: str) -> tuple[str, str]:
    target, _, function = name.rpartition(":")
    if not _FUNCTION.match(function):
        raise FactoryError(f"{name!r}: expected path/to/file.py:FUNCTION or package.module:FUNCTION")
    if not target.endswith(".py") and not _MODULE.match(target):
        raise FactoryError(f"{name!r}: {target!r} is neither a .py file nor a module name")
    return target, function


def _real(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def factory_allowed(name: str, allowed: list[str]) -> bool:
    """Whether an allowlist (``Settings.model_factories``) lets ``name`` load."""
    target, function = _split(name)
    is_file = target.endswith(".py")
    for entry in allowed:
        if ":" in entry:
            entry_target, entry_function = entry.rsplit(":", 1)
            if entry_function != function:
                continue
            if is_file and entry_target.endswith(".py") and _real(entry_target) == _real(target):
                return True
            if not is_file and entry_target == target:
                return True
        elif is_file:
            root, file = _real(entry), _real(target)
            if file == root or root in file.parents:
                return True
    return False


def check_allowed(name: str, allowed: list[str]) -> None:
    if not factory_allowed(name, allowed):
        raise FactoryError(
            f"refused: model factory {name!r} is not allowed on this worker; the operator lists the factories "
            "(module:function, file.py:function, or a folder of factory files) in SALIENT_MODEL_FACTORIES")


def build(name: str) -> tuple[nn.Module, str]:
    """Call an (already allowed) factory with no arguments: (its module, sha256 of the factory's source)."""
    target, function = _split(name)
    if target.endswith(".py"):
        path = _real(target)
        if not path.is_file():
            raise FactoryError(f"model factory file {target} does not exist")
        source = path.read_bytes()
        spec = importlib.util.spec_from_file_location(f"salient_factory_{hashlib.sha256(source).hexdigest()[:16]}",
                                                      path)
        if spec is None or spec.loader is None:
            raise FactoryError(f"model factory file {target} cannot be imported as Python")
        module = importlib.util.module_from_spec(spec)
        # The file may import its neighbours, as it would when run from its folder; and it is registered while it
        # runs, as an import would, since e.g. @dataclass looks its own module up in sys.modules.
        sys.path.insert(0, str(path.parent))
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(spec.name, None)
            raise FactoryError(f"model factory file {target} failed to import: {type(exc).__name__}: {exc}") from None
        finally:
            sys.path.remove(str(path.parent))
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise FactoryError(f"cannot import model factory module {target}: {type(exc).__name__}: {exc}") from None
        origin = getattr(module, "__file__", None)
        source = Path(origin).read_bytes() if origin else target.encode()
    factory = getattr(module, function, None)
    if not callable(factory):
        raise FactoryError(f"{target} has no function {function!r}")
    try:
        built = factory()
    except Exception as exc:
        raise FactoryError(f"model factory {name} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(built, nn.Module):
        raise FactoryError(f"model factory {name} returned a {type(built).__name__}, not a torch.nn.Module")
    return built, hashlib.sha256(source).hexdigest()
