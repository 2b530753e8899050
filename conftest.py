"""Runs the ```python blocks of README.md and docs/ (pytest-markdown-docs, ``--markdown-docs`` in
pyproject.toml) as a user pasting them would: each page's blocks in order in one namespace (every
block after a page's first is a ``continuation``, written or not), in an empty working folder, so
files an example writes (``tokens/``, ``model/``) never land in the repository. A block that cannot
run here is fenced ```` ```python notest ````."""

import pytest

PYTHON = ("python", "py", "python3")


def one_namespace_per_page(state) -> None:
    """markdown-it core rule: mark every runnable python fence after a page's first ``continuation``."""
    first = True
    for tok in state.tokens:
        words = tok.info.split() if tok.type == "fence" else []
        if words[:1] and words[0] in PYTHON and "notest" not in words:
            if not first and "continuation" not in words:
                tok.info = tok.info.rstrip() + " continuation"
            first = False


def pytest_markdown_docs_markdown_it():
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark")
    md.core.ruler.push("gq_one_namespace_per_page", one_namespace_per_page)
    return md


def _is_doc_block(item) -> bool:
    return item.path.suffix == ".md"


@pytest.fixture(autouse=True)
def _doc_block_sandbox(request, tmp_path, monkeypatch):
    if not _is_doc_block(request.node):
        yield
        return
    import torch

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    yield
    acc = __import__("sys").modules.get("accelerate.state")
    if acc is not None:  # an example's Accelerator must not leak its process state into later tests
        acc.AcceleratorState._reset_state(reset_partial_state=True)
