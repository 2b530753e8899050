"""Where the offline photos come from: the Debian packages and allow-lists, the photo sets, the data folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MANIFEST = "manifest.json"


def default_data_dir() -> Path:
    """``$GQ_DATA_DIR`` or ``~/.cache/gq_plugin/photos``."""
    env = os.environ.get("GQ_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gq_plugin" / "photos"


# ============================================================================ sources

@dataclass(frozen=True)
class DebianSource:
    """One Debian package and the photos to take from it.

    ``kind``:
      * ``"files"``: plain image files; ``items`` are paths relative to ``root``.
      * ``"rcc"``: Qt resource bundles under ``root``; ``items`` are bundle names, and every
        WebP inside with a short side >= ``min_side`` is taken (all such images in the listed
        bundles are photos).
      * ``"edj"``: Enlightenment EET files under ``root``; ``items`` are file stems; the
        largest JPEG stream inside each is taken.
      * ``"plasma"``: ``root/<name>/contents/images/*``; ``items`` are wallpaper names; the
        largest variant of each is taken.
      * ``"glob"``: every file matching ``items`` (patterns) under ``root``; images with a
        short side < ``min_side`` or without colour are dropped.
    """

    package: str
    kind: str
    root: str
    items: tuple[str, ...]
    license: str
    min_side: int = 128
    note: str = ""


DEBIAN_SOURCES: dict[str, DebianSource] = {
    s.package: s
    for s in [
        DebianSource(
            "palapeli-data", "files", "usr/share/palapeli/collection",
            ("castle-maintenon.jpg", "cincinnati-bridge.jpg", "citrus-fruits.jpg",
             "european-honey-bee.jpg", "panther-chameleon-female.jpg"),
            "GPL-2+ / CC0 (see copyright)",
        ),
        DebianSource(
            "darknet", "files", "usr/share/darknet/data",
            ("dog.jpg", "eagle.jpg", "giraffe.jpg", "horses.jpg", "kite.jpg", "person.jpg"),
            "mixed (see copyright)", note="scream.jpg is a painting: excluded",
        ),
        DebianSource(
            "lomiri-wallpapers-16.04", "files", "usr/share/backgrounds",
            ("Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
             "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
             "analogpattern_by_Peter_Nerlich.jpg", "free_by_Peter_Nerlich.jpg",
             "friends_by_Aitzol_Berasategi.jpg", "greentock_by_Peter_Nerlich.jpg",
             "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
             "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg"),
            "CC-BY-4.0 / CC-BY-SA-4.0 / CC0", note="umang (abstract render) excluded",
        ),
        DebianSource(
            "lomiri-wallpapers-20.04", "files", "usr/share/backgrounds",
            ("Kleiber_by_Lukas_Baubkus.jpg",), "CC-BY-SA-4.0 (see copyright)",
            note="the other 20.04 wallpapers are renders",
        ),
        DebianSource(
            "lxqt-themes", "files", "usr/share/lxqt/wallpapers",
            ("Butterfly-Kenneth-Wimer.jpg", "Valendas.png", "after-the-rain.jpg", "appleflower.png",
             "beam.png", "butterfly.png", "cloud.png", "drop.png", "flowers.png", "fog.jpg",
             "this-is-not-windows.jpg"),
            "CC-BY-SA-3.0 / LGPL-2.1+", note="logo/origami/triangle/wave wallpapers excluded",
        ),
        DebianSource(
            "mate-backgrounds", "files", "usr/share/backgrounds/mate/nature",
            ("Aqua.jpg", "Blinds.jpg", "Dune.jpg", "FreshFlower.jpg", "Garden.jpg", "GreenMeadow.jpg",
             "LadyBird.jpg", "RainDrops.jpg", "Storm.jpg", "TwoWings.jpg", "Wood.jpg", "YellowFlower.jpg"),
            "GPL-2+ / CC-BY-SA-4.0", note="abstract/ and desktop/ are synthetic",
        ),
        DebianSource(
            "opencv-doc", "files", "usr/share/doc/opencv-doc/examples/data",
            ("aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "board.jpg", "building.jpg",
             "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg",
             "leuvenA.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png", "smarties.png",
             "squirrel_cls.jpg", "stuff.jpg"),
            "BSD-3-Clause / Apache-2.0 (see copyright)",
            note="stereo/sequence partners (aloeR, graf3, leuvenB, rubberwhale2), greyscale, "
            "synthetic, logos and starry_night (painting) excluded",
        ),
        DebianSource(
            "gcompris-qt-data", "rcc", "usr/share/gcompris-qt/rcc",
            ("erase", "explore_monuments", "explore_world_animals", "explore_farm_animals",
             "explore_world_music", "categorization"),
            "mostly CC-BY-SA-3.0 / CC-BY / CC0 / public domain (Wikimedia; see copyright)",
            min_side=128,
        ),
        DebianSource(
            "plasma-workspace-wallpapers", "plasma", "usr/share/wallpapers",
            ("FallenLeaf", "Path", "DarkestHour", "summer_1am", "EveningGlow", "Kite", "ColorfulCups",
             "OneStandsOut", "ColdRipple", "BytheWater"),
            "GPL-2+ (see copyright)", note="Grey (greyscale) and the illustrations excluded",
        ),
        DebianSource(
            "enlightenment-data", "edj", "usr/share/enlightenment/data/backgrounds",
            ("Bamboo", "Foggy-Trees", "God-Rays", "Green-Maple", "Lichen-Branches", "Mountain", "Peaks",
             "Red-Maple", "Sea-of-Lanterns", "Snow-Trees", "Spruce-Needles", "Sunset-Clouds",
             "White-Flower", "Yellow-Flower"),
            "see copyright (Enlightenment backgrounds)", note="400 MB download",
        ),
        DebianSource(
            "stellarium-data", "glob", "usr/share/stellarium/nebulae/default", ("*.png",),
            "GPL-2+ (see copyright)", note="astrophotos, mostly black backgrounds; 246 MB download",
        ),
    ]
}

#: named sets of Debian packages; "wheels" = photos inside installed Python wheels only
PHOTO_SETS: dict[str, tuple[str, ...]] = {
    "tiny": ("palapeli-data", "darknet"),
    "small": ("palapeli-data", "darknet", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04", "lxqt-themes",
              "mate-backgrounds", "gcompris-qt-data", "opencv-doc"),
    "full": ("palapeli-data", "darknet", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04", "lxqt-themes",
             "mate-backgrounds", "gcompris-qt-data", "opencv-doc", "plasma-workspace-wallpapers",
             "enlightenment-data"),
    "astro": ("stellarium-data",),
    "wheels": (),
}
