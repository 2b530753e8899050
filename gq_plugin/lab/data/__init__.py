"""Real photographs that install offline (:mod:`.photos`, :mod:`.sources`, :mod:`.extract`) and a crop
dataset split by photo (:mod:`.dataset`).

Command line (``gq data`` adds :func:`add_data_commands` and calls :func:`run_data`)::

    python -m gq_plugin.lab.data fetch --dir ~/.cache/gq_plugin/photos --set small
    python -m gq_plugin.lab.data list
"""

from .dataset import PhotoDataset, ResumableSampler, images_of, list_images, split_by_photo
from .extract import edj_largest_jpeg, rcc_entries
from .photos import add_data_commands, ensure_photos, fetch_main, fetch_photos, run_data, wheel_photos
from .sources import DEBIAN_SOURCES, IMAGE_EXTENSIONS, MANIFEST, PHOTO_SETS, DebianSource, default_data_dir

__all__ = [
    "DEBIAN_SOURCES",
    "IMAGE_EXTENSIONS",
    "MANIFEST",
    "PHOTO_SETS",
    "DebianSource",
    "PhotoDataset",
    "add_data_commands",
    "ResumableSampler",
    "default_data_dir",
    "edj_largest_jpeg",
    "ensure_photos",
    "fetch_main",
    "fetch_photos",
    "images_of",
    "list_images",
    "rcc_entries",
    "run_data",
    "split_by_photo",
    "wheel_photos",
]
