"""Shared test helper: whether the photo cache has been fetched (benchmark tests need real photos)."""


def photos_available() -> bool:
    from gq_plugin.lab.data import PhotoDataset

    try:
        return PhotoDataset(None, split="eval", size=32, eval_fraction=0.15).n_photos > 0
    except (FileNotFoundError, ValueError):
        return False
