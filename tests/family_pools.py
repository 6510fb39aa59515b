"""Variants of a toy pool for the family tests: records with two images, records with a video.

The rubric stays the first image's (the rule judge checks words, the loop only needs prompts
of these shapes); the images are copied beside the new pool (a pool names files inside its own
folder), so it can live anywhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FRAMES = 4
"""Frames of a test video: an even count (Qwen's temporal patch is 2 frames)."""


def reshape_pool(src: Path, out: Path, *, multi_image: bool = False, video: bool = False) -> Path:
    """Write `src`'s records to `out`: with `multi_image`, every even record also shows the next
    record's image; with `video`, every record at index 1 mod 3 shows its image as a video of
    `FRAMES` frames (and no image). Returns `out`."""
    src = Path(src)
    lines = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "images").mkdir(exist_ok=True)
    paths = []
    for r in lines:
        image = src.parent / r["images"][0]
        paths.append(f"images/{image.name}")
        if not (out.parent / paths[-1]).exists():
            shutil.copy(image, out.parent / paths[-1])
    with out.open("w") as f:
        for i, rec in enumerate(lines):
            rec = dict(rec, images=[paths[i]])
            if multi_image and i % 2 == 0:
                rec["images"] = [paths[i], paths[(i + 1) % len(paths)]]
            if video and i % 3 == 1:
                rec["images"], rec["video"] = [], [paths[i]] * FRAMES
            f.write(json.dumps(rec) + "\n")
    return out
