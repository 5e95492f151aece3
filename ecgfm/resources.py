"""The files ecgfm ships beside its code, the recipes and the zoo manifest, found in a wheel or a source checkout.

They stay in the repository's top-level ``recipes/`` and ``checkpoints/`` folders; a wheel carries them as
``ecgfm/_recipes`` and ``ecgfm/_checkpoints`` (the ``sources`` rewrite in pyproject.toml), and an editable install
runs from the checkout, so each function looks inside the package first and beside it second.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

_PACKAGE = Path(__file__).resolve().parent

#: The suffix a recipe name may leave out (``quickstart/net1d-small`` is ``quickstart/net1d-small.yaml``).
RECIPE_SUFFIX = ".yaml"


def _shipped(in_wheel: str, in_checkout: str) -> Path:
    inside = _PACKAGE / in_wheel
    return inside if inside.is_dir() else _PACKAGE.parent / in_checkout


def recipes_dir() -> Path:
    """The shipped recipes folder: ``ecgfm/_recipes`` in a wheel, ``recipes/`` in a source checkout."""
    return _shipped("_recipes", "recipes")


def checkpoints_dir() -> Path:
    """The shipped checkpoints folder (zoo manifest, small weights): ``ecgfm/_checkpoints`` or ``checkpoints/``."""
    return _shipped("_checkpoints", "checkpoints")


def zoo_manifest() -> Path:
    """The zoo's model cards, ``zoo.json`` in the shipped checkpoints folder."""
    return checkpoints_dir() / "zoo.json"


def recipe_files() -> list[str]:
    """Every shipped recipe file (YAML recipes, presets and their side files) as a path relative to the folder."""
    root = recipes_dir()
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def find_recipe(name: str) -> Path | None:
    """The shipped file ``name`` names (``quickstart/net1d-small``, ``.yaml`` optional, ``recipes/`` prefix too).

    None when there is none; a name that would leave the recipes folder (absolute, ``..``) finds nothing.
    """
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if parts[:1] == ("recipes",):
        parts = parts[1:]
    if not parts or parts[0] == "/" or ".." in parts:
        return None
    path = recipes_dir().joinpath(*parts)
    for candidate in (path, path.with_name(path.name + RECIPE_SUFFIX)):
        if candidate.is_file():
            return candidate
    return None
