"""Shared test helper: the photo-set tests (benchmark smoke runs) need the photo cache that
``scripts/test.sh`` and the demo fetch (``gq data fetch --set small``). Without it they are skipped
with :data:`PHOTO_SKIP_REASON`, and tests/conftest.py lists them loudly at the end of the run."""

import pytest

PHOTO_SKIP_REASON = ("needs the photo set: no photo cache (bash scripts/test.sh fetches it; "
                     "or run `gq data fetch --set small`, ~30 s)")


def photos_available() -> bool:
    from gq_plugin.lab.data import PhotoDataset

    try:
        return PhotoDataset(None, split="eval", size=32, eval_fraction=0.15).n_photos > 0
    except (FileNotFoundError, ValueError):
        return False


needs_photos = pytest.mark.skipif(not photos_available(), reason=PHOTO_SKIP_REASON)
