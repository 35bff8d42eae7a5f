"""An image's prefetch list: the files a run read, first read first (``run --record-prefetch``).

Kept beside the image record (``images/<id>.prefetch``, one JSON string a line, appended as the
run reads), it orders a lazy image's fill (:mod:`unionfs.registry.lazy`: those files first, at
mount) and ``convert --estargz`` / ``push --estargz``, which write each layer's files of the list
first and then eStargz's ``.prefetch.landmark`` (:func:`.estargz.write`), so any lazy reader of the
pushed image prefetches them.  A path counts for the topmost layer that holds it as a regular file
(what the run read); a layer holding none of them gets ``.no.prefetch.landmark``.

:class:`Recorder` is the daemon's read hook (:class:`unionfs.fs.union.Fill`) for a recording run:
it notes each lower file once, by the path of its fd below a layer's ``root``, and passes the read
on to the lazy fill, if any.
"""
from __future__ import annotations

import json
import os
import threading

from ..fs import sys as ovl
from .store import Store

RECORD_FLAG = "record-prefetch"   # in a container's dir: its next mount records (then the flag goes)


def record_path(store: Store, image_id: str) -> str:
    return store.path("images", image_id.split(":", 1)[-1] + ".prefetch")


def load(store: Store, image_id: str) -> list[str] | None:
    """The recorded list, or None when the image has none."""
    try:
        with open(record_path(store, image_id)) as f:
            return list(dict.fromkeys(json.loads(x) for x in f if x.endswith("\n")))
    except FileNotFoundError:
        return None
    except ValueError:
        return None   # a damaged record orders nothing


def save(store: Store, image_id: str, paths: list[str]) -> None:
    tmp = record_path(store, image_id) + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in paths)
    os.replace(tmp, record_path(store, image_id))


def by_layer(store: Store, diff_ids, paths: list[str]) -> dict[str, list[str]]:
    """Each layer's share of ``paths`` (in their order): the topmost layer holding the path as a
    regular file; a path hidden by something else above (a whiteout, a directory) counts for none."""
    dirs = [(d, store.layer_dir(d)) for d in reversed(list(diff_ids))]
    out: dict[str, list[str]] = {d: [] for d in diff_ids}
    roots = {}
    try:
        for diff_id, d in dirs:
            try:
                roots[diff_id] = os.open(os.path.join(d, "root"), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                pass
        for p in paths:
            for diff_id, _ in dirs:
                if diff_id not in roots:
                    continue
                try:
                    fd = ovl.open_beneath(roots[diff_id], os.fsencode(p), os.O_PATH)
                except OSError:
                    continue   # not in this layer (or below a symlink): look lower
                try:
                    regular = ovl.fstat(fd).st_mode & 0o170000 == 0o100000
                finally:
                    os.close(fd)
                if regular:
                    out[diff_id].append(p)
                break
    finally:
        for fd in roots.values():
            os.close(fd)
    return out


class Recorder:
    """A read hook noting each lower file a run reads (once, in order) into the image's record."""

    def __init__(self, path: str, layer_roots: list[str], inner=None) -> None:
        self.path = path
        self.roots = [os.path.realpath(r) + "/" for r in layer_roots]
        self.inner = inner
        self.background = getattr(inner, "background", None)
        self._seen: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        open(path, "w").close()   # a recording starts afresh

    def _note(self, fd: int) -> None:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return
            for root in self.roots:
                if real.startswith(root):
                    with open(self.path, "a") as f:
                        f.write(json.dumps(real[len(root):]) + "\n")
                    return

    def pending(self, fd: int, offset: int, size: int) -> bool:
        return self.inner is not None and self.inner.pending(fd, offset, size)

    def __call__(self, fd: int, offset: int, size: int) -> None:
        self._note(fd)
        if self.inner is not None:
            self.inner(fd, offset, size)
