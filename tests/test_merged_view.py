"""The merged view through real mounts, compared with kernel overlayfs (the oracle)."""
from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from helpers import as_user, diff_snapshots, overlay_mount, snapshot
from stacks import build_rich_stack, write


def _ko_options(fmt: str) -> str:
    return "userxattr" if fmt == "userxattr" else ""


@pytest.mark.parametrize("fmt", ["chardev", "xattr", "userxattr"])
def test_same_tree_as_kernel_overlayfs(tmp_path, layers, union_mount, fmt):
    top, mid, bottom = layers(3)
    build_rich_stack(top, mid, bottom, fmt)
    ko = tmp_path / "ko"
    ko.mkdir()
    m = union_mount([top, mid, bottom])
    ours = snapshot(m.mnt)
    with overlay_mount(ko, [top, mid, bottom], extra=_ko_options(fmt)):
        theirs = snapshot(ko, skip_unstatable=True)
        # Inode numbers and directory link counts match the kernel's too (same filesystem: real st_ino).
        for rel in ours:
            if rel.startswith("<"):
                continue
            a, b = os.lstat(m.mnt / rel), os.lstat(ko / rel)
            assert (a.st_ino, a.st_nlink) == (b.st_ino, b.st_nlink), rel
    assert diff_snapshots(ours, theirs) == []
    # A few facts that must hold whatever the oracle says.
    assert (m.mnt / "etc/passwd").read_bytes() == b"root:x:0:0\nuser:x:1000:1000\n"
    assert sorted(os.listdir(m.mnt / "opq")) == ["new1", "new2"]
    assert sorted(os.listdir(m.mnt / "gonedir")) == ["recreated"]
    assert not (m.mnt / "etc/group").exists()
    assert os.listxattr(m.mnt / "usr/lib/liba") == ([] if fmt == "userxattr" else ["trusted.overlay.foo"])


@pytest.mark.parametrize("fmt", ["oci", "fuseoverlayfs"])
def test_oci_forms_equal_overlay_forms(tmp_path, layers, union_mount, fmt):
    """The kernel cannot read `.wh.` files: compare with the same stack written in its format."""
    a = layers(3, "oci")
    b = layers(3, "ovl")
    build_rich_stack(*a, fmt)
    build_rich_stack(*b, "chardev")
    ko = tmp_path / "ko"
    ko.mkdir()
    m = union_mount(a)
    ours = snapshot(m.mnt)
    with overlay_mount(ko, b):
        theirs = snapshot(ko, skip_unstatable=True)
    assert diff_snapshots(ours, theirs) == []
    for dirpath, dirnames, filenames in os.walk(m.mnt):
        assert not [n for n in dirnames + filenames if n.startswith(".wh.")]


def test_whiteouts_never_listed(layers, union_mount):
    """Kernel overlayfs lists a whiteout in a directory that is not merged; we never do."""
    top, bottom = layers(2)
    write(top, "only-top/keep", b"k")
    os.mknod(top / "only-top/wh", 0o600 | stat.S_IFCHR, 0)
    (top / "only-top/.wh.other").touch()
    m = union_mount([top, bottom])
    assert os.listdir(m.mnt / "only-top") == ["keep"]
    assert not os.path.lexists(m.mnt / "only-top/wh")


def test_every_file_type_and_attributes(layers, union_mount):
    top, bottom = layers(2)
    build_rich_stack(top, bottom, layers(1, "unused")[0], "chardev")
    m = union_mount([top, bottom])
    kinds = {n: stat.S_IFMT(os.lstat(m.mnt / n).st_mode) for n in os.listdir(m.mnt)}
    assert kinds["new"] == stat.S_IFDIR
    for name in os.listdir(top):
        real = os.lstat(top / name)
        if stat.S_ISCHR(real.st_mode) and real.st_rdev == 0:
            continue
        seen = os.lstat(m.mnt / name)
        assert stat.S_IFMT(seen.st_mode) == stat.S_IFMT(real.st_mode), name
    assert os.readlink(m.mnt / "new/rel") == "../etc/hosts"
    assert os.statvfs(m.mnt).f_namemax == 255


def test_hard_links_are_one_inode(layers, union_mount):
    top, bottom = layers(2)
    write(bottom, "a", b"x")
    os.link(bottom / "a", bottom / "b")
    os.makedirs(bottom / "d")
    os.link(bottom / "a", bottom / "d/c")
    m = union_mount([top, bottom])
    sts = [os.lstat(m.mnt / p) for p in ("a", "b", "d/c")]
    assert len({s.st_ino for s in sts}) == 1
    assert all(s.st_nlink == 3 for s in sts)
    # d_ino from readdir equals st_ino from stat
    for entry in os.scandir(m.mnt):
        assert entry.inode() == os.lstat(entry.path).st_ino, entry.name


