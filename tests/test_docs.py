"""The documentation: the README is a front page, the docs site builds, and its examples run.

The ```python blocks themselves run as tests of README.md and docs/ (pytest-markdown-docs,
``--markdown-docs`` in pyproject.toml); this file checks what those runs cannot."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _python_fences(path: Path) -> list[str]:
    """Info strings of the python fences, parsed as pytest-markdown-docs parses them."""
    tokens = MarkdownIt("commonmark").parse(path.read_text("utf8"))
    return [t.info for t in tokens if t.type == "fence" and t.info.split()[:1] in (["python"], ["py"], ["python3"])]


def test_readme_is_a_front_page():
    text = (REPO / "README.md").read_text("utf8")
    assert len(text.encode()) <= 20_000
    assert "bash scripts/demo.sh" in text and "bash scripts/test.sh" in text  # the two set-up commands
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    # every relative link of the README points to a file of the repository
    for target in __import__("re").findall(r"\]\(((?!https?://|#)[^)#\s]+)", text):
        assert (REPO / target).exists(), target


def test_examples_run_and_at_most_a_quarter_are_not_run():
    infos = [info for page in PAGES for info in _python_fences(page)]
    notest = [i for i in infos if "notest" in i.split()]
    assert len(infos) >= 15
    assert 4 * len(notest) <= len(infos), f"{len(notest)} of {len(infos)} python blocks are fenced `notest`"


def test_a_page_shares_one_namespace_in_order():
    """The parser the doc tests use (conftest.py) makes every runnable block after a page's first
    a ``continuation`` (it sees the names defined above it, as in one interpreter session)."""
    spec = importlib.util.spec_from_file_location("gq_root_conftest", REPO / "conftest.py")
    root_conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(root_conftest)
    md = root_conftest.pytest_markdown_docs_markdown_it()
    page = "```python\na = 1\n```\n\n```python notest\nb\n```\n\n```python\nc = a\n```\n\n```bash\nls\n```\n"
    infos = [t.info for t in md.parse(page) if t.type == "fence"]
    assert infos == ["python", "python notest", "python continuation", "bash"]
    for path in PAGES:
        run = [t.info.split() for t in md.parse(path.read_text("utf8")) if t.type == "fence"
               and t.info.split()[:1] == ["python"] and "notest" not in t.info.split()]
        assert all("continuation" in i for i in run[1:]), path


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None
                    or importlib.util.find_spec("mkdocstrings") is None,
                    reason="docs extra not installed: pip install -e '.[docs]' (scripts/setup.sh does)")
def test_mkdocs_build_strict(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    site = tmp_path / "site"
    # the README's quick start is part of Getting started, with the test-only fence words removed
    page = (site / "getting_started" / "index.html").read_text("utf8")
    assert "patch_autoencoder_kl" in page and "continuation" not in page
    # the benchmark reports are served from benchmarks/ (not copied into docs/), with their plots
    assert (site / "benchmarks" / "paper" / "from_pretrained" / "RESULTS" / "index.html").is_file()
    assert (site / "benchmarks" / "paper" / "from_pretrained" / "main_rows.png").is_file()
    assert "GaussianQuantizer" in (site / "api" / "index.html").read_text("utf8")
