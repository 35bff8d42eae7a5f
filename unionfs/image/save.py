"""``unionfs save``: which images go out under which names, and the output appearing whole.

The formats are written by their own modules, each of which also reads its format:
``docker`` (the default) by :mod:`.docker_archive`, ``oci`` by :mod:`.oci_layout` (a
directory, or a tar when the output name ends in ``.tar``).  This module picks the images
(:func:`select`, as docker save names them) and owns the output: it appears by one
``rename(2)`` once complete; on any error nothing is left.  Every byte written is checked on
the way (:mod:`.streams`), so a damaged store is never exported silently.  It writes no
format's files itself.
"""
from __future__ import annotations

import os
import shutil
import uuid

from . import docker_archive, oci_layout
from .archive import DirSink, TarSink
from .model import ImageError, Reference
from .store import Store
from .streams import Selected

WRITERS = {"docker": docker_archive.write, "oci": oci_layout.write}
FORMATS = tuple(WRITERS)


def select(store: Store, names: list[str]) -> list[Selected]:
    """Images by name: a tag saves that tag, an id saves the image under all its tags (as docker save)."""
    out: list[Selected] = []
    for name in names:
        image_id = store.resolve(name)
        image = store.image(image_id)
        tags: tuple[str, ...] = image.repo_tags
        try:
            ref = str(Reference.parse(name))
            if store.tags().get(ref) == image_id:
                tags = (ref,)
        except ImageError:
            pass
        for s in out:
            if s.image.id == image_id:
                out[out.index(s)] = Selected(image, tuple(dict.fromkeys(s.tags + tags)), s.name)
                break
        else:
            out.append(Selected(image, tags, name))
    return out


def save(store: Store, names: list[str], output: str, fmt: str = "docker") -> list[Selected]:
    if fmt not in FORMATS:
        raise ImageError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    sel = select(store, names)
    out = os.path.abspath(output)
    as_dir = fmt == "oci" and not out.endswith(".tar")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise ImageError(f"{output}: directory {parent} does not exist")
    if os.path.isdir(out) and not os.path.islink(out):
        if not as_dir or os.listdir(out):
            raise ImageError(f"{output}: is a directory" + (" and not empty" if as_dir else ""))
    elif os.path.lexists(out) and as_dir:
        raise ImageError(f"{output}: exists and is not a directory")
    tmp = os.path.join(parent, f".{os.path.basename(out)}.unionfs-{uuid.uuid4().hex[:12]}")
    try:
        sink = DirSink(tmp) if as_dir else TarSink(tmp)
        try:
            WRITERS[fmt](store, sel, sink)
        finally:
            sink.close()
        if as_dir and os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except OSError as e:
        _remove(tmp)
        raise ImageError(f"{output}: {e.strerror or e}") from None
    except BaseException:
        _remove(tmp)
        raise
    return sel


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)
