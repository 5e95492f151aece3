"""The one registry every extensible kind uses: register a name, create from ``name`` or ``{name: ..., **options}``.

Backbones, heads, lead adapters, preprocessing chains and source readers each have one :class:`Registry` below, so
adding one is one file with one decorator (``@BACKBONES.register("my-net")``), every kind is created the same way
and every unknown name or option fails with the same wording, listing what is known. Each registry imports the
modules of its built-in entries on first use, so ``SOURCES.create("wfdb")`` loads the readers and never torch.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

__all__ = [
    "ADAPTERS",
    "BACKBONES",
    "HEADS",
    "IMAGE_PREPROCESSING",
    "PREPROCESSING",
    "REGISTRIES",
    "SOURCES",
    "MissingOptionError",
    "Registry",
    "UnknownNameError",
]

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name (or an option) that no registry entry has; the message lists the known ones."""


class MissingOptionError(ValueError):
    """An entry created without an option it requires; raised before the call, so the message names the option
    instead of Python's ``TypeError: __init__() missing 1 required positional argument``."""

    def __init__(self, message: str, kind: str, name: str, missing: list[str]) -> None:
        super().__init__(message)
        self.kind, self.name, self.missing = kind, name, missing


class Registry(Generic[T]):
    """Named factories of one kind (classes or functions).

    Args:
        kind: what the entries are, in messages (``"backbone"``).
        key: the dict key that names the entry in a spec; heads use ``kind`` because ``name`` is the head's own name.
        supplied: leading constructor arguments the framework passes, which are not options (an adapter's leads and
            backbone).
        builtins: modules whose import registers the built-in entries, imported on first use: names, not imports,
            so that the registry stays below every module that registers in it (no import cycle).
    """

    def __init__(
        self, kind: str, key: str = "name", supplied: tuple[str, ...] = (), builtins: tuple[str, ...] = ()
    ) -> None:
        self.kind = kind
        self.key = key
        self.supplied = supplied
        self.builtins = builtins
        self._entries: dict[str, T] = {}
        self._loaded = not builtins

    def _load_builtins(self) -> None:
        """Import the built-in modules once; they register through this registry while they import."""
        if self._loaded:
            return
        self._loaded = True  # first: a module being imported that registers here must not start the import again
        try:
            for module in self.builtins:
                importlib.import_module(module)
        except BaseException:
            self._loaded = False  # the next use tries again and fails the same way, not with a half-filled registry
            raise

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering a class or factory under ``name``; a class also gets ``cls.<key> = name``."""

        self._load_builtins()  # a name taken by a built-in is refused here, naming the built-in

        def add(entry: T) -> T:
            known = self._entries.get(name)
            if known is not None and known is not entry:
                raise ValueError(f"{self.kind} {name!r} is already registered by {_qualname(known)}")
            if isinstance(entry, type):
                setattr(entry, self.key, name)
            self._entries[name] = entry
            return entry

        return add

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load_builtins()
        return len(self._entries)

    def get(self, name: str) -> T:
        """The class or factory registered under ``name``."""
        self._load_builtins()
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {self.key} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def parse(self, spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """``"name"`` or ``{key: "name", **options}`` -> ``(name, options)``."""
        if isinstance(spec, str):
            return spec, {}
        if isinstance(spec, Mapping):
            if self.key not in spec:
                raise ValueError(f"a {self.kind} given as a dict needs a {self.key!r} key, got keys {sorted(spec)}")
            options = dict(spec)
            return str(options.pop(self.key)), options
        raise ValueError(f"a {self.kind} is given as a name or a dict with {self.key!r}, not {type(spec).__name__}")

    def create(self, spec: str | Mapping[str, Any], *args: Any, **extra: Any) -> Any:
        """Build the entry ``spec`` names with its options (and ``args``/``extra`` the caller adds).

        An option the entry does not take fails here, with the options it does take, instead of being ignored;
        so does a required option that is not given (:class:`MissingOptionError`).
        """
        name, options = self.parse(spec)
        factory = self.get(name)
        options.update(extra)
        accepted = self.options_of(name)
        if accepted is not None:
            unknown = sorted(set(options) - set(accepted))
            if unknown:
                raise UnknownNameError(
                    f"{self.kind} {name!r} has no option {', '.join(map(repr, unknown))}; "
                    f"its options: {', '.join(accepted) or 'none'}"
                )
        missing = self.required_options(name, len(args), options)
        if missing:
            raise MissingOptionError(
                f"{self.kind} {name!r} needs the option{'s' if len(missing) > 1 else ''} "
                f"{', '.join(map(repr, missing))}; its options: {', '.join(accepted or missing)}",
                self.kind,
                name,
                missing,
            )
        return factory(*args, **options)

    def required_options(self, name: str, n_args: int = 0, given: Mapping[str, Any] | None = None) -> list[str]:
        """The entry's parameters without a default that neither the first ``n_args`` positional arguments nor
        ``given`` fill (the ``supplied`` ones excepted: the framework passes those)."""
        factory = self.get(name)
        try:
            signature = inspect.signature(factory.__init__ if isinstance(factory, type) else factory)
        except (TypeError, ValueError):  # a builtin without a signature: let the call itself fail
            return []
        params = [p for p in signature.parameters.values() if p.name != "self"]
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        filled = {p.name for p in [p for p in params if p.kind in positional][:n_args]}
        return [
            p.name
            for p in params
            if p.default is inspect.Parameter.empty
            and p.kind in (*positional, inspect.Parameter.KEYWORD_ONLY)
            and p.name not in filled
            and p.name not in (given or {})
            and p.name not in self.supplied
        ]

    def options_of(self, name: str) -> list[str] | None:
        """The options the entry takes: its ``options`` attribute when it declares one (a factory taking
        ``**kwargs``), else its keyword parameters minus the ``supplied`` ones; None when it takes any keyword."""
        factory = self.get(name)
        declared = getattr(factory, "options", None)
        if isinstance(declared, (list, tuple)):
            return list(declared)
        signature = inspect.signature(factory.__init__ if isinstance(factory, type) else factory)
        params = [p for p in signature.parameters.values() if p.name != "self" and p.name not in self.supplied]
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        if isinstance(factory, type) and params and all(p.kind in variadic for p in params):
            return []  # a class without an __init__ of its own (object's or nn.Module's): no options
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [p.name for p in params if p.kind in keyword]

    def describe(self, name: str) -> str:
        """The first sentence of the entry's docstring: what ``ecgfm list`` prints beside the name."""
        doc = inspect.getdoc(self.get(name)) or ""
        paragraph = " ".join(doc.strip().split("\n\n")[0].split())
        end = paragraph.find(". ")
        return paragraph if end < 0 else paragraph[: end + 1]


