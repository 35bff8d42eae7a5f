"""What every lazy layer has, whatever its format (eStargz by TOC, gzip/zstd by index): the files
of its store directory, its blob fetched by HTTP range into ``lazy-blob`` as reads need it, and
the fill hook's machinery both kinds share (:class:`FillState`: reads off the loop, one fetch per
piece, the background fill between reads, ``complete`` for push and save)."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Callable

from ..image.model import ImageError
from .client import Client, RegistryError

log = logging.getLogger("unionfs.registry.lazy")

LAZY_FILE = "lazy.json"       # where the blob is (registry, repository, digest, size)
BLOB_FILE = "lazy-blob"       # the compressed blob, filled range by range; whole, it is checked and kept
DONE_FILE = "lazy.done"       # lazy.json, renamed once the layer is whole: an ordinary stored layer
IDLE = 1.0                    # seconds without a fetching read before the background fill goes on
ACCESS_FILE = "lazy-access"   # files in the order reads first fetched them: the background fill's order next time


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


def read_access(layer_dir: str) -> dict[str, None]:
    """The files reads of the layer fetched first, in order (``lazy-access``; a damaged one orders nothing)."""
    try:
        with open(os.path.join(layer_dir, ACCESS_FILE)) as a:
            return {json.loads(x): None for x in a if x.endswith("\n")}
    except (FileNotFoundError, ValueError):
        return {}


class Marks:
    """A set of offsets kept in a file that only grows, shared by every mount of the layer (what is
    local: eStargz chunks in ``lazy-present``, an index's spans and pieces); thread-safe."""

    def __init__(self, path: str) -> None:
        self.path, self.seen, self.size = path, set(), 0
        self._lock = threading.Lock()

    def reload(self) -> None:
        with self._lock:
            if os.path.getsize(self.path) != self.size:
                with open(self.path, "rb") as f:
                    f.seek(self.size)
                    tail = f.read()
                cut = tail.rfind(b"\n") + 1
                self.seen.update(int(x) for x in tail[:cut].split())
                self.size += cut

    def add(self, offset: int) -> None:
        with self._lock:
            with open(self.path, "a") as f:
                f.write(f"{offset}\n")
            self.seen.add(offset)

    def __contains__(self, offset: int) -> bool:
        return offset in self.seen


class FillState:
    """What the fill hooks of both layer kinds share (:class:`.lazy.LazyFill`, :class:`.indexed.IndexedFill`):
    they run on the adapter's threads, so ``_lock`` guards their state and never a download; a piece
    being fetched is in ``_inflight`` (a second reader waits for that fetch rather than starting
    another); reads fetching now are counted in ``_demand``, and the background fill waits for none."""

    def __init__(self, store, layer_dirs: list[str], recorded: dict[str, list[str]] | None = None) -> None:
        self.store = store
        self.layer_dirs = layer_dirs
        self.recorded = recorded or {}      # layer dir -> its share of the image's recorded prefetch list
        self._connecting = threading.Lock()   # a client connects to the registry: never under _lock
        self.last_read = time.monotonic()   # the background fill waits for reads to pause
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, int], threading.Event] = {}
        self._demand = 0
        self.fetched = 0
        self.wait_for_reads = True          # off for complete(): nobody reads, fetch at once
        self._files: dict | None = None     # (st_dev, st_ino) of a placeholder -> its file: made on first use
        self.peers: tuple[FillState, ...] = (self,)   # the hooks of one mount (lazy.Fills)

    # the hook: the subclass finds what a read lacks and fetches one piece of it
    def _missing(self, fd: int, offset: int, size: int) -> tuple:
        """(the placeholder open as ``fd`` or None, the pieces of the range not local), under the lock."""
        raise NotImplementedError

    def _fetch(self, f, piece) -> None:
        """One piece local for a read (fetched, or another's fetch of it waited for)."""
        raise NotImplementedError

    def pending(self, fd: int, offset: int, size: int) -> bool:
        with self._lock:
            return self._files is None or bool(self._missing(fd, offset, size)[1])

    def __call__(self, fd: int, offset: int, size: int) -> None:
        with self._lock:
            f, todo = self._missing(fd, offset, size)
            if not todo:
                return
            self._demand += 1
        try:
            for piece in todo:
                self._fetch(f, piece)
        finally:
            with self._lock:
                self._demand -= 1
                self.last_read = time.monotonic()
        self._note_access(f.layer.accessed, f.layer.dir, f.name)

    def _claim(self, key: tuple[str, int], have: Callable[[], bool], demand: bool) -> threading.Event | None:
        """The event this thread sets once it fetched ``key``, or None: it is here (``have()``, asked
        under the lock), or another fetch of it ended and this is the background (which leaves a
        failure to the next read; a demand read tries once itself, to get its own EIO)."""
        while True:
            with self._lock:
                if have():
                    return None
                if demand:
                    self.last_read = time.monotonic()
                ev = self._inflight.get(key)
                if ev is None:
                    ev = self._inflight[key] = threading.Event()
                    return ev
            ev.wait()
            with self._lock:
                if have() or not demand:
                    return None

    def _release(self, key: tuple[str, int], ev: threading.Event) -> None:
        with self._lock:
            del self._inflight[key]
        ev.set()

    def _traffic(self) -> tuple[float, bool]:
        """(seconds since a read last fetched, whether one is fetching now)."""
        with self._lock:
            return time.monotonic() - self.last_read, self._demand > 0

    def _wait_idle(self, idle: float = IDLE) -> None:
        """Let reads have the link: the fill goes on once no read is fetching, nor has for ``idle``
        seconds, through this hook or a peer of it (another kind's layers of the same mount)."""
        while self.wait_for_reads:
            seen = [p._traffic() for p in self.peers]
            quiet, busy = min(q for q, _ in seen), any(b for _, b in seen)
            if not busy and quiet >= idle:
                return
            time.sleep(idle - quiet if not busy and quiet < idle else 0.05)

    def _note_access(self, accessed: dict[str, None], layer_dir: str, name: str) -> None:
        """The access pattern, for the next background fill (``lazy-access``, shared by every mount)."""
        with self._lock:
            if name not in accessed:
                accessed[name] = None
                with open(os.path.join(layer_dir, ACCESS_FILE), "a") as a:
                    a.write(json.dumps(name) + "\n")

    # the background fill and complete(): the subclass's layers, how one's prefetch files and the
    # rest of it are fetched, how much of it is local
    def _lazy_layers(self) -> list:
        raise NotImplementedError

    def _prefetch_layer(self, layer) -> None:
        raise NotImplementedError

    def _fill_whole(self, layer) -> None:
        raise NotImplementedError

    def _local_bytes(self, layer_dir: str) -> tuple[int, int]:
        raise NotImplementedError

    def background(self) -> None:
        """The daemon's background thread: each layer's prefetch files at once, then the rest of each
        between reads; a layer whose fill stops stays lazy, and the next mount goes on."""
        self.prefetch_all()
        self.fill_all()

    def prefetch_all(self) -> None:
        for layer in self._lazy_layers():
            try:
                self._prefetch_layer(layer)
            except OSError:
                log.warning("lazy layer %s: prefetch stopped", layer.source["digest"])

    def fill_all(self) -> None:
        for layer in self._lazy_layers():
            try:
                self._fill_whole(layer)
            except OSError:
                log.warning("lazy layer %s: background fill stopped; the next mount continues",
                            layer.source["digest"])
            except ImageError as e:   # the whole blob does not match: logged, the layer stays lazy
                log.error("%s", e)
            except Exception:
                log.exception("lazy layer %s: background fill failed", layer.source["digest"])

    def complete(self, say) -> None:
        """Fetch all that is not yet local now, layer by layer with a line each (``push``, ``save``
        and ``convert`` of a lazy image need its blobs); a failure is one line naming the way out."""
        self.wait_for_reads = False
        for layer in self._lazy_layers():
            if not os.path.exists(os.path.join(layer.dir, LAZY_FILE)):
                continue   # a mount's fill completed it meanwhile
            digest = layer.source["digest"]
            have, size = self._local_bytes(layer.dir)
            say(f"{digest[7:19]}: lazy layer, {have} of {size} bytes local: fetching the rest "
                f"from {layer.source['registry']}/{layer.source['repository']}")
            try:
                self._fill_whole(layer)
            except (OSError, RegistryError) as e:
                raise RegistryError(f"lazy layer {digest}: fetching the rest from {layer.source['registry']} "
                                    f"failed ({e}); the image is not all local: try again with the registry "
                                    f"reachable, or pull it whole (unionfs pull)") from None
            say(f"{digest[7:19]}: complete")
