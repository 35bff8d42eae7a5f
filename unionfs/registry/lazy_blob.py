"""What every lazy layer has, whatever its format (eStargz by TOC, gzip/zstd by index): the files
of its store directory, and its blob fetched by HTTP range into ``lazy-blob`` as reads need it."""
from __future__ import annotations

import os

from .client import Client, RegistryError

LAZY_FILE = "lazy.json"       # where the blob is (registry, repository, digest, size)
BLOB_FILE = "lazy-blob"       # the compressed blob, filled range by range; whole, it is checked and kept
DONE_FILE = "lazy.done"       # lazy.json, renamed once the layer is whole: an ordinary stored layer
IDLE = 1.0                    # seconds without a fetching read before the background fill goes on


def client_for(source: dict) -> Client:
    """A connected client for the registry a lazy layer came from (``lazy.json``)."""
    return Client(source["registry"], source["repository"], insecure=source["insecure"],
                  ca_file=source["ca_file"]).connect()


def get_range(client: Client, digest: str, start: int, end: int) -> bytes:
    """Bytes ``start..end-1`` of a blob, by one range request (a 200 for the whole blob is refused)."""
    what = f"{client.where}: blob {digest} bytes {start}-{end - 1}"
    resp = client._send("GET", f"/v2/{client.repository}/blobs/{digest}",
                        headers={"Range": f"bytes={start}-{end - 1}"}, stream=True)
    try:
        if resp.status_code != 206:
            raise client._fail(resp, what) if resp.status_code >= 400 else \
                RegistryError(f"{what}: the registry answered {resp.status_code}, not 206 (no range requests)")
        data = b"".join(resp.iter_bytes())
    except RegistryError:
        raise
    except Exception as e:   # httpx transport errors: one line, as every registry error
        raise RegistryError(f"{what}: {e.__class__.__name__}: {e}") from None
    finally:
        resp.close()
    if len(data) != end - start:
        raise RegistryError(f"{what}: got {len(data)} bytes")
    return data



def pwrite_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


def pwrite_file(path: str, data: bytes, pos: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        pwrite_all(fd, data, pos)
    finally:
        os.close(fd)
