"""Constructor arguments captured once, so every registered class can report the exact call that rebuilds it.

Heads, lead adapters and preprocessing chains are saved into checkpoints as ``{<registry key>: name, **arguments}``.
Subclasses of :class:`CapturesArguments` get their arguments recorded when they are built (defaults spelled out), so
no class keeps a hand-written list of its own options that could drift from its signature, and a checkpoint never
depends on today's defaults.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

__all__ = ["CapturesArguments", "plain"]


def plain(value: Any) -> Any:
    """Tuples to lists and mappings to dicts, recursively: what YAML and JSON write back as they read it."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class CapturesArguments:
    """Mixin: ``self.captured_arguments()`` is the keyword arguments of the outermost ``__init__`` call.

    ``skip_arguments`` names constructor parameters that are not options (an adapter's leads and backbone).
    """

    skip_arguments: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_captures_arguments", False):
            return

        @functools.wraps(init)
        def wrapped(self: Any, *args: Any, **kw: Any) -> None:
            signature = inspect.signature(init)  # at each call: the defaults in force, not those at import
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            init(self, *args, **kw)
            arguments: dict[str, Any] = {}
            for name, value in list(bound.arguments.items())[1:]:
                if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(value)
                elif signature.parameters[name].kind is not inspect.Parameter.VAR_POSITIONAL:
                    arguments[name] = value
            # the outermost __init__ returns last, so its call is the one kept
            object.__setattr__(self, "_captured_arguments", arguments)

        wrapped._captures_arguments = True  # type: ignore[attr-defined]
        cls.__init__ = wrapped  # type: ignore[method-assign]

    def captured_arguments(self) -> dict[str, Any]:
        """The constructor's keyword arguments, defaults included, minus ``skip_arguments`` (plain lists/dicts)."""
        arguments = getattr(self, "_captured_arguments", {})  # {} for a class whose __init__ takes nothing
        return {k: plain(v) for k, v in arguments.items() if k not in self.skip_arguments}
