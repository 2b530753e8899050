"""Real photographs that install offline (:mod:`.photos`, :mod:`.sources`, :mod:`.extract`) and a crop
dataset split by photo (:mod:`.dataset`).

Command line (the ``gq data`` CLI calls :func:`fetch_main`)::

    python -m gq_plugin.lab.data fetch --dir ~/.cache/gq_plugin/photos --set small
    python -m gq_plugin.lab.data list
"""

from .dataset import PhotoDataset, ResumableSampler, list_images, split_by_photo
from .extract import edj_largest_jpeg, rcc_entries
from .photos import ensure_photos, fetch_main, fetch_photos, wheel_photos
from .sources import (
    DEBIAN_SOURCES,
    IMAGE_EXTENSIONS,
    MANIFEST,
    PHOTO_SETS,
    DebianSource,
    default_data_dir,
)

__all__ = [
    "DEBIAN_SOURCES",
    "IMAGE_EXTENSIONS",
    "MANIFEST",
    "PHOTO_SETS",
    "DebianSource",
    "PhotoDataset",
    "ResumableSampler",
    "default_data_dir",
    "edj_largest_jpeg",
    "ensure_photos",
    "fetch_main",
    "fetch_photos",
    "list_images",
    "rcc_entries",
    "split_by_photo",
    "wheel_photos",
]
