"""Atomic file writes: readers see the old content or the new one, never half of a file.

Every file linvid produces (checkpoint pieces, latent shards, manifests, videos, results,
statistics) goes through :func:`atomic_output_path`: the data is written to a hidden
temporary file beside the target, flushed to disk, renamed onto the target, and the
folder entry is flushed too. A crash at any point leaves the previous file intact and at
most a hidden ``.<name>.<pid>.<random>.tmp`` file behind.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """Where linvid caches what it can rebuild (demo videos, I3D weights, statistics): ``$LINVID_CACHE`` or ``~/.cache/linvid``."""
    return Path(os.environ.get("LINVID_CACHE") or "~/.cache/linvid").expanduser()


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's content to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def temporary_path(path: str | os.PathLike) -> Path:
    """A unique hidden temporary path beside ``path`` (same folder, so the rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a temporary file left by an interrupted atomic write."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(".tmp")


@contextlib.contextmanager
def atomic_output_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, move it onto ``path``.

    Parent folders are created. The temporary file is flushed before the rename and the
    folder after it. On error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        yield temporary
        fsync_file(temporary)
        os.replace(temporary, path)
        fsync_dir(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_output_path(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
