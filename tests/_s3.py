"""A real S3 server on 127.0.0.1 for the object-storage tests: moto's standalone server, started and stopped
by the tests (no internet, nothing to install beyond the test extra).

The server is reached the way a user reaches MinIO or Ceph: through ``AWS_ENDPOINT_URL`` and the standard
credential variables. Nothing in :mod:`pipeline` is told about the server otherwise.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# what the server needs in the environment; GDAL's own settings (AWS_S3_ENDPOINT ...) are derived from
# AWS_ENDPOINT_URL by pipeline.storage, and are cleared here so that the derivation is what is tested
SECRET = "test-secret-never-logged-7f3a"
DERIVED = ("AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_VIRTUAL_HOSTING")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_s3() -> Iterator[str]:
    """Start moto's S3 server on a free port of 127.0.0.1, point the AWS variables at it, yield its URL.

    The server is a separate process: in this one it would need the GIL to answer GDAL, which holds it while
    pyogrio reads a GeoPackage over /vsis3/ (a deadlock)."""
    import fsspec

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the local S3 server did not start on {url}") from None
                time.sleep(0.2)
        env = {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "test-key",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        saved = {k: os.environ.get(k) for k in (*env, *DERIVED)}
        os.environ.update(env)
        for k in DERIVED:
            os.environ.pop(k, None)
        fsspec.filesystem("s3").clear_instance_cache()  # an s3fs made for another endpoint is cached
        try:
            yield url
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            fsspec.filesystem("s3").clear_instance_cache()
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def new_bucket() -> str:
    """A fresh bucket (GDAL caches what it listed, so each test gets its own)."""
    import fsspec

    name = f"mpm-{uuid.uuid4().hex[:10]}"
    fsspec.filesystem("s3").mkdir(name)
    return name


def upload_tree(local: Path, url: str) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    for f in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        fs.put_file(str(f), f"{url.removeprefix('s3://').rstrip('/')}/{f.relative_to(local).as_posix()}")
