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
    """The README's list of what `kdpp[test]` adds names every package of that extra."""
    installing = (ROOT / "README.md").read_text().split("## Installing", 1)[1].split("\n## ", 1)[0]
    sentence = " ".join(installing.split("`kdpp[test]` adds", 1)[1].split(";", 1)[0].split())
    for package in _setup_cfg_extra("test"):
        assert package.lower() in sentence.lower(), (package, sentence)


REMOTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.I)


@pytest.mark.slow
def test_built_site_serves_its_math_renderer(tmp_path):
    """The built site loads no script or stylesheet from another host and ships MathJax, so formulas render offline.

    Builds the site as CI does (`mkdocs build --strict`).
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
    """Without the docs extra the build stops with the install command, not a bare ImportError."""
    pytest.importorskip("mkdocs")
    spec = importlib.util.spec_from_file_location("offline_math", ROOT / "docs" / "_hooks" / "offline_math.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    from mkdocs.exceptions import PluginError

    monkeypatch.setattr(hook.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PluginError, match=r"pip install -e '\.\[docs\]'"):
        hook.mathjax_es5()


def _install_requires() -> list[str]:
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in cfg["options"]["install_requires"].splitlines()]
    return [re.split(r"[<>=!~\[; ]", line)[0] for line in lines if line]


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("<!-- ci:test-command -->", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]


def test_readme_test_command_installs_one_cpu_torch_and_k_diffusion_without_its_dependencies():
    """torch first (one build, the one the user picked), then kdpp's extras, then k-diffusion with --no-deps:
    k-diffusion's torchvision dependency would bring a second, CUDA torch."""
    command = _readme_test_command()
    steps = [step.strip() for step in command.split("&&")]
    torch_step = next(i for i, step in enumerate(steps) if re.search(r"pip install torch==[0-9.]+$", step))
    extras_step = next(i for i, step in enumerate(steps) if "-e '.[test,docs]'" in step)
    oracle_step = next(i for i, step in enumerate(steps) if "k-diffusion==" in step)
    assert torch_step < extras_step < oracle_step, steps
    assert "--no-deps" in steps[oracle_step].split(), steps[oracle_step]
    assert steps[-1].endswith("-m pytest -q"), steps[-1]
    assert "k-diffusion" not in [name.lower() for name in _setup_cfg_extra("test")]


def test_test_extra_installs_what_the_k_diffusion_oracle_imports():
    """Every module-level import of k_diffusion.sampling and k_diffusion.utils (what the oracle tests load, with
    k-diffusion installed --no-deps) comes from the test extra or kdpp's own requirements; torchvision is the one
    import tests/conftest.py stands in for."""
    import ast
    import sys
    from importlib.metadata import packages_distributions

    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion is not installed")
    folder = pathlib.Path(spec.submodule_search_locations[0])
    modules = set()
    for name in ("sampling.py", "utils.py"):
        for node in ast.parse((folder / name).read_text()).body:
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"torchvision"}
    normal = lambda name: re.sub(r"[-_.]+", "-", name).lower()
    provided = {normal(name) for name in _setup_cfg_extra("test") + _install_requires()}
    owners = packages_distributions()
    for module in sorted(modules):
        assert module in owners, f"k-diffusion imports {module}, which no installed distribution provides"
        assert {normal(d) for d in owners[module]} & provided, (module, owners[module])
