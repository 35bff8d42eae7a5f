"""Opening a union over layer directories: the one way the daemon and the in-process view start.

Owns the checks made before anything is served (the layers open, the mount point
is not one of them, the upper dir takes its lock) and the choice between the
read-only and the writable union.  It must not know FUSE or mount options: the
daemon passes plain paths.
"""
from __future__ import annotations

import os

from ..errors import UsageError
from .layers import LayerError, LayerStack
from .union import Union


def open_union(lower: list[str], upper: str | None = None, work: str | None = None, fsync: bool = True,
               mountpoint: str | None = None, metacopy: bool = False) -> Union:
    """The union of ``lower`` (topmost first) and, with ``upper``, its writable layer; bad paths and
    an upper dir in use raise UsageError and leave nothing open.  ``metacopy``: as overlayfs's
    ``metacopy=on``; refused without root, as the kernel refuses it with ``userxattr``."""
    if metacopy and upper is not None and os.geteuid() != 0:
        raise UsageError("metacopy=on needs root: its marks are trusted.overlay.* xattrs "
                         "(kernel overlayfs refuses metacopy with userxattr too)")
    try:
        stack = LayerStack.open(lower, upper)
    except LayerError as e:
        raise UsageError(str(e)) from None
    if mountpoint is not None and os.path.realpath(mountpoint) in {
            os.path.realpath(p) for p in lower + [upper or ""]}:
        stack.close()
        raise UsageError(f"mount point {mountpoint} is also a layer")
    if upper is None:
        return Union(stack)
    from .upper import prepare_upper
    from .writable import WritableUnion
    try:
        lock = prepare_upper(stack, work)   # refuses an upper dir a mount is using
    except BaseException:
        stack.close()
        raise
    return WritableUnion(stack, lock, fsync=fsync, metacopy=metacopy)
