"""Task heads. Importing this package imports every module in it, so a new head is one file with one
``@register_head`` decorator; each registered class is also importable from here (``ecgfm.heads.OrdinalHead``)."""

import importlib
import pkgutil

from ecgfm.heads.base import _HEADS, Head, create_head, list_heads, register_head

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

globals().update({cls.__name__: cls for cls in _HEADS.values()})

__all__ = ["Head", "create_head", "list_heads", "register_head", *sorted(cls.__name__ for cls in _HEADS.values())]
