"""The runnable examples of the extending guide and the model-config page run, and print what the pages say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ("extending.md", "model-config.md", "publish.md", "evaluation.md")


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def expected_prints(block: str) -> list[str]:
    """The ``# comment`` after each print(...) line: what the page says it prints (``...`` elides)."""
    return [m.group(1) for m in re.finditer(r"^print\(.*\)  # (.+)$", block, flags=re.M)]


@pytest.mark.parametrize("page", PAGES)
def test_the_examples_run_and_print_what_the_page_says(page, tmp_path, monkeypatch):
    from ecgfm.registry import REGISTRIES

    blocks = python_blocks(page)
    assert blocks
    monkeypatch.chdir(tmp_path)  # the examples write files (records/, shards/)
    registered = {kind: set(registry.names()) for kind, registry in REGISTRIES.items()}
    try:
        for block in blocks:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(block, f"{page} example", "exec"), {"__name__": f"docs_{page}"})
            printed = out.getvalue().splitlines()
            expected = expected_prints(block)
            assert len(printed) == len(expected), (printed, expected)
            for line, wanted in zip(printed, expected, strict=True):
                pattern = ".*".join(re.escape(part) for part in wanted.split("..."))
                assert re.fullmatch(pattern, line), (line, wanted)
    finally:  # the examples register names: leave the registries as they were for other tests
        for kind, registry in REGISTRIES.items():
            for name in set(registry.names()) - registered[kind]:
                registry._entries.pop(name)
