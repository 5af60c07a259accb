"""Stage bookkeeping: the manifest, stage keys, and running a stage so that a crash leaves nothing half-done.

A stage records what it was built from in ``DIR/stages.json``: a hash of the config sections it reads, a
fingerprint of every input file those sections name (rasters, vectors, point tables, the deposits file, the
grid's ``like`` and ``mask``), and the build tokens of the upstream stages. On a rerun a stage whose outputs
exist, are complete and whose record matches is skipped (``force`` redoes it); otherwise it runs again and its
"running" line says why (which section, which input file, which upstream stage changed).

Input fingerprints (:func:`file_fingerprint`): a file up to :data:`HASH_LIMIT` bytes by the sha256 of its
content (a ``touch`` or a copy does not rerun anything; an edit that keeps size and mtime does); a larger file
by its size, its mtime in nanoseconds and the sha256 of its first and last MiB, or of all of it where the mtime
is unreliable (whole seconds: FAT, some network filesystems; or in the future). Sidecar files are part of
their main file (``x.tif.aux.xml``, ``x.tif.ovr``, a shapefile's ``.dbf``/``.shx``/``.prj``/``.cpg``, a
GeoPackage's ``-wal``), and a folder is fingerprinted by the list of its files.

One run per output folder: :func:`pipeline.io.output_lock` (taken by ``mpm`` for the whole command and by
:func:`run_stage` for each stage) makes a second run on the same ``DIR`` fail at once, naming the holder.

Crash safety (an exception, Ctrl-C, SIGKILL, a lost worker, at any point):

- a stage's entry is removed from ``stages.json`` before the stage starts and written back only after all of
  its outputs are complete, so ``stages.json`` never marks a stage done whose outputs are missing or partial;
- every output is written atomically (:mod:`pipeline.io`) or, for the resumable score store, marked complete
  only at the end; a skipped stage's outputs are checked to be complete, not merely present;
- a rerun of the same command therefore skips exactly the finished stages and redoes (or resumes: training
  from ``checkpoint.pt``, scoring from the store's region manifest) the one that was interrupted, after
  removing the temporaries that a killed writer left behind;
- Ctrl-C raises :class:`StageInterrupted` (a KeyboardInterrupt naming the stage); ``mpm`` prints one line
  and exits with status 130. SIGTERM (what a batch system sends) is turned into :class:`Terminated` by
  ``mpm`` and handled the same way, with status 143.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pipeline import storage
from pipeline.config import RunConfig
from pipeline.errors import MPMError
from pipeline.io import atomic_write_json, clear_stale, output_lock

__all__ = [
    "MANIFEST",
    "HASH_LIMIT",
    "StageInterrupted",
    "Terminated",
    "digest",
    "file_fingerprint",
    "stage_inputs",
    "stage_parts",
    "stage_key",
    "read_manifest",
    "output_complete",
    "run_stage",
]


MANIFEST = "stages.json"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every stage cleans up the same way."""

    signum = 15


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM: ``signum`` 15) during a stage: ``stage`` names it (the CLI prints it and exits with
    status 128 + ``signum``: 130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, stage: str, signum: int = 2):
        super().__init__(stage)
        self.stage = stage
        self.signum = signum


