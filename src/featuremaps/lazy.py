"""Packages whose public names load on first use: ``import featuremaps`` (and
``featuremaps.portrait``) imports neither torch nor any submodule until a name is used, which keeps
``featuremaps --help`` and torch-free helpers fast."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping
from typing import Any


def make_lazy(package: str, exports: Mapping[str, str], *, submodules: bool = False) -> None:
    """Turn the (already imported) package ``package`` into one whose names in ``exports`` (public
    name -> the submodule that defines it) load on first use. A submodule named like one of those
    names (``featuremaps.capture``) never replaces it when the import system announces it: the
    public name keeps its meaning, and ``sys.modules`` has the submodule. ``submodules``: other
    names are tried as submodules (``featuremaps.render``) before they are an ``AttributeError``."""

    class _Package(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            where = exports.get(name)
            if where is None:
                if submodules and not name.startswith("__"):
                    try:
                        return importlib.import_module(f".{name}", package)
                    except ModuleNotFoundError as exc:
                        if exc.name != f"{package}.{name}":
                            raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
            value = getattr(importlib.import_module(f".{where}", package), name)
            types.ModuleType.__setattr__(self, name, value)
            return value

        def __setattr__(self, name: str, value: Any) -> None:
            if name in exports and isinstance(value, types.ModuleType) and value.__name__ == f"{package}.{name}":
                return  # the import system announcing a submodule: the public name keeps its meaning
            super().__setattr__(name, value)

        def __dir__(self) -> list[str]:
            return sorted({*vars(self), *exports})

    sys.modules[package].__class__ = _Package
