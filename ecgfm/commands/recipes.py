"""``ecgfm recipes list | show NAME | copy NAME [DEST]``: the recipes that ship with ecgfm, out of an installed wheel.

Also where a recipe name given to ``--config`` becomes the shipped file, for every command that reads recipes.
"""

from __future__ import annotations

import sys
from itertools import groupby
from pathlib import Path, PurePosixPath

from jsonargparse import ArgumentParser

from ecgfm.io import atomic_write_bytes
from ecgfm.resources import RECIPE_SUFFIX, find_recipe, recipe_files, recipes_dir

CONFIG_FLAGS = ("--config", "-c")


def expand_config_names(argv: list[str]) -> list[str]:
    """``--config NAME`` (``-c NAME``, ``--config=NAME``) of a shipped recipe -> its path, when no file NAME is here.

    A file on disk always wins, and a value that is not a recipe name (inline YAML) passes through unchanged.
    """
    expanded, after_flag = [], False
    for arg in argv:
        if after_flag:
            arg, after_flag = _recipe_path(arg), False
        elif arg in CONFIG_FLAGS:
            after_flag = True
        elif arg.startswith("--config="):
            arg = "--config=" + _recipe_path(arg.removeprefix("--config="))
        expanded.append(arg)
    return expanded


def _recipe_path(value: str) -> str:
    if not value or Path(value).exists() or any(c in value for c in ":{}\n"):
        return value
    found = find_recipe(value)
    if found is None:
        raise FileNotFoundError(
            f"--config {value}: no such file here and no shipped recipe of that name (`ecgfm recipes list` shows them)"
        )
    return str(found)


def recipes_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="ecgfm recipes",
        exit_on_error=False,  # ecgfm.commands.main prints one line
        description=f"The recipes and presets that ship with ecgfm (in {recipes_dir()}). A shipped recipe's name "
        "also works as --config NAME of fit, validate, test, predict and shard.",
    )
    actions = parser.add_subcommands(dest="action")
    actions.add_subcommand("list", ArgumentParser(), help="every shipped recipe, grouped by folder")
    show = ArgumentParser(description="Print a shipped recipe.")
    show.add_argument("name", type=str, help="a recipe name (quickstart/net1d-small, .yaml optional)")
    actions.add_subcommand("show", show, help="print a recipe")
    copy = ArgumentParser(description="Write a shipped recipe to a file, to edit it and pass it to --config.")
    copy.add_argument("name", type=str, help="a recipe name (quickstart/net1d-small, .yaml optional)")
    copy.add_argument("dest", type=str, nargs="?", default=None, help="a file or folder (default: here, same name)")
    copy.add_argument("--force", action="store_true", help="overwrite DEST when it exists")
    actions.add_subcommand("copy", copy, help="copy a recipe to a file")
    return parser


def run(argv: list[str]) -> int:
    cfg = recipes_parser().parse_args(argv)
    action = cfg.action
    if action == "list":
        return _list()
    name = cfg[action].name
    source = find_recipe(name)
    if source is None:
        raise FileNotFoundError(f"no shipped recipe {name!r}; `ecgfm recipes list` shows them")
    if action == "show":
        sys.stdout.write(source.read_text())
        return 0
    dest = Path(cfg.copy.dest or source.name)
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and not cfg.copy.force:
        print(f"ecgfm recipes: {dest} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    atomic_write_bytes(dest, source.read_bytes())
    print(f"wrote {dest}")
    return 0


def _list() -> int:
    files = recipe_files()
    for folder, names in groupby(sorted(files, key=lambda f: (_folder(f), f)), key=_folder):
        print(f"{folder}/" if folder != "." else "./")
        for name in names:
            print(f"  {name.removesuffix(RECIPE_SUFFIX)}")
    print(f"\n{len(files)} files in {recipes_dir()}; `ecgfm recipes show NAME` prints one, `copy NAME` writes it here")
    return 0


def _folder(name: str) -> str:
    return PurePosixPath(name).parent.as_posix()