def test_inodes_stable_after_forget(layers, union_mount):
    top, bottom = layers(2)
    for i in range(200):
        write(bottom, f"d{i % 10}/f{i}", b"x")
    m = union_mount([top, bottom])
    before = {p: os.lstat(m.mnt / p).st_ino for p in (f"d{i % 10}/f{i}" for i in range(200))}
    subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=True)
    after = {p: os.lstat(m.mnt / p).st_ino for p in before}
    assert before == after
    assert len(set(before.values())) == 200


def test_empty_and_opaque_root(layers, union_mount):
    top, bottom = layers(2)
    write(bottom, "below", b"b")
    write(top, "above", b"a")
    os.setxattr(top, "trusted.overlay.opaque", b"y")
    m = union_mount([top, bottom])
    assert os.listdir(m.mnt) == ["above"]


def test_readonly_without_upper(layers, union_mount):
    top, bottom = layers(2)
    write(bottom, "f", b"data")
    m = union_mount([top, bottom])
    import errno
    for op in (lambda: open(m.mnt / "f", "ab"), lambda: open(m.mnt / "new", "w"),
               lambda: os.mkdir(m.mnt / "d"), lambda: os.unlink(m.mnt / "f"),
               lambda: os.chmod(m.mnt / "f", 0o600), lambda: os.setxattr(m.mnt / "f", "user.x", b"1"),
               lambda: os.rename(m.mnt / "f", m.mnt / "g"), lambda: os.symlink("x", m.mnt / "l")):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EROFS
    assert (m.mnt / "f").read_bytes() == b"data"


# --- readdir --------------------------------------------------------------------

class _Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.POINTER(_Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]
    return libc


def test_seekdir_telldir_stable(layers, union_mount):
    top, mid, bottom = layers(3)
    for i in range(3000):
        write([top, mid, bottom][i % 3], f"d/n{i:05d}", b"")
    write(top, "d/n00001", b"dup")  # also in mid: listed once
    m = union_mount([top, mid, bottom])
    libc = _libc()
    d = libc.opendir(str(m.mnt / "d").encode())
    names, positions = [], []
    while True:
        positions.append(libc.telldir(d))
        ent = libc.readdir(d)
        if not ent:
            break
        names.append(ent.contents.d_name)
        if len(names) % 97 == 0:
            os.lstat(m.mnt / "d" / names[-1].decode())  # lookups interleaved with readdir
    assert len(names) == len(set(names)) == 3002  # with . and ..
    for k in (2500, 10, 1999, 1):
        libc.seekdir(d, positions[k])
        ent = libc.readdir(d)
        assert ent.contents.d_name == names[k]
    libc.closedir(d)


def test_big_directory(layers, union_mount):
    top, bottom = layers(2)
    n = 100_000
    os.makedirs(bottom / "big")
    fd = os.open(bottom / "big", os.O_RDONLY)
    for i in range(n):
        os.close(os.open(f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    os.close(fd)
    for i in range(0, n, 10):  # every tenth name whited out above
        os.makedirs(top / "big", exist_ok=True)
        (top / "big" / f".wh.f{i}").touch()
    m = union_mount([top, bottom])
    names = os.listdir(m.mnt / "big")
    assert len(names) == n - n // 10
    assert "f0" not in names and "f1" in names
    assert os.lstat(m.mnt / "big/f99999").st_size == 0


def test_acls_enforced_like_kernel_overlayfs(tmp_path, layers, union_mount):
    for p in (tmp_path, *tmp_path.parents):  # pytest's temp dirs are private: let uid 1000 through
        if p == Path("/tmp") or p == Path("/"):
            break
        os.chmod(p, 0o755)
    top, bottom = layers(2)
    write(bottom, "acl-file", b"for uid 1000 by ACL", 0o600)
    write(bottom, "plain-file", b"nobody else", 0o600)
    subprocess.run(["setfacl", "-m", "u:1000:r", str(bottom / "acl-file")], check=True)
    m = union_mount([top, bottom], options=["allow_other"])
    ko = tmp_path / "ko"
    ko.mkdir()
    read = lambda p: open(p, "rb").read()  # noqa: E731
    with overlay_mount(ko, [top, bottom]):
        for name in ("acl-file", "plain-file"):
            want = as_user(1000, read, ko / name)
            assert as_user(1000, read, m.mnt / name) == want, name
        assert as_user(1000, read, m.mnt / "acl-file") == 0
        assert as_user(1000, read, m.mnt / "plain-file") == errno.EACCES
        acl = subprocess.run(["getfacl", "-cn", str(m.mnt / "acl-file")], capture_output=True, text=True).stdout
        assert acl == subprocess.run(["getfacl", "-cn", str(ko / "acl-file")], capture_output=True, text=True).stdout
        assert "user:1000:r--" in acl
