"""Stage bookkeeping: the manifest, stage keys, and running a stage so that a crash leaves nothing half-done.

A stage records what it was built from (a hash of the config sections it reads) in ``DIR/stages.json``;
on a rerun a stage whose outputs exist, are complete and whose recorded hash matches is skipped (``force``
redoes it).

Crash safety (an exception, Ctrl-C, SIGKILL, a lost worker, at any point):

- a stage's entry is removed from ``stages.json`` before the stage starts and written back only after all of
  its outputs are complete, so ``stages.json`` never marks a stage done whose outputs are missing or partial;
- every output is written atomically (:mod:`pipeline.io`) or, for the resumable score store, marked complete
  only at the end; a skipped stage's outputs are checked to be complete, not merely present;
- a rerun of the same command therefore skips exactly the finished stages and redoes (or resumes: training
  from ``checkpoint.pt``, scoring from the store's region manifest) the one that was interrupted, after
  removing the temporaries that a killed writer left behind;
- Ctrl-C raises :class:`StageInterrupted` (a KeyboardInterrupt naming the stage); ``mpm`` prints one line
  and exits with status 130.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.errors import MPMError
from pipeline.io import atomic_write_json, clear_stale

__all__ = ["MANIFEST", "StageInterrupted", "digest", "stage_key", "read_manifest", "output_complete", "run_stage"]


MANIFEST = "stages.json"


class StageInterrupted(KeyboardInterrupt):
    """Ctrl-C during a stage: ``stage`` names it (the CLI prints it and exits with status 130)."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


def digest(obj) -> str:
    """A short stable hash of a JSON-able object (stage keys, cache keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_key(cfg: RunConfig, sections: tuple[str, ...]) -> str:
    """Hash of the config ``sections`` a stage reads."""
    data = cfg.model_dump(mode="json")
    return digest({s: data.get(s) for s in sections})


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
    """Run ``fn`` unless its outputs exist and were built from the same config sections. Returns True if run."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    key = stage_key(cfg, sections)
    # a stage is stale if any upstream stage was rebuilt after it: an upstream's record carries a fresh
    # "built" token each time it runs (records written before there were tokens hash as they did then)
    up_keys = {}
    for u in upstream:
        rec = manifest.get(u, {})
        up_keys[u] = [rec.get("key"), rec["built"]] if "built" in rec else rec.get("key")
    key = digest({"own": key, "upstream": up_keys})
    done = manifest.get(name, {})
    if not force and done.get("key") == key and all(output_complete(p) for p in outputs):
        log(f"[{name}] up to date, skipped ({', '.join(p.name for p in outputs)})")
        return False
    t0 = time.perf_counter()
    _forget(out, name)
    for p in outputs:  # temporaries of a writer that was killed (SIGKILL leaves them)
        clear_stale(p)
    log(f"[{name}] running ...")
    try:
        fn()
    except StageInterrupted:
        raise
    except KeyboardInterrupt:
        raise StageInterrupted(name) from None
    incomplete = [str(p) for p in outputs if not output_complete(p)]
    if incomplete:
        raise MPMError(f"stage '{name}' finished without complete outputs {incomplete}. Fix: rerun with --force")
    manifest = read_manifest(out)
    manifest[name] = {
        "key": key,
        "built": uuid.uuid4().hex[:12],
        "seconds": round(time.perf_counter() - t0, 2),
        "outputs": [str(p) for p in outputs],
    }
    _write_manifest(out, manifest)
    log(f"[{name}] done in {time.perf_counter() - t0:.1f} s")
    return True
