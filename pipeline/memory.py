"""Keep a long compute's resident memory close to what it really holds (glibc malloc tuning).

glibc raises its mmap threshold each time a large block is freed (up to 32 MB), after which chunk-sized
arrays come from the heap arenas; freed there, they stay in the process's resident memory, fragmented
between small live objects. Over a cube build of thousands of chunk-sized temporaries this is hundreds of
MB that nothing uses. A fixed threshold keeps arrays above 128 KiB in mmap (returned to the system on
free), and a low trim threshold gives the top of the heap back. Dask's own workers are tuned the same way
through ``MALLOC_TRIM_THRESHOLD_``. No effect off Linux/glibc, or where the user set the variables.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
THRESHOLD = 128 * 1024
_done = False


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def limit_fragmentation() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (once). Returns whether they were set."""
    global _done
    if _done:
        return True
    libc = _libc()
    if libc is None:
        return False
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD)
    _done = True
    return True


def bound_gdal_cache(mb: int = 16) -> None:
    """GDAL keeps decoded raster blocks up to GDAL_CACHEMAX (5 % of RAM by default): over a cube build
    that is every source raster whole. The build reads each source a grid chunk at a time, so cached
    blocks are rarely read again; 16 MB holds the blocks a chunk's window shares with its neighbours.
    (Seen with memray: at 64 MB the cache was the largest single item of the build's heap.) Unless the
    user chose a value; GDAL reads it once, at its first block read in this process."""
    os.environ.setdefault("GDAL_CACHEMAX", str(mb))


def trim() -> None:
    """Give freed heap memory back to the system now (after a large compute)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
