"""The writable layer, bullet by bullet, through real mounts."""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import subprocess

import pytest

from helpers import UnionMount, is_mounted, unionfs_cmd
from stacks import write


@pytest.fixture
def rw(tmp_path, union_mount):
    """A lower layer, an empty upper and work dir; ``rw.mount()`` mounts (again) over them."""
    class RW:
        lower = tmp_path / "lower"
        upper = tmp_path / "upper"
        work = tmp_path / "work"

        def mount(self):
            return union_mount([self.lower], self.upper, self.work)
    r = RW()
    for d in (r.lower, r.upper, r.work):
        d.mkdir()
    return r


def test_fifo_copy_up_keeps_the_type(rw):
    os.mkfifo(rw.lower / "fifo", 0o644)
    m = rw.mount()
    os.chmod(m.mnt / "fifo", 0o600)
    assert stat.S_ISFIFO(os.lstat(m.mnt / "fifo").st_mode)
    assert stat.S_ISFIFO(os.lstat(rw.upper / "fifo").st_mode)
    m.stop()
    m = rw.mount()
    st = os.lstat(m.mnt / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_setgid_directory_copy_up(rw):
    os.makedirs(rw.lower / "shared")
    os.chown(rw.lower / "shared", 0, 100)
    os.chmod(rw.lower / "shared", 0o2775)
    m = rw.mount()
    (m.mnt / "shared/new").write_text("x")
    os.mkdir(m.mnt / "shared/sub")
    st = os.lstat(rw.upper / "shared")
    assert stat.S_IMODE(st.st_mode) == 0o2775 and st.st_gid == 100
    assert os.lstat(m.mnt / "shared/new").st_gid == 100          # BSD group semantics
    sub = os.lstat(m.mnt / "shared/sub")
    assert sub.st_gid == 100 and sub.st_mode & stat.S_ISGID     # inherited by subdirectories


def test_hard_links_survive_copy_up_and_remount(rw):
    """fuse-overlayfs shows stale or mixed data here after a remount."""
    write(rw.lower, "h1", b"hl\n")
    os.link(rw.lower / "h1", rw.lower / "h2")
    m = rw.mount()
    with open(m.mnt / "h1", "ab") as f:
        f.write(b"y")
    assert (m.mnt / "h2").read_bytes() == b"hl\ny"
    assert os.lstat(m.mnt / "h1").st_ino == os.lstat(m.mnt / "h2").st_ino
    m.stop()
    for first in ("h1", "h2"):  # whichever name is looked up first after a remount
        m = rw.mount()
        assert (m.mnt / first).read_bytes() == b"hl\ny"
        other = "h2" if first == "h1" else "h1"
        assert (m.mnt / other).read_bytes() == b"hl\ny"
        assert os.lstat(m.mnt / "h1").st_nlink == 2
        m.stop()
    assert (rw.lower / "h1").read_bytes() == b"hl\n"  # the lower layer is untouched


def test_unlink_one_hard_link_keeps_the_count(rw):
    write(rw.lower, "a", b"data")
    os.link(rw.lower / "a", rw.lower / "b")
    os.link(rw.lower / "a", rw.lower / "c")
    m = rw.mount()
    os.unlink(m.mnt / "a")
    assert os.lstat(m.mnt / "b").st_nlink == 2
    os.link(m.mnt / "b", m.mnt / "d")
    assert os.lstat(m.mnt / "c").st_nlink == 3
    m.stop()
    m = rw.mount()
    assert sorted(os.listdir(m.mnt)) == ["b", "c", "d"]
    assert {os.lstat(m.mnt / n).st_nlink for n in "bcd"} == {3}


def test_hard_link_names_follow_renames(rw):
    """A copied-up file with two names; one name moves (rename, RENAME_EXCHANGE), the other goes: the
    file is still reached by the moved name (the differential test's seeds 55 and 66 at 200 steps:
    ENOENT or EIO on open, the mount looked for it under the name the rename took away)."""
    write(rw.lower, "a/top", b"top file")
    write(rw.lower, "b/top", b"other file")
    m = rw.mount()
    libc = ctypes.CDLL(None, use_errno=True)
    for d, how in (("a", "exchange"), ("b", "rename")):
        os.link(m.mnt / d / "top", m.mnt / d / "n2")
        if how == "exchange":
            os.symlink("elsewhere", m.mnt / d / "f2")
            assert libc.renameat2(-100, os.fsencode(m.mnt / d / "f2"), -100, os.fsencode(m.mnt / d / "top"),
                                  2) == 0, os.strerror(ctypes.get_errno())   # RENAME_EXCHANGE
        else:
            os.rename(m.mnt / d / "top", m.mnt / d / "f2")
        os.unlink(m.mnt / d / "n2")
        assert (m.mnt / d / "f2").read_bytes() == (b"top file" if d == "a" else b"other file")
        assert os.lstat(m.mnt / d / "f2").st_nlink == 1
    assert os.readlink(m.mnt / "a/top") == "elsewhere" and not os.path.lexists(m.mnt / "b/top")


def test_rename_lower_directory(rw):
    write(rw.lower, "d/inner", b"inside")
    write(rw.lower, "d/sub/deep", b"deep")
    m = rw.mount()
    os.rename(m.mnt / "d", m.mnt / "d2")   # overlayfs without redirect_dir and fuse-overlayfs: EXDEV
    assert sorted(os.listdir(m.mnt)) == ["d2"]
    assert (m.mnt / "d2/sub/deep").read_bytes() == b"deep"
    os.makedirs(m.mnt / "x")
    os.rename(m.mnt / "d2", m.mnt / "x/moved")
    m.stop()
    m = rw.mount()
    assert (m.mnt / "x/moved/inner").read_bytes() == b"inside"
    assert not os.path.lexists(m.mnt / "d")
    # only the directory was copied up, not its tree
    assert os.listdir(rw.upper / "x/moved") == []


def test_inode_numbers_stable_over_copy_up_and_remount(rw):
    write(rw.lower, "f", b"x")
    write(rw.lower, "d/g", b"y")
    m = rw.mount()
    before = {p: os.lstat(m.mnt / p).st_ino for p in ("f", "d", "d/g")}
    with open(m.mnt / "f", "ab") as f:
        f.write(b"1")
    os.chmod(m.mnt / "d/g", 0o600)
    os.rename(m.mnt / "d", m.mnt / "e")
    assert os.lstat(m.mnt / "f").st_ino == before["f"]
    assert os.lstat(m.mnt / "e").st_ino == before["d"]
    assert os.lstat(m.mnt / "e/g").st_ino == before["d/g"]
    m.stop()
    m = rw.mount()
    assert os.lstat(m.mnt / "f").st_ino == before["f"]
    assert os.lstat(m.mnt / "e").st_ino == before["d"]
    assert os.lstat(m.mnt / "e/g").st_ino == before["d/g"]


def test_unlinked_open_file_stays_usable(rw):
    write(rw.lower, "f", b"lower data")
    m = rw.mount()
    fd = os.open(m.mnt / "f", os.O_RDWR)
    try:
        os.unlink(m.mnt / "f")
        assert not os.path.lexists(m.mnt / "f")
        os.pwrite(fd, b"LOWER", 0)
        assert os.pread(fd, 100, 0) == b"LOWER data"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert os.listdir(m.mnt) == []


def test_reused_inode_number_is_a_new_object(rw):
    """The upper filesystem may give a removed directory's number to a new one while the kernel
    still holds the old inode (here: an open fd); the new directory must be a new object."""
    m = rw.mount()
    os.mkdir(m.mnt / "d")
    fd = os.open(m.mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        old = os.fstat(fd).st_ino
        os.rmdir(m.mnt / "d")
        reused = None
        for i in range(100):
            os.mkdir(m.mnt / f"e{i}")
            if os.lstat(m.mnt / f"e{i}").st_ino == old:
                reused = m.mnt / f"e{i}"
                break
        if reused is None:
            pytest.skip("the upper filesystem did not reuse the inode number")
        (reused / "inside").write_text("x")     # the old, removed dir refused this (ENOENT)
        assert os.listdir(reused) == ["inside"]
        with pytest.raises(OSError):
            os.listdir(fd)                        # the removed dir is not the new one
    finally:
        os.close(fd)


def test_open_handles_see_copy_up_through_other_handles(rw):
    write(rw.lower, "f", b"0123456789" * 1000)
    m = rw.mount()
    reader = os.open(m.mnt / "f", os.O_RDONLY)
    mapped_fd = os.open(m.mnt / "f", os.O_RDONLY)
    mapping = mmap.mmap(mapped_fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        assert os.pread(reader, 4, 0) == b"0123"
        with open(m.mnt / "f", "r+b") as w:      # copy-up through another descriptor
            w.seek(5000)
            w.write(b"XYZ")
        assert os.pread(reader, 3, 5000) == b"XYZ"
        # Kernel overlayfs documents that a MAP_SHARED mapping of a lower file misses this.
        assert mapping[5000:5003] == b"XYZ"
    finally:
        mapping.close()
        os.close(mapped_fd)
        os.close(reader)


def test_writable_shared_mmap(rw):
    write(rw.lower, "f", b"a" * 8192)
    m = rw.mount()
    with open(m.mnt / "f", "r+b") as f:
        mp = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED)
        mp[100:105] = b"HELLO"
        mp.flush()
        mp.close()
    assert (m.mnt / "f").read_bytes()[100:105] == b"HELLO"
    m.stop()
    assert (rw.upper / "f").read_bytes()[100:105] == b"HELLO"


def test_o_trunc_copies_no_data(rw):
    with open(rw.lower / "big", "wb") as f:
        f.truncate(64 << 20)
        f.seek(0)
        f.write(b"x" * (1 << 20))
    m = rw.mount()
    with open(m.mnt / "big", "wb") as f:   # O_TRUNC
        f.write(b"new")
    assert (rw.upper / "big").stat().st_size == 3
    assert (rw.lower / "big").stat().st_size == 64 << 20


def test_large_copy_up_is_kernel_side(rw):
    size = 200 << 20
    with open(rw.lower / "big", "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    m = rw.mount()
    with open(m.mnt / "big", "ab") as f:
        f.write(b"!")
    with open(rw.lower / "big", "rb") as a, open(rw.upper / "big", "rb") as b:
        while True:
            x, y = a.read(1 << 22), b.read(1 << 22)
            if not x:
                assert y == b"!"
                break
            assert x == y[:len(x)]
            if len(y) > len(x):
                assert y[len(x):] == b"!"
                break
    rss_kb = int(next(line.split()[1] for line in open(f"/proc/{m.proc.pid}/status") if line.startswith("VmHWM")))
    assert rss_kb < 120_000, f"daemon peak RSS {rss_kb} kB: data went through Python"


def test_xattr_round_trip_and_escape(rw):
    write(rw.lower, "f", b"")
    m = rw.mount()
    subprocess.run(["setfattr", "-n", "user.comment", "-v", "hello", str(m.mnt / "f")], check=True)
    out = subprocess.run(["getfattr", "-n", "user.comment", "--only-values", str(m.mnt / "f")],
                         capture_output=True, check=True).stdout
    assert out == b"hello"
    os.setxattr(m.mnt / "f", "trusted.overlay.opaque", b"y")   # escaped, never a marker
    assert os.getxattr(m.mnt / "f", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(rw.upper / "f", "trusted.overlay.overlay.opaque") == b"y"
    os.removexattr(m.mnt / "f", "user.comment")
    assert "user.comment" not in os.listxattr(m.mnt / "f")
    with pytest.raises(OSError) as e:
        os.removexattr(m.mnt / "f", "user.none")
    assert e.value.errno == errno.ENODATA


def test_fallocate_is_not_supported(rw):
    write(rw.lower, "f", b"x")
    m = rw.mount()
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(m.mnt / "f", os.O_RDWR)
    try:
        r = libc.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(4096))
        assert r == -1 and ctypes.get_errno() == errno.EOPNOTSUPP
    finally:
        os.close(fd)


def test_whiteout_names_reserved(rw):
    m = rw.mount()
    with pytest.raises(OSError) as e:
        open(m.mnt / ".wh.foo", "w")
    assert e.value.errno == errno.EINVAL


def test_rmdir_then_mkdir_is_opaque(rw):
    write(rw.lower, "d/old", b"")
    m = rw.mount()
    os.unlink(m.mnt / "d/old")
    os.rmdir(m.mnt / "d")
    os.mkdir(m.mnt / "d")
    assert os.listdir(m.mnt / "d") == []
    assert os.getxattr(rw.upper / "d", "trusted.overlay.opaque") == b"y"
    assert stat.S_ISDIR(os.lstat(rw.upper / "d").st_mode)


# --- mount-time checks --------------------------------------------------------------------

def _mount_cli(lower, upper, work, mnt):
    return subprocess.run(unionfs_cmd("mount", "--lower", str(lower), "--upper", str(upper), "--work", str(work),
                                      str(mnt)), capture_output=True, text=True, timeout=60)


def test_mount_again_while_the_last_daemon_is_still_exiting(tmp_path, rw):
    """umount(2) returns before the daemon has seen it and let go of the upper dir's lock (under load,
    a while): a mount of the same dirs right after waits for it instead of saying "in use"
    (unionmount-testsuite's rename-mass-5 with --ov=10 remounts so and failed)."""
    import signal
    import time
    (rw.lower / "f").write_text("lower")
    (rw.upper / "g").write_text("upper")
    m = rw.mount()
    # A stat, not a read: the RELEASE after a read is sent in the background, and one still queued
    # when the daemon stops is answered after the unmount (pyfuse3 then logs a failed reply).
    assert (m.mnt / "f").stat().st_size == len("lower")
    os.kill(m.proc.pid, signal.SIGSTOP)    # the old daemon, slow to notice the unmount
    mnt2 = tmp_path / "again"
    mnt2.mkdir()
    try:
        # umount2(2) itself: umount(8) would stat the mount point, which asks the stopped daemon.
        assert ctypes.CDLL(None, use_errno=True).umount2(os.fsencode(m.mnt), 0) == 0, os.strerror(ctypes.get_errno())
        new = subprocess.Popen(unionfs_cmd("mount", "--lower", str(rw.lower), "--upper", str(rw.upper),
                                           "--work", str(rw.work), str(mnt2)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        os.kill(m.proc.pid, signal.SIGCONT)
        out, err = new.communicate(timeout=60)
        assert new.returncode == 0, err
        assert (mnt2 / "f").read_text() == "lower" and (mnt2 / "g").read_text() == "upper"
    finally:
        os.kill(m.proc.pid, signal.SIGCONT)
        if is_mounted(mnt2):
            subprocess.run(unionfs_cmd("umount", str(mnt2)), timeout=60)


def test_work_dir_checks_and_locks(tmp_path, rw):
    mnt, mnt2 = tmp_path / "m1", tmp_path / "m2"
    mnt.mkdir()
    mnt2.mkdir()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "something").touch()
    r = _mount_cli(rw.lower, rw.upper, foreign, mnt)
    assert r.returncode == 2 and "not a unionfs work dir" in r.stderr
    other_fs = tmp_path / "tmpfs"
    other_fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(other_fs)], check=True)
    try:
        r = _mount_cli(rw.lower, rw.upper, other_fs, mnt)
        assert r.returncode == 2 and "same filesystem" in r.stderr
    finally:
        subprocess.run(["umount", str(other_fs)])
    (rw.work / "work").mkdir()
    (rw.work / ".unionfs-work").touch()
    (rw.work / "work" / "#leftover").write_text("half a copy-up")
    assert _mount_cli(rw.lower, rw.upper, rw.work, mnt).returncode == 0
    try:
        assert not (rw.work / "work" / "#leftover").exists()
        work2 = tmp_path / "work2"
        work2.mkdir()
        r = _mount_cli(rw.lower, rw.upper, work2, mnt2)
        assert r.returncode == 2 and "in use by another mount" in r.stderr
        upper2 = tmp_path / "upper2"
        upper2.mkdir()
        r = _mount_cli(rw.lower, upper2, rw.work, mnt2)
        assert r.returncode == 2 and "in use by another mount" in r.stderr
        assert not is_mounted(mnt2)
    finally:
        subprocess.run(unionfs_cmd("umount", str(mnt)), timeout=60)


def test_full_upper_gives_enospc_and_loses_nothing(tmp_path):
    lower, small, mnt = tmp_path / "lower", tmp_path / "small", tmp_path / "mnt"
    for d in (lower, small, mnt):
        d.mkdir()
    write(lower, "big", os.urandom(3 << 20))
    write(lower, "keep", b"keep me")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        (small / "upper").mkdir()
        (small / "work").mkdir()
        with UnionMount(mnt, [lower], small / "upper", small / "work", log=tmp_path / "log"):
            with pytest.raises(OSError) as e:   # copy-up of a 3 MiB file into 2 MiB
                with open(mnt / "big", "ab") as f:
                    f.write(b"x")
            assert e.value.errno == errno.ENOSPC
            assert (mnt / "big").read_bytes() == (lower / "big").read_bytes()
            assert os.listdir(small / "work/work") == []           # nothing half-copied
            with pytest.raises(OSError) as e:
                with open(mnt / "new", "wb") as f:
                    f.write(b"y" * (3 << 20))
                    f.flush()
                    os.fsync(f.fileno())
            assert e.value.errno == errno.ENOSPC
            os.unlink(mnt / "new")
            with open(mnt / "keep", "ab") as f:                     # space is back: works again
                f.write(b"!")
            assert (mnt / "keep").read_bytes() == b"keep me!"
    finally:
        subprocess.run(["umount", "-l", str(small)])
