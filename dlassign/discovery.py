"""Declarations collected from the modules of a package: how architectures and datasets register.

A module declares its architectures (or datasets) in a tuple it exports; nothing else lists them.
"""

from __future__ import annotations

import importlib
import pkgutil


def collect(package: str, attribute: str) -> dict[str, object]:
    """{declaration.name: declaration} over the `attribute` tuples of `package`'s modules,
    sorted by name.

    Raises:
      ValueError: two modules declare the same name.
    """
    found: dict[str, object] = {}
    path = importlib.import_module(package).__path__
    for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
        module = importlib.import_module(f"{package}.{info.name}")
        for item in getattr(module, attribute, ()):
            if item.name in found:
                raise ValueError(f"{item.name!r} is declared twice in {package} ({attribute})")
            found[item.name] = item
    return dict(sorted(found.items()))