def digest(obj) -> str:
    """A short stable hash of a JSON-able object (stage keys, cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


HASH_LIMIT = 64 * 2**20  # files up to this size are fingerprinted by a hash of their whole content
_EDGE = 2**20  # bytes hashed at each end of a larger file
_SHP_SIDECARS = (".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx")
_MAX_LISTED = 100_000  # files of a folder input listed in its fingerprint
_CACHE: dict[tuple, str] = {}  # (path, size, mtime, ctime, inode) -> content hash: a file is read once per process


def _sha(path: Path, edges: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if edges:
            h.update(f.read(_EDGE))
            f.seek(max(0, os.fstat(f.fileno()).st_size - _EDGE))
            h.update(f.read(_EDGE))
        else:
            for blk in iter(lambda: f.read(1 << 20), b""):
                h.update(blk)
    return h.hexdigest()[:24]


def _one_file(path: Path) -> str:
    st = path.stat()
    unreliable = st.st_mtime_ns % 1_000_000_000 == 0 or st.st_mtime > time.time() + 60
    whole = st.st_size <= HASH_LIMIT or unreliable
    ck = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, whole)  # ctime: utime cannot set it
    if ck not in _CACHE:
        _CACHE[ck] = _sha(path, edges=not whole)
    if whole:
        return f"sha256:{_CACHE[ck]}"
    return f"size={st.st_size};mtime_ns={st.st_mtime_ns};edges-sha256:{_CACHE[ck]}"


def _sidecars(path: Path) -> list[Path]:
    parent = path.parent
    found = [p for p in parent.glob(f"{path.name}.*") if p.is_file()]  # x.tif.aux.xml, x.tif.ovr
    found += [p for p in (parent / f"{path.name}-wal",) if p.is_file()]  # a GeoPackage's write-ahead log
    if path.suffix.lower() == ".shp":
        found += [p for p in parent.glob(f"{path.stem}.*") if p.suffix.lower() in _SHP_SIDECARS and p.is_file()]
    return sorted(set(found))


def file_fingerprint(path: str | Path) -> str:
    """What an input file is, for stage keys (see the module docstring): a content hash for a small file,
    size + mtime + a hash of both ends for a large one, with its sidecar files; a folder by its file list;
    ``"missing"`` when nothing is there (the stage then fails with its own message). A URL (``s3://``,
    ``gs://``, ...) by what its store reports: size, ETag (an MD5 of the content on S3), modification time."""
    if storage.is_url(path):
        return _url_fingerprint(str(path))
    path = Path(path)
    try:
        if path.is_dir():
            listed = []
            for i, p in enumerate(sorted(path.rglob("*"))):
                if i >= _MAX_LISTED:
                    break
                if p.is_file():
                    st = p.stat()
                    listed.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
            return "folder:" + digest(listed)
        if not path.exists():
            return "missing"
        parts = [_one_file(path)] + [f"{p.name}={_one_file(p)}" for p in _sidecars(path)]
    except OSError as exc:  # unreadable: the stage that reads it names the problem
        return f"unreadable:{type(exc).__name__}"
    return parts[0] if len(parts) == 1 else digest(parts)


_URL_KEYS = (
    "size",
    "ETag",
    "etag",
    "md5_hash",
    "crc32c",
    "generation",
    "LastModified",
    "last_modified",
    "mtime",
    "created",
)


def _url_fingerprint(url: str) -> str:
    try:
        fs, path = storage.filesystem(url)
        info = fs.info(path)
    except FileNotFoundError:
        return "missing"
    except Exception as exc:  # unreachable: the stage that reads it names the problem
        return f"unreadable:{type(exc).__name__}"
    return "url:" + digest({k: str(info[k]) for k in _URL_KEYS if info.get(k) is not None})


def stage_inputs(cfg: RunConfig, sections: tuple[str, ...]) -> dict[str, Path]:
    """The input files that the config ``sections`` name, by a label for messages (``layer 'mag' file
    'mag.tif'``)."""
    files: dict[str, Path] = {}
    if "grid" in sections:
        for key in ("like", "mask"):
            p = getattr(cfg.grid, key)
            if p is not None:
                files[f"grid.{key} file {Path(p).name!r}"] = cfg.resolve(p)
    if "layers" in sections:
        for layer in cfg.layers:
            files[f"layer {layer.name!r} file {Path(layer.path).name!r}"] = cfg.resolve(layer.path)
    if "deposits" in sections and cfg.deposits is not None:
        files[f"deposits file {Path(cfg.deposits.path).name!r}"] = cfg.resolve(cfg.deposits.path)
    return files


def stage_parts(cfg: RunConfig, sections: tuple[str, ...]) -> dict[str, str]:
    """What a stage is built from, by label: a hash of each config section and a fingerprint of each input
    file (:func:`stage_inputs`)."""
    data = cfg.model_dump(mode="json")
    parts = {f"config section '{s}'": digest(data.get(s)) for s in sections}
    parts.update({label: file_fingerprint(p) for label, p in stage_inputs(cfg, sections).items()})
    return parts


def stage_key(cfg: RunConfig, sections: tuple[str, ...]) -> str:
    """Hash of the config ``sections`` a stage reads and of the input files they name."""
    return digest(stage_parts(cfg, sections))


def _why(done: dict, parts: dict) -> str:
    """Why a stage with record ``done`` runs again, given what it is built from now (``parts``)."""
    old = done.get("parts")
    if not isinstance(old, dict):
        return "recorded by an earlier version of mpm"
    changed = [k for k in parts if old.get(k) != parts[k]] + [k for k in old if k not in parts]
    words = []
    for k in changed[:4]:
        if k.startswith("upstream "):
            words.append(f"{k} was rebuilt")
        elif k not in old:
            words.append(f"{k} is new")
        elif k not in parts:
            words.append(f"{k} was removed")
        else:
            words.append(f"{k} changed")
    more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
    return ", ".join(words) + more if words else "its outputs are missing or incomplete"


def read_manifest(out: Path) -> dict:
    """``out/stages.json`` as a dict ({} when missing or unreadable)."""
    p = out / MANIFEST
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return {}


def _write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_json(out / MANIFEST, manifest)


def output_complete(p: Path) -> bool:
    """True when output ``p`` is there and complete: a non-empty file, or a Zarr store whose root metadata
    is there and which is not marked incomplete (``mpm_complete: false``, see :mod:`pipeline.scoring.sinks`)."""
    p = Path(p)
    if p.is_file():
        return p.stat().st_size > 0
    if not p.is_dir():
        return False
    if p.suffix != ".zarr":
        return True
    meta = p / "zarr.json"
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return attrs.get("mpm_complete", True) is not False


def _forget(out: Path, name: str) -> None:
    """Remove ``name`` from the manifest (before its stage runs: a crash must not leave it marked done)."""
    manifest = read_manifest(out)
    if name in manifest:
        del manifest[name]
        _write_manifest(out, manifest)


def run_stage(
    name: str,
    cfg: RunConfig,
    out: Path,
    outputs: list[Path],
    sections: tuple[str, ...],
    fn: Callable[[], object],
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
    upstream: tuple[str, ...] = (),
) -> bool:
    """Run ``fn`` unless its outputs exist and were built from the same config sections, input files and
    upstream stages. Returns True if run. Holds ``out``'s lock (:func:`pipeline.io.output_lock`) throughout."""
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        return _run_stage(name, cfg, out, outputs, sections, fn, force, log, upstream)


def _run_stage(name, cfg, out, outputs, sections, fn, force, log, upstream) -> bool:
    manifest = read_manifest(out)
    parts = stage_parts(cfg, sections)
    # a stage is stale if any upstream stage was rebuilt after it: an upstream's record carries a fresh
    # "built" token each time it runs
    for u in upstream:
        rec = manifest.get(u, {})
        parts[f"upstream stage '{u}'"] = digest([rec.get("key"), rec.get("built")])
    key = digest(parts)
    done = manifest.get(name, {})
    complete = all(output_complete(p) for p in outputs)
    if not force and done.get("key") == key and complete:
        log(f"[{name}] up to date, skipped ({', '.join(p.name for p in outputs)})")
        return False
    why = "--force" if force else (_why(done, parts) if done else "")
    t0 = time.perf_counter()
    _forget(out, name)
    for p in outputs:  # temporaries of a writer that was killed (SIGKILL leaves them)
        clear_stale(p)
    log(f"[{name}] running ({why}) ..." if why else f"[{name}] running ...")
    try:
        fn()
    except StageInterrupted:
        raise
    except KeyboardInterrupt as exc:
        raise StageInterrupted(name, getattr(exc, "signum", 2)) from None
    except Exception as exc:  # the CLI's one line names the stage of an unexpected error
        if not hasattr(exc, "mpm_stage"):
            try:
                exc.mpm_stage = name
            except AttributeError:  # an exception type without a __dict__
                pass
        raise
    incomplete = [str(p) for p in outputs if not output_complete(p)]
    if incomplete:
        raise MPMError(f"stage '{name}' finished without complete outputs {incomplete}. Fix: rerun with --force")
    manifest = read_manifest(out)
    manifest[name] = {
        "key": key,
        "built": uuid.uuid4().hex[:12],
        "seconds": round(time.perf_counter() - t0, 2),
        "outputs": [str(p) for p in outputs],
        "parts": parts,
    }
    _write_manifest(out, manifest)
    log(f"[{name}] done in {time.perf_counter() - t0:.1f} s")
    return True
