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


def _setup_cfg_extra(name: str) -> list[str]:
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in cfg["options.extras_require"][name].splitlines()]
    return [re.split(r"[<>=!~\[; ]", line)[0] for line in lines if line and not line.startswith("#")]


def test_readme_lists_what_the_test_extra_installs():
    """Issue 10 item 15 (README half): the README's list of what `kdpp[test]` adds names every package of that extra."""
    installing = (ROOT / "README.md").read_text().split("## Installing", 1)[1].split("\n## ", 1)[0]
    sentence = " ".join(installing.split("`kdpp[test]` adds", 1)[1].split(";", 1)[0].split())
    for package in _setup_cfg_extra("test"):
        assert package.lower() in sentence.lower(), (package, sentence)


REMOTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.I)


@pytest.mark.slow
def test_built_site_serves_its_math_renderer(tmp_path):
    """Issue 10 item 16: the built site loads no script or stylesheet from another host and ships MathJax.

    Builds the site as CI does (`mkdocs build --strict`). Before: MathJax came from a CDN, so offline
    every formula showed as raw TeX.
    """
    for module in ("mkdocs", "material", "mkdocstrings", "mathjax"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs the docs extra (pip install -e '.[docs]'): {module} is missing")
    import os
    import subprocess
    import sys

    site = tmp_path / "site"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        html = page.read_text()
        scripts = re.findall(r"<script[^>]*\ssrc=\"([^\"]+)\"", html)
        styles = re.findall(r"<link[^>]*rel=\"stylesheet\"[^>]*href=\"([^\"]+)\"", html)
        styles += re.findall(r"<link[^>]*href=\"([^\"]+)\"[^>]*rel=\"stylesheet\"", html)
        remote = [url for url in scripts + styles if REMOTE.match(url)]
        assert not remote, (page.relative_to(site), remote)
    method = (site / "method" / "index.html").read_text()
    assert 'class="arithmatex"' in method
    assert '<script src="../assets/mathjax/tex-mml-chtml.js"' in method
    import mathjax

    es5 = pathlib.Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    shipped = site / "assets" / "mathjax"
    assert (shipped / "tex-mml-chtml.js").read_bytes() == (es5 / "tex-mml-chtml.js").read_bytes()
    fonts = {p.name for p in (shipped / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff")}
    assert {"MathJax_Main-Regular.woff", "MathJax_Math-Italic.woff", "MathJax_Size1-Regular.woff"} <= fonts
    assert (shipped / "input" / "tex" / "extensions" / "ams.js").is_file()  # autoloaded TeX packages


def test_docs_hook_names_the_fix_when_mathjax_is_missing(monkeypatch):
    """Issue 10 item 16: without the docs extra the build stops with the install command, not a bare ImportError."""
    pytest.importorskip("mkdocs")
    spec = importlib.util.spec_from_file_location("offline_math", ROOT / "docs" / "_hooks" / "offline_math.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    from mkdocs.exceptions import PluginError

    monkeypatch.setattr(hook.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PluginError, match=r"pip install -e '\.\[docs\]'"):
        hook.mathjax_es5()
