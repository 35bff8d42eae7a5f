"""Symlinks inside layers are never followed: copy-up, rename, unlink, readdir and writes through a stack
whose layers hold symlinks to an outside dir (as names of dirs, of parents, and over real dirs of lower
layers) leave the outside byte for byte identical, and the view shows the links as links."""
from __future__ import annotations

import errno
import os

import pytest

from helpers import snapshot
from stacks import write


def test_symlinks_in_layers_never_lead_outside(tmp_path, layers, union_mount):
    outside = tmp_path / "outside"
    write(outside, "secret", b"outside data", 0o644)
    write(outside, "sub/deep", b"deep", 0o644)
    top, bottom = layers(2)
    up, wk = layers(2, prefix="rw")
    # bottom: d is a symlink to the outside; real/ a real dir with a file
    os.symlink(str(outside), bottom / "d")
    write(bottom, "real/f", b"lower f")
    write(bottom, "real/sub/g", b"lower g")
    write(bottom, "plain", b"plain")
    # top: a symlink over bottom's real dir 'real' -> outside/sub; and a relative escape
    os.symlink(str(outside / "sub"), top / "real")
    os.symlink("../../outside", top / "rel")
    os.symlink(str(outside / "secret"), top / "filelink")
    # an upper layer that already holds a symlink over a lower real dir
    write(bottom, "was-dir/h", b"h")
    os.symlink(str(outside), up / "was-dir")
    before = snapshot(outside)
    m = union_mount([top, bottom], up, wk).mnt

    assert os.readlink(m / "d") == str(outside) and os.readlink(m / "real") == str(outside / "sub")
    assert os.readlink(m / "was-dir") == str(outside)
    assert sorted(os.listdir(m)) == ["d", "filelink", "plain", "real", "rel", "was-dir"]
    # the lower dir under the link never shows through its name in the union
    with pytest.raises(OSError):
        os.lstat(m / "real" / "f")      # real is a link (to outside/sub) in the view: the kernel follows it
    # the kernel follows links *in the view* to the host path: that is the user's path, not the layer's
    # -- what we check is that unionfs itself never reads or writes through them:
    for name in ("d", "real", "rel", "filelink", "was-dir"):
        os.lchown(m / name, 1234, 1234)                         # copy-up of the link itself
        assert os.lstat(m / name).st_uid == 1234
        os.setxattr(m / name, "trusted.tag", b"x", follow_symlinks=False)
    os.rename(m / "d", m / "d2")                              # rename a link
    os.rename(m / "plain", m / "d")                           # a file onto the old link name
    os.rename(m / "real", m / "real-link")                    # rename the link over a lower real dir
    os.mkdir(m / "real")                                      # the name again: opaque, the lower dir hidden
    assert os.listdir(m / "real") == []
    (m / "real" / "f").write_bytes(b"new")
    os.unlink(m / "was-dir")
    os.mkdir(m / "was-dir")
    (m / "was-dir" / "h").write_bytes(b"mine")
    os.unlink(m / "filelink")
    os.rename(m / "rel", m / "real" / "rel")                  # into a new dir
    with pytest.raises(OSError) as e:
        os.rmdir(m / "d2")
    assert e.value.errno == errno.ENOTDIR
    assert sorted(os.listdir(m)) == ["d", "d2", "real", "real-link", "was-dir"]
    assert (m / "d").read_bytes() == b"plain" and (m / "real" / "f").read_bytes() == b"new"
    assert (m / "was-dir" / "h").read_bytes() == b"mine"
    assert os.readlink(m / "real" / "rel") == "../../outside"
    for root, dirs, files in os.walk(m):                       # readdir and lookup of everything
        for n in dirs + files:
            os.lstat(os.path.join(root, n))
    # nothing outside was read-modified or written; the upper dir holds links, not targets
    assert snapshot(outside) == before
    assert os.lstat(outside / "secret").st_uid == 0 and os.listxattr(outside / "secret") == []
    assert os.path.islink(up / "d2") and os.path.islink(up / "real-link") and not os.path.islink(up / "real")
    assert not os.path.exists(outside / "f") and not os.path.exists(outside / "sub" / "f")
    assert (bottom / "real" / "f").read_bytes() == b"lower f"


def test_copy_up_under_symlinked_parent_in_an_upper_layer(tmp_path, layers, union_mount):
    """A lower file whose parent name is a symlink in the upper dir: the file is hidden (the link wins),
    and writes to the merged path never reach the link's target."""
    outside = tmp_path / "outside"
    write(outside, "f", b"outside f")
    (bottom,) = layers(1)
    up, wk = layers(2, prefix="rw")
    write(bottom, "p/f", b"lower f")
    os.symlink(str(outside), up / "p")
    before = snapshot(outside)
    m = union_mount([bottom], up, wk).mnt
    assert os.path.islink(m / "p")
    assert os.readlink(m / "p") == str(outside)
    os.unlink(m / "p")
    os.mkdir(m / "p")                                       # opaque: bottom's p/f does not show
    assert os.listdir(m / "p") == []
    (m / "p" / "f").write_bytes(b"upper f")
    assert snapshot(outside) == before
    assert (up / "p" / "f").read_bytes() == b"upper f" and not os.path.islink(up / "p")
