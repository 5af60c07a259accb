"""Object storage: where a path may be a local path or an fsspec URL (``s3://``, ``gs://``, ``az://``, ``https://``).

Every input path of a run config, and every ``--out``, may be a URL. Three readers meet a URL:

- fsspec (Zarr stores, CSV tables, small files): ``fsspec.core.url_to_fs`` picks the file system; s3fs's
  botocore reads the standard ``AWS_ENDPOINT_URL`` itself, and credentials come from the usual environment and
  profile chain (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, an instance role);
- GDAL (rasters through rasterio, GeoPackages through pyogrio): ``s3://b/k`` is read as ``/vsis3/b/k`` and
  ``https://`` as ``/vsicurl/``. GDAL 3.10 does not read ``AWS_ENDPOINT_URL``, so :func:`use_endpoint` derives
  GDAL's own settings (``AWS_S3_ENDPOINT``, ``AWS_HTTPS``, ``AWS_VIRTUAL_HOSTING``) from it, as environment
  variables: GDAL reads them at each open, in this process and in worker processes started after it;
- Python's ``open``: never for a URL; :func:`open_file` goes through fsspec.

Credentials are never taken from a config and never written out: :func:`redact` strips ``user:secret@`` from
a URL before it is shown.

A local path stays a :class:`pathlib.Path`; a URL stays a ``str`` (``Path("s3://b/k")`` would fold the
``//`` and lose the scheme).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

from pydantic import BeforeValidator

__all__ = [
    "is_url",
    "location",
    "as_location",
    "Location",
    "join",
    "name_of",
    "suffix",
    "parent_of",
    "filesystem",
    "exists",
    "is_file",
    "size",
    "open_file",
    "read_text",
    "write_bytes",
    "remove",
    "upload",
    "download",
    "gdal_path",
    "use_endpoint",
    "redact",
]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_VSI = {"s3": "/vsis3/", "gs": "/vsigs/", "gcs": "/vsigs/", "az": "/vsiaz/", "abfs": "/vsiaz/"}


def is_url(p) -> bool:
    """True for an fsspec URL (``s3://b/k``, ``https://h/p``); False for a local path and ``file://`` URLs."""
    return isinstance(p, str) and bool(_URL.match(p)) and not p.startswith("file://")


def location(p: str | Path) -> str | Path:
    """``p`` as a location: a URL stays a string, anything else becomes a :class:`Path` (``file://`` stripped)."""
    if is_url(p):
        return str(p)
    if isinstance(p, str) and p.startswith("file://"):
        p = p[len("file://") :]
    return Path(p)


def join(base: str | Path, *parts: str) -> str | Path:
    """``base / part / ...`` for a local path or a URL (a URL gets ``/``-joined keys)."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(str(p).strip("/") for p in parts)])
    return Path(base).joinpath(*parts)


def name_of(p: str | Path) -> str:
    """The last part of a path or URL (``cube.zarr``)."""
    return str(p).rstrip("/").rsplit("/", 1)[-1] if is_url(p) else Path(p).name


def suffix(p: str | Path) -> str:
    """The file extension of a path or URL (``.tif``), as written."""
    return Path(name_of(p)).suffix


def parent_of(p: str | Path) -> str | Path:
    """The folder of a path or URL."""
    return str(p).rstrip("/").rsplit("/", 1)[0] if is_url(p) else Path(p).parent


def filesystem(p: str | Path):
    """``(fs, path)``: the fsspec file system of ``p`` and ``p`` as that file system names it."""
    import fsspec

    return fsspec.core.url_to_fs(str(p))


def exists(p: str | Path) -> bool:
    if not is_url(p):
        return Path(p).exists()
    fs, path = filesystem(p)
    return fs.exists(path)


def is_file(p: str | Path) -> bool:
    if not is_url(p):
        return Path(p).is_file()
    fs, path = filesystem(p)
    return fs.isfile(path)


def size(p: str | Path) -> int:
    """Bytes of a file (local or remote)."""
    if not is_url(p):
        return Path(p).stat().st_size
    fs, path = filesystem(p)
    return int(fs.size(path))


def open_file(p: str | Path, mode: str = "rb"):
    """A file object for ``p``: Python's ``open`` for a local path, fsspec's for a URL."""
    if not is_url(p):
        return open(p, mode)
    fs, path = filesystem(p)
    return fs.open(path, mode)


def read_text(p: str | Path, encoding: str = "utf-8") -> str:
    with open_file(p, "rb") as f:
        return f.read().decode(encoding)


def write_bytes(p: str | Path, data: bytes) -> None:
    """Write a whole object. On object storage one PUT is atomic: readers see the old object or the new one."""
    if not is_url(p):
        Path(p).write_bytes(data)
        return
    fs, path = filesystem(p)
    fs.pipe_file(path, data)


def remove(p: str | Path) -> None:
    """Remove a file or a folder tree (a key prefix on object storage); nothing if it is not there."""
    if not is_url(p):
        import shutil

        q = Path(p)
        if q.is_dir() and not q.is_symlink():
            shutil.rmtree(q, ignore_errors=True)
        else:
            q.unlink(missing_ok=True)
        return
    fs, path = filesystem(p)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def upload(local: str | Path, url: str) -> None:
    """Copy a local file or folder to ``url`` (a folder's files keep their relative keys)."""
    fs, path = filesystem(url)
    local = Path(local)
    if local.is_dir():
        for f in sorted(q for q in local.rglob("*") if q.is_file()):
            fs.put_file(str(f), f"{path.rstrip('/')}/{f.relative_to(local).as_posix()}")
    else:
        fs.put_file(str(local), path)


def download(url: str, local: str | Path) -> None:
    """Copy a remote file or folder to ``local``."""
    fs, path = filesystem(url)
    local = Path(local)
    if fs.isdir(path):
        for key in fs.find(path):
            rel = key[len(path.rstrip("/")) + 1 :]
            dst = local / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(key, str(dst))
    else:
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(local))


def gdal_path(p: str | Path) -> str:
    """The name GDAL opens ``p`` by: ``/vsis3/b/k`` for ``s3://b/k``, ``/vsicurl/URL`` for http(s); a local
    path unchanged. Sets GDAL's endpoint settings first (:func:`use_endpoint`)."""
    if not is_url(p):
        return str(p)
    use_endpoint()
    scheme, rest = str(p).split("://", 1)
    scheme = scheme.lower()
    if scheme in ("http", "https"):
        return f"/vsicurl/{p}"
    if scheme in _VSI:
        return _VSI[scheme] + rest
    return str(p)  # another fsspec scheme: GDAL cannot read it; the caller's error names the path


def use_endpoint() -> dict[str, str]:
    """Derive GDAL's S3 settings from ``AWS_ENDPOINT_URL`` (``http://127.0.0.1:9000`` -> ``AWS_S3_ENDPOINT=
    127.0.0.1:9000``, ``AWS_HTTPS=NO``, ``AWS_VIRTUAL_HOSTING=FALSE``), unless they are set already. Returns
    what it set. Idempotent and cheap: called before every GDAL open of a URL, on the client and the workers."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        return {}
    parts = urlsplit(url)
    want = {
        "AWS_S3_ENDPOINT": parts.netloc + parts.path.rstrip("/"),
        "AWS_HTTPS": "NO" if parts.scheme == "http" else "YES",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }
    done = {}
    for k, v in want.items():
        if k not in os.environ:
            os.environ[k] = v
            done[k] = v
    return done


def redact(p) -> str:
    """``p`` as text with any ``user:secret@`` of a URL removed (what logs and reports may show)."""
    text = str(p)
    if not is_url(text):
        return text
    parts = urlsplit(text)
    if "@" not in parts.netloc:
        return text
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def as_location(v):
    """Pydantic's view of a path field: a URL string stays a string, any other string becomes a Path. A URL
    that carries credentials (``s3://user:secret@bucket/key``) is refused: they belong in the environment."""
    if isinstance(v, str) and is_url(v) and "@" in urlsplit(v).netloc:
        raise ValueError(
            f"the URL {redact(v)!r} carries credentials. Fix: remove them from the config and set them in the "
            "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or the cloud's own login)"
        )
    if isinstance(v, str):
        return location(v)
    return v


# a config's path field: a local path (Path) or an fsspec URL (str: s3://, gs://, az://, https://)
Location = Annotated[str | Path, BeforeValidator(as_location)]
