"""Shared fixtures. Real-asset tests skip (never fake) when ../shared/assets lacks their file."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qdet.paths import assets_dir as _assets_dir


def require_asset(relpath: str) -> Path:
    """Path of an asset under `assets_dir()`, or skip the calling test when it is absent.

    Example: `weights = require_asset("weights/cifar10_resnet20.pt")`.
    """
    path = _assets_dir() / relpath
    if not path.exists():
        pytest.skip(f"asset '{relpath}' not found under {_assets_dir()}")
    return path


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    """The assets folder; skips the test when it does not exist."""
    root = _assets_dir()
    if not root.is_dir():
        pytest.skip(f"assets folder {root} not found")
    return root


@pytest.fixture
def one_torch_thread():
    """One torch thread for a test, restored afterwards (setting it globally would change later tests'
    float numerics). Whole modules: `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
