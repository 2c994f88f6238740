"""Integrations with other libraries, installed when that library is imported.

``import star_hf`` must stay cheap (PEFT pulls in Transformers and Accelerate, seconds of import
time), so an integration is not installed eagerly: :func:`install_import_hooks` installs it at once
if its library is already imported, and otherwise registers a one-shot post-import hook that
installs it right after the library's own import finishes, whichever order the user imports in.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

__all__ = ["install_import_hooks"]

# top-level package -> star_hf module that integrates with it when imported
_INTEGRATIONS = {"peft": "star_hf.integrations.peft"}


def _install(package: str) -> None:
    # An integration module installs itself when imported. If it is the one importing the package
    # (``import star_hf.integrations.peft`` first), this returns it half-initialised and its own
    # import finishes the installation.
    importlib.import_module(_INTEGRATIONS[package])


class _InstallAfterExec(importlib.abc.Loader):
    """Runs the package's own loader, then installs the integration."""

    def __init__(self, loader: importlib.abc.Loader, package: str) -> None:
        self._loader = loader
        self._package = package

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The module keeps the package's own loader (tools read sources through __loader__).
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _install(self._package)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the loader the other finders return for a watched package."""

    def find_spec(self, fullname: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _INTEGRATIONS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _InstallAfterExec(spec.loader, fullname)
                return spec
        return None


def install_import_hooks() -> None:
    """Install every integration whose library is imported; watch for the others (idempotent)."""
    for package in _INTEGRATIONS:
        if package in sys.modules:
            _install(package)
    pending = [p for p in _INTEGRATIONS if p not in sys.modules]
    if pending and not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
