"""Real photographs that ship inside scikit-image: the demo's, the tests' and the benches' data.

No network is needed: these files are part of the installed package.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

COLOR_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "ihc", "hubble_deep_field", "retina")


def skimage_photos(names: Sequence[str] = COLOR_PHOTOS) -> List[Path]:
    """Paths of the named scikit-image sample photos, in the order given (missing names are skipped)."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    found = []
    for name in names:
        found += sorted(p for p in folder.glob(f"{name}.*") if p.suffix in (".png", ".jpg"))
    return found
