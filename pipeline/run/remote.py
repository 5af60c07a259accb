"""``--out URL``: a run whose output folder is on object storage (``s3://bucket/run``, ``gs://...``).

The stages run in a local working copy of the output folder and the copy is mirrored to the URL when the run
ends: finished, failed or interrupted (Ctrl-C). The URL then holds what the folder holds: the outputs of the
finished stages, the partial work of an interrupted one (``checkpoint.pt``, the score store's finished
regions), and ``stages.json``, which marks only finished stages done (:mod:`pipeline.stages`).

- The working copy is ``$MPM_WORKDIR/<hash of the URL>`` (default: the system temporary folder). A rerun on
  the same machine finds it and resumes as a local run does; a rerun elsewhere (a new pod, another node)
  downloads the mirror first and resumes from it.
- A mirror is made safe against its own interruption: ``stages.json`` is removed at the URL before anything
  else changes there and written back last, so a URL never shows a stage done whose outputs are half
  uploaded. What the working copy last mirrored is recorded in it (``.mpm-remote.json``); when the URL was
  changed since by another run, the working copy is dropped and downloaded again.
- Only what changed is uploaded (size and modification time), and keys at the URL that the folder no longer
  holds are removed (a rewritten Zarr store must not keep chunks of its previous version).
- Credentials come from the environment (:mod:`pipeline.storage`); the URL is shown with none.

The library's sinks also write straight to a URL (:func:`pipeline.data.cube.write_cube`,
:func:`pipeline.scoring.sinks.write_zarr_resumable`, :func:`pipeline.scoring.sinks.write_cog`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from pipeline import storage
from pipeline.io import TMP_MARK, atomic_write_json
from pipeline.stages import MANIFEST

__all__ = ["workdir_for", "pull", "push", "run_mirrored"]

RECORD = ".mpm-remote.json"  # in the working copy: the URL and the digest of the stages.json last mirrored
_LOCAL_ONLY = (RECORD, ".mpm.lock")  # never mirrored


def workdir_for(url: str) -> Path:
    """The local working copy of the output folder ``url``."""
    base = Path(os.environ.get("MPM_WORKDIR") or Path(tempfile.gettempdir()) / "mpm-work")
    return base / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def _mirrored(rel: str) -> bool:
    """Whether a file of the working copy (relative path) belongs at the URL: not the working copy's own
    records, not a writer's temporaries, not scratch folders of the cube build."""
    first = rel.split("/", 1)[0]
    return rel not in _LOCAL_ONLY and TMP_MARK not in rel and ".old-" not in first and not first.startswith(".mpm-")


def _remote_files(url: str) -> dict[str, int]:
    """Relative key -> size of every object under ``url``."""
    fs, root = storage.filesystem(url)
    root = root.rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {k[len(root) + 1 :]: int(v.get("size") or 0) for k, v in found.items() if k != root}


def _remote_manifest_digest(url: str) -> str | None:
    try:
        text = storage.read_text(storage.join(url, MANIFEST))
    except FileNotFoundError:
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _record(local: Path) -> dict:
    try:
        return json.loads((local / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def pull(url: str, local: Path, log: Callable[[str], None] = print) -> bool:
    """Make ``local`` the working copy of ``url``: keep it when the URL is as this copy last left it,
    otherwise download the URL afresh. Returns True when something was downloaded."""
    local.mkdir(parents=True, exist_ok=True)
    rec = _record(local)
    remote = _remote_manifest_digest(url)
    if rec.get("url") == url and (rec.get("manifest") == remote or (rec.get("state") == "mirroring" and not remote)):
        return False  # the URL is what this copy mirrored (or its mirror was cut short): the copy is ahead
    files = _remote_files(url)
    for p in list(local.iterdir()):
        if p.name != ".mpm.lock":
            storage.remove(p)
    sent = {}  # what is at the URL already: not uploaded again unless it changes here
    if files:
        log(f"[remote] downloading {len(files)} file(s) of {storage.redact(url)} to resume from them")
        fs, root = storage.filesystem(url)
        for rel in sorted(files):
            dst = local / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root.rstrip('/')}/{rel}", str(dst))
            st = dst.stat()
            sent[rel] = [st.st_size, st.st_mtime_ns]
    atomic_write_json(local / RECORD, {"url": url, "manifest": remote, "state": "mirrored", "sent": sent})
    return bool(files)


def push(local: Path, url: str, log: Callable[[str], None] = print) -> int:
    """Mirror the working copy ``local`` to ``url`` (see the module's docstring). Returns files uploaded."""
    fs, root = storage.filesystem(url)
    root = root.rstrip("/")
    rec = _record(local)
    sent: dict[str, list[int]] = rec.get("sent", {}) if rec.get("url") == url else {}
    rec = {"url": url, "manifest": rec.get("manifest"), "state": "mirroring", "sent": sent}
    atomic_write_json(local / RECORD, rec)
    if fs.exists(f"{root}/{MANIFEST}"):
        fs.rm_file(f"{root}/{MANIFEST}")  # first: while the rest changes, no stage shows as done
    files = {
        f.relative_to(local).as_posix(): f
        for f in sorted(local.rglob("*"))
        if f.is_file() and _mirrored(f.relative_to(local).as_posix())
    }
    there = _remote_files(url)
    stale = [rel for rel in there if rel not in files]
    if stale:
        fs.rm([f"{root}/{rel}" for rel in stale])
    n = 0
    for rel, f in files.items():
        if rel == MANIFEST:
            continue
        st = f.stat()
        sig = [st.st_size, st.st_mtime_ns]
        if sent.get(rel) == sig and there.get(rel) == st.st_size:
            continue
        fs.put_file(str(f), f"{root}/{rel}")
        sent[rel] = sig
        n += 1
    for rel in [k for k in sent if k not in files]:
        del sent[rel]
    if MANIFEST in files:
        fs.put_file(str(files[MANIFEST]), f"{root}/{MANIFEST}")  # last
    atomic_write_json(
        local / RECORD, {"url": url, "manifest": _remote_manifest_digest(url), "state": "mirrored", "sent": sent}
    )
    log(f"[remote] mirrored to {storage.redact(url)} ({n} file(s) uploaded, {len(stale)} removed)")
    return n


def run_mirrored(url: str, run: Callable[[Path], dict], log: Callable[[str], None] = print) -> dict:
    """``run(local)`` in the working copy of ``url``, mirrored to ``url`` when it ends (also on an error or
    Ctrl-C). Returns ``run``'s outputs with their paths as URLs."""
    local = workdir_for(url)
    log(f"[remote] output {storage.redact(url)}: working copy {local}")
    pull(url, local, log)
    try:
        outputs = run(local)
    finally:
        push(local, url, log)
    return {k: _as_url(v, local, url) for k, v in outputs.items()}


def _as_url(p, local: Path, url: str):
    try:
        rel = Path(p).relative_to(local).as_posix()
    except (TypeError, ValueError):
        return p
    return storage.join(url, rel)


def clear_workdir(url: str) -> None:
    """Remove the working copy of ``url`` (the mirror at the URL is kept)."""
    shutil.rmtree(workdir_for(url), ignore_errors=True)
