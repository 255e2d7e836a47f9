"""Where the bundled real assets live (weights, COCO/KITTI/CIFAR images).

`QDET_ASSETS` overrides the default `../shared/assets` (relative to the project root, as CI lays it out).
"""
from __future__ import annotations

import os
from pathlib import Path

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def assets_dir() -> Path:
    """Return the assets folder (it may not exist; callers decide whether to skip or fail)."""
    env = os.environ.get("QDET_ASSETS")
    if env:
        return Path(env).expanduser().resolve()
    for candidate in (_PROJECT_ROOT.parent / "shared" / "assets", Path.cwd().parent / "shared" / "assets"):
        if candidate.is_dir():
            return candidate.resolve()
    return (_PROJECT_ROOT.parent / "shared" / "assets").resolve()
