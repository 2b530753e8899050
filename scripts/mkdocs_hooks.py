"""MkDocs hooks (``hooks:`` in mkdocs.yml).

* The benchmark reports are part of the site, read from where they live in the repository
  (``benchmarks/**.md`` and their plots), never copied into ``docs/``.
* pytest-markdown-docs' fence options (```` ```python continuation ````, ```` ```python notest ````)
  are dropped before rendering, so the blocks highlight as plain ```` ```python ```` (superfences
  would not recognise the fence otherwise); GitHub ignores the words after the language anyway.

The docs link them as the repository lays them out (``../benchmarks/paper/RESULTS.md`` from
``docs/benchmarks.md``), which is right on a code host; :func:`on_page_markdown` rewrites such a
link to the report's place in the site (``benchmarks/paper/RESULTS.md`` under the docs root), so
``mkdocs build --strict`` checks every one of them.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from markdown.extensions import Extension
from markdown.preprocessors import Preprocessor
from mkdocs.structure.files import File

INCLUDED = ("benchmarks",)  # repository folders served under the same path in the site
SUFFIXES = (".md", ".png")
FRAGMENTS = ("benchmarks/paper/from_pretrained/block.md",)  # spliced into paper/RESULTS.md, not a page
TEST_FENCE = re.compile(r"^(\s*```+\s*(?:python|py|python3))(?:\s+(?:continuation|notest))+\s*$")
LINK = re.compile(r"(\]\()([^)\s#]+)([^)]*\))")


def _repo_root(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent


class _TestFenceOptions(Preprocessor):
    def run(self, lines):
        return [TEST_FENCE.sub(r"\1", line) for line in lines]


class TestFenceOptions(Extension):
    """Strip pytest-markdown-docs' options from python fences: after pymdownx.snippets (32),
    before pymdownx.superfences (25), so the README's included quick start is covered too."""

    def extendMarkdown(self, md):
        md.preprocessors.register(_TestFenceOptions(md), "gq_test_fence_options", 29)


def on_config(config):
    config["markdown_extensions"].append(TestFenceOptions())
    return config


def on_files(files, config):
    """Add every report and plot under :data:`INCLUDED` as a site file at its repository path."""
    root = _repo_root(config)
    for folder in INCLUDED:
        for path in sorted((root / folder).rglob("*")):
            uri = path.relative_to(root).as_posix()
            if path.suffix in SUFFIXES and path.is_file() and uri not in FRAGMENTS:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Rewrite links that leave ``docs/`` for an included folder into links inside the site."""
    root = _repo_root(config)
    docs = Path(config["docs_dir"]).resolve().relative_to(root).as_posix()
    src = page.file.src_uri  # path of the page inside the site (docs/ or an included folder)
    real = src if src.split("/")[0] in INCLUDED else posixpath.join(docs, src)

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            return m.group(0)
        in_repo = posixpath.normpath(posixpath.join(posixpath.dirname(real), target))
        if in_repo.split("/")[0] not in INCLUDED:
            return m.group(0)
        rel = posixpath.relpath(in_repo, posixpath.dirname(src) or ".")
        return m.group(1) + rel + m.group(3)

    return LINK.sub(fix, markdown)
