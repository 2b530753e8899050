#!/usr/bin/env bash
# Set up (scripts/setup.sh), fetch the small photo set the demo uses (once, cached; the photo-set
# tests need it), and run the whole test suite on every core (pytest-xdist): the tests in tests/,
# every ```python block of README.md and docs/ (pytest-markdown-docs) and `mkdocs build --strict`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -c 'from gq_plugin.lab.data import ensure_photos; print("photo set for the tests:", ensure_photos(sets="small", quiet=True))'
# one pytest worker per core, at most 4 (GQ_TEST_WORKERS=0 runs serially)
exec .venv/bin/python -m pytest -q -n "${GQ_TEST_WORKERS:-auto}" --maxprocesses 4 "$@"
