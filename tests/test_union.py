"""The union rules in plain Python, no FUSE: formats, resolution, listing, the inode table."""
from __future__ import annotations

import errno
import os
import stat

import pytest

from stacks import opaque, whiteout, write
from unionfs.fs import formats
from unionfs.fs.inodes import InodeTable, Node
from unionfs.fs.layers import LayerError, LayerStack
from unionfs.fs.union import Union


def test_xattr_escaping_round_trip():
    for name in ("trusted.overlay.foo", "user.overlay.bar", "user.plain", "security.capability"):
        assert formats.unescape_xattr(formats.escape_xattr(name)) == name
    assert formats.is_private_xattr("trusted.overlay.opaque")
    assert formats.is_private_xattr("user.fuseoverlayfs.opaque")
    assert not formats.is_private_xattr("trusted.overlay.overlay.opaque")
    assert formats.visible_xattrs(["user.a", "trusted.overlay.origin", "trusted.overlay.overlay.x"]) == \
        ["user.a", "trusted.overlay.x"]


def test_dir_kind():
    assert formats.dir_kind_from_xattrs({}) is formats.DirKind.PLAIN
    assert formats.dir_kind_from_xattrs({"trusted.overlay.opaque": b"y"}) is formats.DirKind.OPAQUE
    assert formats.dir_kind_from_xattrs({"user.overlay.opaque": b"x"}) is formats.DirKind.XWHITEOUTS
    assert formats.dir_kind_from_xattrs({"user.fuseoverlayfs.opaque": b"y"}) is formats.DirKind.OPAQUE


def test_oci_names():
    assert formats.oci_whiteout_target(b".wh.foo") == b"foo"
    assert formats.oci_whiteout_target(formats.WH_OPAQUE) is None
    assert formats.oci_whiteout_target(b"foo") is None
    assert formats.oci_whiteout_name(b"foo") == b".wh.foo"


def _union(*dirs) -> Union:
    return Union(LayerStack.open([str(d) for d in dirs]))


@pytest.mark.parametrize("fmt", ["chardev", "xattr", "userxattr", "oci", "fuseoverlayfs"])
def test_resolution_rules(layers, fmt):
    top, mid, bottom = layers(3)
    write(bottom, "d/a", b"a")
    write(bottom, "d/b", b"b")
    write(mid, "d/c", b"c")
    whiteout(mid, "d/a", fmt)
    write(bottom, "o/old", b"")
    opaque(mid, "o", fmt)
    write(mid, "o/new", b"")
    write(bottom, "x/inner", b"")
    write(top, "x", b"file over dir")
    u = _union(top, mid, bottom)
    d = u.lookup(u.root, b"d")
    assert d.layers == (1, 2)
    assert sorted(u.list_names(d)) == [b"b", b"c"]
    with pytest.raises(FileNotFoundError):
        u.lookup(d, b"a")
    o = u.lookup(u.root, b"o")
    assert o.layers == (1,)
    assert u.list_names(o) == [b"new"]
    x = u.lookup(u.root, b"x")
    assert stat.S_ISREG(x.mode) and x.layers == (0,)
    with pytest.raises(NotADirectoryError):
        u.lookup(x, b"inner")
    with pytest.raises(FileNotFoundError):
        u.lookup(u.root, b".wh.anything")
    u.close()


def test_oci_whiteout_and_file_in_same_layer(layers):
    """OCI: a whiteout hides only lower layers; the same layer's own entry stays."""
    top, bottom = layers(2)
    write(bottom, "f", b"bottom")
    write(top, "f", b"top")
    (top / ".wh.f").touch()
    write(bottom, "g/x", b"")
    write(top, "g/y", b"")
    (top / ".wh.g").touch()
    u = _union(top, bottom)
    assert u.lookup(u.root, b"f").layers == (0,)
    g = u.lookup(u.root, b"g")
    assert g.layers == (0,) and u.list_names(g) == [b"y"]
    u.close()


def test_symlink_never_followed(layers, tmp_path):
    """A symlinked directory in an upper layer over a real one below: the symlink wins, nothing below shows."""
    outside = tmp_path / "outside"
    write(outside, "secret", b"host file")
    top, bottom = layers(2)
    write(bottom, "d/inner", b"")
    os.symlink(str(outside), top / "d")
    os.symlink("../../../../../../..", top / "up")
    u = _union(top, bottom)
    d = u.lookup(u.root, b"d")
    assert stat.S_ISLNK(d.mode)
    with pytest.raises(NotADirectoryError):
        u.lookup(d, b"secret")
    with pytest.raises(OSError) as e:
        u.list_names(d)
    assert e.value.errno == errno.ENOTDIR
    assert u.readlink(d) == str(outside).encode()
    u.close()


def test_layer_errors(tmp_path):
    f = tmp_path / "file"
    f.touch()
    with pytest.raises(LayerError, match="no such directory"):
        LayerStack.open([str(tmp_path / "missing")])
    with pytest.raises(LayerError, match="not a directory"):
        LayerStack.open([str(f)])
    with pytest.raises(LayerError, match="same directory"):
        LayerStack.open([str(tmp_path), str(tmp_path / ".")])


def test_inode_table_counts():
    t = InodeTable([1])
    root = Node(1, None, b"", (0,), stat.S_IFDIR)
    t.add_root(root)
    d = t.remember(Node(10, root, b"d", (0,), stat.S_IFDIR))
    f = t.remember(Node(11, d, b"f", (0,), stat.S_IFREG))
    t.lookup(d)
    t.lookup(f, 2)
    t.forget(10, 1)
    assert t.find(10) is d  # still the parent of a known child
    t.forget(11, 2)
    assert t.find(11) is None and t.find(10) is None and len(t) == 1
    assert t.ino_for(1, 5) == 5
    assert t.ino_for(2, 5) != 5 and t.ino_for(2, 5) == t.ino_for(2, 5)
    assert t.ino_for(1, 1) != 1  # never the root's number
