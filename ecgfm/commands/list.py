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
        if registry.kind == "backbone":
            lines.append(f"  {'':<{width}}{backbone_summary(registry, name)}")
        options = registry.options_of(name)
        listed = "any keyword" if options is None else ", ".join(options) or "none"
        lines.append(f"  {'':<{width}}options: {listed}")
    return "\n".join(lines)


def backbone_summary(registry: Registry, name: str) -> str:
    """``reads 500 Hz x 5000 samples (10 s), leads I, ..., V6 in mV, preprocessing ecgfounder; 30,819,014 parameters``:
    the input contract and size of a registered backbone, built on torch's meta device (no memory, no weights)."""
    import torch

    if getattr(registry.get(name), "reads_features", False):  # `precomputed`: its size comes from a feature folder
        return "reads float16 features [batch, D] that `ecgfm embed` computed with another model; 0 parameters"
    with torch.device("meta"):
        model = registry.create(name)
    contract = model.model_config.input
    parameters = sum(p.numel() for p in model.parameters())
    chain = contract.preprocessing.get("name", "none")
    return f"reads {contract.describe()} in {contract.units}, preprocessing {chain}; {parameters:,} parameters"
