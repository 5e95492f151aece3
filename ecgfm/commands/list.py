"""``ecgfm list [backbones | heads | adapters | preprocessing | sources]``: what a recipe can name, and its options."""

from __future__ import annotations

from typing import Literal

from jsonargparse import ArgumentParser

from ecgfm.registry import REGISTRIES, Registry

KINDS = tuple(REGISTRIES)


def list_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="ecgfm list",
        exit_on_error=False,  # ecgfm.commands.main prints one line
        description="The registered names of one kind (every kind when none is given), each with the first line of "
        "its docstring and the options a recipe can give it.",
    )
    parser.add_argument("kind", type=Literal[KINDS] | None, nargs="?", default=None, help=" | ".join(KINDS))
    return parser


def run(argv: list[str]) -> int:
    kind = list_parser().parse_args(argv).kind
    for i, name in enumerate([kind] if kind else KINDS):
        if i:
            print()
        print(f"{name}:")
        print(format_registry(REGISTRIES[name]))
    return 0


def format_registry(registry: Registry) -> str:
    """One entry per name: the name and its description, then its options on an indented line."""
    width = max((len(name) for name in registry), default=0) + 2
    lines = []
    for name in registry:
        lines.append(f"  {name:<{width}}{registry.describe(name)}".rstrip())
        options = registry.options_of(name)
        listed = "any keyword" if options is None else ", ".join(options) or "none"
        lines.append(f"  {'':<{width}}options: {listed}")
    return "\n".join(lines)
