"""Runs the ```python blocks of README.md and docs/ (pytest-markdown-docs, ``--markdown-docs`` in
pyproject.toml) as a user pasting them would: each page's blocks in order in one namespace
(```` ```python continuation ````), in an empty working folder, so files an example writes
(``tokens/``, ``model/``) never land in the repository."""

import pytest


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
