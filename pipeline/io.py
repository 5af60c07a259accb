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

One run per output folder: :func:`output_lock` holds ``DIR/.mpm.lock`` (an exclusive ``flock`` on a file that
names the holder: pid, host, command, start time) while a command writes into ``DIR``. A second run fails at
once with :class:`~pipeline.errors.LockError`, one line naming the holder. The kernel drops a ``flock`` when
its process dies (SIGKILL, OOM killer, a lost node), so a lock file left by a dead process is taken over; on a
filesystem without ``flock`` (and on Windows) the file alone is the lock, and one naming a pid that no longer
runs on this host is taken over.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import LockError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: the lock file alone
    fcntl = None

__all__ = [
    "temporary_name",
    "atomic_path",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_write_json",
    "stale_temporaries",
    "clear_stale",
    "remove_path",
    "LOCK_NAME",
    "output_lock",
    "lock_holder",
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


# ------------------------------------------------------------------------------------------------
# one run per output folder
# ------------------------------------------------------------------------------------------------
LOCK_NAME = ".mpm.lock"
_HELD: dict[str, list] = {}  # resolved folder -> [fd or None, depth]: the lock is reentrant in one process
_HELD_GUARD = threading.Lock()
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def lock_holder(folder: str | Path) -> dict | None:
    """What ``folder``'s lock file says of its holder (pid, host, command, since), or None."""
    try:
        text = (Path(folder) / LOCK_NAME).read_text(errors="replace")[:4096]
        info = json.loads(text)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict | None) -> str:
    if not info:
        return "a process that has not written its name yet"
    cmd = " ".join(str(info.get("command", ""))[:120].split())
    return (
        f"pid {info.get('pid')} on host {str(info.get('host'))[:64]!r}"
        + (f" ({cmd!r}" if cmd else " (")
        + f"{', ' if cmd else ''}since {info.get('since', '?')})"
    )


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    except (TypeError, ValueError):
        return False
    return True


def _held_error(folder: Path, info: dict | None) -> LockError:
    return LockError(
        f"output folder {str(folder)[:200]!r} is in use by another mpm run: {_describe(info)}. Fix: wait for "
        f"that run to end (or stop it), or give this one another --out; a lock left by a process that no longer "
        f"runs is taken over by itself, but one from another host is not: remove {LOCK_NAME!r} there only if "
        "that run is over"
    )


def _write_holder(fd: int) -> None:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(["mpm", *sys.argv[1:]])[:400],
        "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0) if hasattr(os, "pwrite") else (os.lseek(fd, 0, 0), os.write(fd, data))
    os.fsync(fd)


def _acquire_file_only(folder: Path, path: Path, log) -> None:
    """The lock without flock: create the file exclusively; one naming a dead local pid is taken over."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = lock_holder(folder)
            if info and info.get("host") == socket.gethostname() and not _pid_alive(info.get("pid")):
                gone = path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex[:8]}")
                try:
                    os.replace(path, gone)  # only one of two racing takers moves this file
                except FileNotFoundError:
                    continue
                gone.unlink(missing_ok=True)
                log(f"[lock] took over the lock of {_describe(info)}: that process no longer runs")
                continue
            raise _held_error(folder, info) from None
        try:
            _write_holder(fd)
        finally:
            os.close(fd)
        return
    raise _held_error(folder, lock_holder(folder))


def _acquire(folder: Path, log) -> int | None:
    """Take ``folder``'s lock; returns the open descriptor that holds it (None: the file-only lock)."""
    path = folder / LOCK_NAME
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except IsADirectoryError:
            raise LockError(
                f"{str(path)[:200]!r} is a folder, where mpm keeps its lock file. Fix: remove or rename that folder"
            ) from None
        if fcntl is None:
            os.close(fd)
            _acquire_file_only(folder, path, log)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _held_error(folder, lock_holder(folder)) from None
            if exc.errno in _NO_FLOCK:
                _acquire_file_only(folder, path, log)
                return None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file between our open and our flock: take the new one
            os.close(fd)
            continue
        info = lock_holder(folder)
        if info and (info.get("pid"), info.get("host")) != (os.getpid(), socket.gethostname()):
            log(f"[lock] took over the lock of {_describe(info)}: that process no longer holds it")
        _write_holder(fd)
        return fd
    raise _held_error(folder, lock_holder(folder))


@contextmanager
def output_lock(folder: str | Path, *, log=print) -> Iterator[Path]:
    """Hold ``folder``'s exclusive lock (see the module docstring) for the ``with`` block; yields the folder.

    Reentrant within one process (a command holds it, and each stage takes it again). Raises
    :class:`~pipeline.errors.LockError` at once, naming the holder, when another process holds it. A folder
    that the lock created and that is still empty at the end is removed (a command that failed its checks
    leaves nothing behind).
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
        else:
            _HELD[key] = [_acquire(folder, log), 1]
    try:
        yield folder
    finally:
        with _HELD_GUARD:
            held = _HELD[key]
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                try:  # removed while still held, so a waiting process never locks a file that is going away
                    (folder / LOCK_NAME).unlink(missing_ok=True)
                except OSError:
                    pass
                if held[0] is not None:
                    os.close(held[0])
                if created:
                    try:
                        folder.rmdir()  # only if empty
                    except OSError:
                        pass
