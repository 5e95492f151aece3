"""ecgfm as users get it: every imported package is a declared dependency, and the built wheel, installed alone in a
fresh environment, carries its recipes, the bundled LUDB data and a working ``ecgfm`` command."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    """``jsonargparse[signatures]>=4.27`` -> ``jsonargparse`` (normalised as PEP 503 names them)."""
    return _normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0))


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    """The names of pyproject.toml's dependencies and of its dev extras."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {_name(r) for r in project["dependencies"]}, {_name(r) for r in project["optional-dependencies"]["dev"]}


def _imported_modules(folder: Path) -> dict[str, set[str]]:
    """Top-level modules imported (absolutely) anywhere under ``folder`` -> the files importing them."""
    imported: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                imported.setdefault(name.split(".")[0], set()).add(str(path.relative_to(REPO)))
    return imported


def _undeclared(folder: Path, declared: set[str], local: set[str]) -> list[str]:
    """Third-party modules imported under ``folder`` whose distribution is not in ``declared``."""
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for module, files in sorted(_imported_modules(folder).items()):
        if module in sys.stdlib_module_names or module in local:
            continue
        providers = {_normalise(d) for d in distributions.get(module, [])}
        if not providers & declared:
            where = ", ".join(sorted(files)[:3])
            problems.append(f"{module} (distribution {sorted(providers) or 'not installed'}, imported by {where})")
    return problems


def test_every_imported_package_is_a_declared_dependency():
    dependencies, dev = _declared()
    assert not _undeclared(REPO / "ecgfm", dependencies, {"ecgfm"}), "add these to [project] dependencies"
    test_modules = {p.stem for p in (REPO / "tests").rglob("*.py")}
    assert not _undeclared(REPO / "tests", dependencies | dev, {"ecgfm", *test_modules}), "add these to the dev extras"


def _run(args: list, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_the_wheel_installed_alone_runs_the_quickstart_recipe(tmp_path):
    # the dev extras declare the build backend: without it this is a broken install, not a reason to skip
    assert importlib.util.find_spec("hatchling") is not None, "hatchling is not installed (pip install -e '.[dev]')"
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", REPO, "--no-deps", "--no-build-isolation", "-q", "-w", wheels]
    _run(build, tmp_path)
    (wheel,) = wheels.glob("ecgfm-*.whl")

    # A fresh environment outside the source tree with only the wheel installed in it; the third-party packages come
    # from this environment's site-packages through a .pth file (torch is not downloaded again). Paths listed in a .pth
    # file are not scanned for .pth files themselves, so the editable install of this checkout stays out of it.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python, ecgfm = venv / "bin" / "python", venv / "bin" / "ecgfm"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], tmp_path)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    outer = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_outer_environment.pth").write_text("\n".join(outer) + "\n")

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1")
    where = "import ecgfm, json, sys; from ecgfm.resources import recipes_dir; from ecgfm.zoo import ZOO_MANIFEST; "
    where += "print(json.dumps([ecgfm.__file__, sys.path, str(recipes_dir()), str(ZOO_MANIFEST)]))"
    module, path, recipes, zoo = json.loads(_run([python, "-c", where], work, env))
    installed = site / "ecgfm"
    assert Path(module).parent == installed, f"ecgfm imported from {module}, not from the wheel"
    assert not any(entry and Path(entry).resolve() == REPO for entry in path), "the source tree is on sys.path"
    assert Path(recipes) == installed / "_recipes" and Path(zoo) == installed / "_checkpoints" / "zoo.json"
    assert Path(zoo).is_file() and (installed / "quickstart" / "ludb" / "ludb.csv").is_file()
    assert (installed / "data" / "label_maps" / "cinc2021_dx_mapping_scored.csv").is_file()

    listing = _run([python, "-m", "ecgfm", "recipes", "list"], work, env)  # `python -m ecgfm`: Lightning's DDP relaunch
    assert "  quickstart/net1d-small\n" in listing and "  _base/ddp\n" in listing and str(installed) in listing
    _run([ecgfm, "recipes", "copy", "quickstart/net1d-small", "my-recipe.yaml"], work, env)
    assert (work / "my-recipe.yaml").read_text() == (REPO / "recipes" / "quickstart" / "net1d-small.yaml").read_text()

    # the shipped zoo model loads by name from the installed package, offline, its files checked
    loaded = "import ecgfm; m = ecgfm.load('ludb-diagnoses-net1d-small'); print(len(m.output_names()), m.leads[-1])"
    assert _run([python, "-c", loaded], work, env).split() == ["16", "V6"]
    verified = _run([ecgfm, "zoo", "verify", "ludb-diagnoses-net1d-small"], work, env)
    assert verified.count("ok ") == 4 and str(installed / "_checkpoints") in verified

    converted = _run([ecgfm, "quickstart", "--convert_only", "true"], work, env)
    shards = work / "ecgfm-quickstart" / "shards"
    assert "shards: ecgfm-quickstart/shards" in converted and (shards / "manifest.json").is_file()
    assert "0 problem(s)" in _run([ecgfm, "shard", "verify", shards], work, env)

    fit = [ecgfm, "fit", "--config", "quickstart/net1d-small", "--data.root", shards, "--trainer.fast_dev_run", "true"]
    fit += ["--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(fit, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fast_dev_run" in proc.stdout + proc.stderr  # Lightning says it ran one batch of each loop
    assert not (REPO / "ecgfm" / "_recipes").exists()  # building the wheel left the checkout as it was
