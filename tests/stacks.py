"""Layer stacks for tests, written in any of the whiteout/opaque formats found in the wild."""
from __future__ import annotations

import os
import socket
from pathlib import Path

FORMATS = ("chardev", "xattr", "userxattr", "oci", "fuseoverlayfs")


def whiteout(layer: Path, rel: str, fmt: str) -> None:
    p = layer / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if fmt in ("chardev", "userxattr"):
        os.mknod(p, 0o600 | 0o020000, os.makedev(0, 0))
    elif fmt == "xattr":
        p.touch()
        os.setxattr(p, "trusted.overlay.whiteout", b"y")
        parent = p.parent
        try:
            cur = os.getxattr(parent, "trusted.overlay.opaque")
        except OSError:
            cur = None
        if cur != b"y":
            os.setxattr(parent, "trusted.overlay.opaque", b"x")
    elif fmt in ("oci", "fuseoverlayfs"):
        (p.parent / (".wh." + p.name)).touch()
    else:
        raise ValueError(fmt)


def opaque(layer: Path, rel: str, fmt: str) -> None:
    p = layer / rel
    p.mkdir(parents=True, exist_ok=True)
    if fmt in ("chardev", "xattr"):
        os.setxattr(p, "trusted.overlay.opaque", b"y")
    elif fmt == "userxattr":
        os.setxattr(p, "user.overlay.opaque", b"y")
    elif fmt == "oci":
        (p / ".wh..wh..opq").touch()
    elif fmt == "fuseoverlayfs":
        os.setxattr(p, "user.fuseoverlayfs.opaque", b"y")
    else:
        raise ValueError(fmt)


def write(layer: Path, rel: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0) -> Path:
    p = layer / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.chmod(p, mode)
    os.chown(p, uid, gid)
    return p


def build_rich_stack(top: Path, mid: Path, bottom: Path, fmt: str) -> None:
    """Three layers exercising merging, hiding, whiteouts, opaque dirs, every file type, links, xattrs."""
    b = bottom
    write(b, "etc/passwd", b"root:x:0:0\n")
    write(b, "etc/group", b"root:x:0:\n")
    write(b, "etc/hosts", b"127.0.0.1 localhost\n")
    os.setxattr(b / "etc/hosts", "user.test", b"bottom")
    write(b, "etc/sub/deep/file", b"deep\n")
    write(b, "usr/bin/tool", b"#!/bin/sh\n", 0o755)
    write(b, "usr/bin/suid", b"suid", 0o4755)
    write(b, "usr/lib/liba", b"a" * 5000)
    write(b, "usr/lib/libb", b"b")
    if fmt != "userxattr":  # in userxattr mode the kernel does not unescape trusted.* names
        os.setxattr(b / "usr/lib/liba", "trusted.overlay.overlay.foo", b"escaped")
    for n in "abc":
        write(b, f"var/log/{n}", n.encode() * 10, uid=1000, gid=1000)
    write(b, "opq/old1", b"old1")
    write(b, "opq/sub/x", b"x")
    write(b, "gone", b"gone")
    write(b, "gonedir/f1", b"f1")
    write(b, "gonedir/sub/f2", b"f2")
    write(b, "hl1", b"hardlinked\n")
    os.link(b / "hl1", b / "hl2")
    os.makedirs(b / "hldir")
    os.link(b / "hl1", b / "hldir/hl3")
    os.mkfifo(b / "fifo")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(b / "sock"))
    s.close()
    os.mknod(b / "chr", 0o666 | 0o020000, os.makedev(1, 3))
    os.mknod(b / "blk", 0o660 | 0o060000, os.makedev(7, 0))
    os.symlink("etc/passwd", b / "sym")
    os.symlink("/etc/passwd", b / "abs")
    write(b, "dir2file/inner", b"inner")
    write(b, "file2dir", b"was a file")
    os.makedirs(b / "private", mode=0o700)
    os.chmod(b / "private", 0o700)
    write(b, "private/secret", b"s", 0o600)
    os.makedirs(b / "sticky")
    os.chmod(b / "sticky", 0o1777)
    os.makedirs(b / "setgid")
    os.chmod(b / "setgid", 0o2775)
    os.chown(b / "setgid", 0, 100)

    m = mid
    write(m, "etc/passwd", b"root:x:0:0\nuser:x:1000:1000\n")
    whiteout(m, "etc/group", fmt)
    opaque(m, "opq", fmt)
    write(m, "opq/new1", b"new1")
    whiteout(m, "gonedir", fmt)
    write(m, "dir2file", b"now a file")
    write(m, "file2dir/inner", b"now a dir")
    write(m, "var/log/d", b"d")
    whiteout(m, "usr/lib/libb", fmt)
    write(m, "etc/sub/mid", b"mid")

    t = top
    write(t, "etc/hosts", b"10.0.0.1 top\n", 0o600)
    os.setxattr(t / "etc/hosts", "user.test", b"top")
    whiteout(t, "var/log/a", fmt)
    whiteout(t, "gone", fmt)
    whiteout(t, "never-existed", fmt)
    write(t, "new/file", b"new")
    write(t, "opq/new2", b"new2")
    write(t, "gonedir/recreated", b"re")  # dir recreated above a whiteout: shows only this
    os.symlink("../etc/hosts", t / "new/rel")
    write(t, "usr/bin/tool", b"#!/bin/sh\necho new\n", 0o755)
