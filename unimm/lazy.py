"""Packages whose public names are imported on first use (PEP 562), and registration that waits for the module it
registers with, so importing ``unimm`` stays cheap."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, whose name ``exports[name]`` is defined in its
    submodule of that name: ``__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)``."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{exports[name]}", package), name)

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__


class _NotifyingLoader(importlib.abc.Loader):
    """Runs a module's own loader, then a callback: the module is complete when the callback runs."""

    def __init__(self, loader: importlib.abc.Loader, callback: Callable[[], None]) -> None:
        self.loader = loader
        self.callback = callback

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader  # as if this wrapper had never been there
        self.callback()


class _ImportHook(importlib.abc.MetaPathFinder):
    """Finds ``name`` with the other finders once, and has its loader call ``callback`` after the module ran."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name = name
        self.callback = callback

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once: the callback may import other modules
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _NotifyingLoader(spec.loader, self.callback)
                return spec
        return None


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` once the module ``name`` is imported: now if it already is, else right after its
    first import (wrapt's post-import hooks, in a few lines). ``import unimm`` registers its classes with
    transformers' Auto classes this way, so it costs nothing until a program uses those Auto classes."""
    if name in sys.modules:
        callback()
    else:
        sys.meta_path.insert(0, _ImportHook(name, callback))