def _qualname(entry: Any) -> str:
    return f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', repr(entry))}"


#: Backbones: factories ``fn(**architecture, input=None) -> nn.Module`` with a ``model_config``.
BACKBONES: Registry = Registry("backbone", builtins=("ecgfm.backbones",))
#: Task heads: ``Head`` subclasses; a spec names its class with ``kind`` (``{kind: multilabel, name: dx, ...}``).
HEADS: Registry = Registry("head", key="kind", builtins=("ecgfm.heads",))
#: Lead adapters: ``LeadAdapter`` subclasses built as ``cls(input_leads, backbone, **options)``.
ADAPTERS: Registry = Registry("adapter", supplied=("input_leads", "backbone"), builtins=("ecgfm.adapters",))
#: On-device preprocessing chains: ``nn.Module`` classes with ``forward(x, lead_mask)`` and ``config()``.
PREPROCESSING: Registry = Registry("preprocessing", builtins=("ecgfm.signal",))
#: Image preprocessing for ECG image files (scans, photos, PDFs printed to PNG): classes with ``__call__(image) ->
#: [3, H, W] page`` and ``config()``, run on the CPU where the images are decoded (numpy/scipy, no torch).
IMAGE_PREPROCESSING: Registry = Registry("image preprocessing", builtins=("ecgfm.image_preprocessing",))
#: Source readers: ``SourceReader`` subclasses that find and read records of one on-disk format (no torch).
SOURCES: Registry = Registry("source", builtins=("ecgfm.data.sources",))

#: Every registry by the plural ``ecgfm list`` takes.
REGISTRIES: dict[str, Registry] = {
    "backbones": BACKBONES,
    "heads": HEADS,
    "adapters": ADAPTERS,
    "preprocessing": PREPROCESSING,
    "image-preprocessing": IMAGE_PREPROCESSING,
    "sources": SOURCES,
}
