"""Task heads. Importing this package imports every module in it, so a new head is one file with one
``@HEADS.register("kind")`` decorator; each registered class is also importable from here
(``ecgfm.heads.OrdinalHead``)."""

import importlib
import pkgutil

from ecgfm.heads.base import Head, create_head
from ecgfm.registry import HEADS

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

globals().update({HEADS.get(kind).__name__: HEADS.get(kind) for kind in HEADS.names()})

__all__ = ["Head", "create_head", *sorted(HEADS.get(kind).__name__ for kind in HEADS.names())]
