"""Every python snippet in README.md and docs/ runs, so the documentation cannot rot."""
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
SNIPPETS = [(page, n, code) for page in PAGES
            for n, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))]


def test_there_are_snippets():
    assert len(SNIPPETS) >= 8


@pytest.mark.parametrize("page, n, code", SNIPPETS, ids=[f"{p.relative_to(ROOT)}#{n}" for p, n, _ in SNIPPETS])
def test_snippet_runs(page, n, code, tmp_path, monkeypatch):
    first = code.splitlines()[0]
    if first.startswith("# requires:"):
        for module in first.split(":", 1)[1].split(","):
            if importlib.util.find_spec(module.strip()) is None:
                pytest.skip(f"needs {module.strip()}")
    if "matplotlib" in code:
        pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page.name}#{n}", "exec"), {"__name__": "__snippet__"})


def test_docs_link_every_page_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        assert str(page.relative_to(ROOT / "docs")) in nav, page
