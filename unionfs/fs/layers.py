"""The layer stack: the real directories under the merged view, and fds into them.

Layers are indexed topmost first, as on the overlayfs command line; when there
is an upper (writable) layer it is index 0.  Directory fds are opened relative
to their parent's fd, one name at a time with ``O_NOFOLLOW``, and kept in a
bounded LRU cache keyed by (layer, inode number): a walk reuses its parents'
fds, and an fd stays right across renames because it names the directory, not
its path.

It must not interpret what is in a layer (whiteouts, xattrs): that is :mod:`union`.
"""
from __future__ import annotations

import errno
import os
from collections import OrderedDict
from dataclasses import dataclass, field

from . import sys as ovl
from .inodes import Node


class LayerError(Exception):
    """A layer cannot be used; the message is for the user."""


def open_directory(path: str, what: str) -> int:
    """Open a directory the user named (a layer, the work dir), or say in one line why not."""
    try:
        return os.open(path, ovl.O_DIR & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        raise LayerError(f"{what} {path}: no such directory") from None
    except NotADirectoryError:
        raise LayerError(f"{what} {path}: not a directory") from None
    except OSError as e:
        raise LayerError(f"{what} {path}: {e.strerror}") from None


@dataclass
class Layer:
    index: int
    path: str
    fd: int
    dev: int
    writable: bool = False
    # OCI `.wh.` names are whiteouts in this layer (extracted images, fuse-overlayfs uppers).
    oci_whiteouts: bool = True

    def __repr__(self) -> str:
        return f"Layer({self.index}, {self.path!r}{', upper' if self.writable else ''})"


@dataclass
class LayerStack:
    layers: list[Layer]
    max_fds: int = 2048
    _fds: "OrderedDict[tuple[int, int], int]" = field(default_factory=OrderedDict)

    @classmethod
    def open(cls, lower: list[str], upper: str | None = None) -> "LayerStack":
        """Open the layer roots; ``lower`` is topmost first."""
        paths = ([upper] if upper else []) + list(lower)
        if not lower and not upper:
            raise LayerError("no layers given")
        layers: list[Layer] = []
        seen: dict[tuple[int, int], str] = {}
        try:
            for i, p in enumerate(paths):
                fd = open_directory(p, "layer")
                st = os.fstat(fd)
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    os.close(fd)
                    raise LayerError(f"layer {p}: same directory as {seen[key]}")
                seen[key] = p
                layers.append(Layer(i, p, fd, st.st_dev, writable=(upper is not None and i == 0)))
        except BaseException:
            for layer in layers:
                os.close(layer.fd)
            raise
        return cls(layers)

    @property
    def upper(self) -> Layer | None:
        return self.layers[0] if self.layers and self.layers[0].writable else None

    def is_upper(self, index: int) -> bool:
        return index == 0 and self.layers[0].writable

    @property
    def devs(self) -> list[int]:
        out: list[int] = []
        for layer in self.layers:
            if layer.dev not in out:
                out.append(layer.dev)
        return out

    def dir_fd(self, index: int, node: Node) -> int:
        """An fd of directory ``node`` in layer ``index`` (borrowed: do not close)."""
        if node.parent is None:
            return self.layers[index].fd
        key = (index, node.ino)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        where = node.where(index)
        # Listing leaves the real dir's atime alone: overlayfs opens real dirs O_NOATIME too.
        if where[:1] == b"/":
            fd = ovl.open_beneath(self.layers[index].fd, where[1:], noatime=True)
        else:
            fd = ovl.open_dir_at(self.dir_fd(index, node.parent), where, noatime=True)
        self._remember(key, fd)
        return fd

    def path_fd(self, index: int, relpath: bytes) -> int:
        """An fd of directory ``relpath`` in layer ``index`` (borrowed; cached by path)."""
        if not relpath:
            return self.layers[index].fd
        key = (index, relpath)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        fd = ovl.open_beneath(self.layers[index].fd, relpath, noatime=True)
        self._remember(key, fd)
        return fd

    def _remember(self, key, fd: int) -> None:
        self._fds[key] = fd
        while len(self._fds) > self.max_fds:
            _, old = self._fds.popitem(last=False)
            os.close(old)

    def parent_fd(self, index: int, node: Node) -> int:
        """An fd of the directory holding ``node`` in layer ``index``."""
        if node.parent is None:
            raise OSError(errno.EINVAL, "the root has no parent")
        return self.dir_fd(index, node.parent)

    def forget_fd(self, ino: int) -> None:
        """Drop cached fds of a directory that went away or moved under a redirect."""
        for key in [k for k in self._fds if k[1] == ino or isinstance(k[1], bytes)]:
            os.close(self._fds.pop(key))

    def fds(self) -> set[int]:
        return {layer.fd for layer in self.layers} | set(self._fds.values())

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for layer in self.layers:
            os.close(layer.fd)
