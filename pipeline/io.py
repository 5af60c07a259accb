"""Atomic writes: every output is written under a temporary name beside it, then renamed onto its final name.

A reader (another process, a rerun, a web server) therefore sees either no file, the previous complete file,
or the new complete file; never a half-written one, whatever kills the writer (an exception, Ctrl-C, SIGKILL,
a lost node). ``os.replace`` is atomic within one filesystem, which is why the temporary lives in the same
folder. A writer killed by SIGKILL leaves its temporary behind (nothing can remove it): :func:`stale_temporaries`
finds them, and the stage runner clears them (:func:`clear_stale`) before it redoes the stage.

Temporary names: ``<name>.tmp-<8 hex>`` (``<name>.tmp-<8 hex><suffix>`` with ``keep_suffix``, for writers
that pick a format from the extension: GeoTIFF, GeoPackage, PNG).

The resumable Zarr writes of :mod:`pipeline.scoring.sinks` are the one exception: a large store is written in place,
region by region, and is marked complete (group attribute ``mpm_complete: true``) only when every region is on
disk; readers check :func:`pipeline.scoring.sinks.is_complete`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "temporary_name",
    "atomic_path",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_write_json",
    "stale_temporaries",
    "clear_stale",
    "remove_path",
]

TMP_MARK = ".tmp-"


def temporary_name(path: str | Path, *, keep_suffix: bool = False) -> Path:
    """A fresh temporary path beside ``path`` (same folder, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}{path.suffix if keep_suffix else ''}")


def remove_path(p: Path) -> None:
    """Remove a file or a folder tree; nothing if it is not there."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path, *, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to (a file or a folder such as a Zarr store).

    On a clean exit the temporary is renamed onto ``path`` (a folder that exists at ``path`` is first moved
    aside, then removed: folders cannot be replaced in one rename). On any exception, KeyboardInterrupt
    included, the temporary is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, keep_suffix=keep_suffix)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"the writer of {str(path)!r} wrote nothing at {str(tmp)!r}")
        if tmp.is_dir() and path.exists():
            old = path.with_name(f"{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            remove_path(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsync'd before the rename). Returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically. Returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, obj, *, indent: int | None = 2, **kw) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically. Returns the path."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **kw) + "\n")


def stale_temporaries(path: str | Path) -> list[Path]:
    """Temporaries of ``path`` that a killed writer left behind (``<name>.tmp-*``, ``.<name>.tmp-*``,
    ``.<stem>.tmp-*<suffix>``, ``<name>.old-*``)."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    pats = {f"{path.name}{TMP_MARK}*", f".{path.name}{TMP_MARK}*", f"{path.name}.old-*"}
    if path.suffix:
        pats.add(f".{path.stem}{TMP_MARK}*{path.suffix}")
    found: set[Path] = set()
    for pat in pats:
        found.update(parent.glob(pat))
    return sorted(found)


def clear_stale(path: str | Path) -> list[Path]:
    """Clear what a killed writer of ``path`` left: its temporaries are removed, and a previous version that
    was moved aside (``<name>.old-*``: a folder cannot be replaced in one rename) is put back when nothing is
    at ``path``. Returns what was removed."""
    path = Path(path)
    stale = stale_temporaries(path)
    old = [p for p in stale if ".old-" in p.name]
    if old and not path.exists():
        os.replace(old[0], path)
        stale = [p for p in stale if p != old[0]]
    for p in stale:
        remove_path(p)
    return stale
