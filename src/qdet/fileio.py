"""Atomic file writes: a reader (or a crash) never sees half a model, report or plot.

Every artefact qdet writes goes through `write_atomically`: the content is written to a temporary
file in the target folder, then renamed over the target (`os.replace` is atomic on one filesystem).
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, then move the temporary file onto `path`; returns `path`.

    The file gets mode 0644 (`mkstemp` creates 0600; reports and models are meant to be shared).
    On any error the temporary file is removed and `path` is left as it was.

        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> write_atomically(d / "a.txt", lambda tmp: tmp.write_text("hi")).read_text()
        'hi'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)  # keeps the extension: writers pick the format from it
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    """`write_atomically` for UTF-8 text."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def remove_stale_temporaries(path: str | Path, older_than_s: float = 3600.0) -> None:
    """Delete `.<stem>.*.tmp<suffix>` files a killed save left next to `path` (older than an hour)."""
    import time

    path = Path(path)
    now = time.time()
    for tmp in path.parent.glob(f".{path.stem}.*.tmp{path.suffix}"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
        except OSError:
            pass


def check_writable(path: str | Path | None, option: str) -> None:
    """ConfigError naming `option` unless `path` can be written: not a folder, parent a writable folder.

    Called before the work starts so that results are not lost to a bad output path.
    """
    from qdet.errors import ConfigError

    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is a folder, expected a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # write_atomically creates missing folders
    if not parent.is_dir():
        raise ConfigError(f"{option} {str(path)!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or not _can_create_in(parent):
        raise ConfigError(f"{option} {str(path)!r}: folder {str(parent)!r} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{option} {str(path)!r} is not writable")


def _can_create_in(folder: Path) -> bool:
    """Whether a file can really be created in `folder` (os.access says yes to root on /proc or a read-only mount)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".qdet-probe.", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True
