"""Metadata-only copy-up (``-o metacopy=on``) against kernel overlayfs ``metacopy=on,redirect_dir=on,index=on``.

The same random operations, weighted to chmod/chown/utimes/xattr changes followed by reads, writes,
renames, links and unlinks, on both mounts, every result and the trees compared; then each side's
upper and work dir mounted by the other, and lower layers the kernel wrote with metacopy files in
them read by us.  ``commit`` of a metacopy upper is read back by GNU tar.
"""
from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile

import pytest

from difftest import Generator, build_lower, inode_numbers, kernel_numbers_over, kernel_over
from helpers import diff_snapshots, mkdirs, overlay_mount, snapshot, unionfs_cmd
from test_writable_diff import _run_steps, stacked_rounds

KO_META = "index=on,redirect_dir=on,metacopy=on"
OURS = ["metacopy=on"]
METADATA_OPS = ("chmod", "chown", "utime", "setxattr", "removexattr") * 2 + ("read", "rename", "link")
SEEDS = int(os.environ.get("UNIONFS_METACOPY_SEEDS", "8"))
STEPS = int(os.environ.get("UNIONFS_DIFF_STEPS", "120"))


def _metacopy_files(upper) -> list[str]:
    """Upper (and index) files the kernel would read as metadata only."""
    out = []
    for dirpath, _dirs, files in os.walk(upper):
        for f in files:
            p = os.path.join(dirpath, f)
            if stat.S_ISREG(os.lstat(p).st_mode) and "trusted.overlay.metacopy" in os.listxattr(p, follow_symlinks=False):
                out.append(os.path.relpath(p, upper))
    return out


def _blocks(root) -> dict[str, tuple[int, int]]:
    """(st_size, st_blocks) of every regular file: a metacopy file reports its lower data's blocks."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                out[os.path.relpath(p, root)] = (st.st_size, st.st_blocks)
    return out


def _big_lower(bottom) -> None:
    """A file with data blocks beyond one page, so metacopy's blocks differ from an empty inode's."""
    (bottom / "big").write_bytes(os.urandom(300_000))


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_operations_match_kernel_metacopy(tmp_path, union_mount, seed):
    top, bottom, up_k, wk_k, up_u, wk_u, ko, ko2 = mkdirs(
        tmp_path, "top", "bottom", "up_k", "wk_k", "up_u", "wk_u", "ko", "ko2")
    _big_lower(bottom)
    initial = build_lower(top, bottom)
    gen = Generator(seed, initial, more=METADATA_OPS)
    log: list[str] = []
    with overlay_mount(ko, [top, bottom], up_k, wk_k, KO_META):
        m = union_mount([top, bottom], up_u, wk_u, options=OURS)
        _run_steps(gen, STEPS, ko, m.mnt, log, "")
        theirs = snapshot(ko, skip_unstatable=True)
        assert diff_snapshots(snapshot(m.mnt), theirs) == [], "\n".join(log)
        ours_mc, kernel_mc = _metacopy_files(up_u), _metacopy_files(up_k)
        # A metacopy file reports its data's blocks (other files differ by our xattr's block on ext4).
        both = set(ours_mc) & set(kernel_mc)
        assert {p: v for p, v in _blocks(m.mnt).items() if p in both} == \
            {p: v for p, v in _blocks(ko).items() if p in both}
        m.stop()
    # Lower hard links are copied with their data here (the kernel keeps them metadata only too).
    assert ours_mc or not [p for p in kernel_mc if not p.startswith("..")], (ours_mc, kernel_mc)
    m2 = union_mount([top, bottom], up_u, wk_u, options=OURS)
    assert diff_snapshots(snapshot(m2.mnt), theirs) == [], "after remount"
    m2.stop()
    # Our mount over what the kernel wrote (its metacopy files, indexed ones too), with and without
    # metacopy=on: following metacopy files is always on, as reading them costs nothing.
    for opts in (OURS, []):
        mk = union_mount([top, bottom], up_k, wk_k, options=opts)
        assert diff_snapshots(snapshot(mk.mnt), theirs) == [], f"unionfs {opts} over the kernel's upper"
        mk.stop()
    # Kernel overlayfs with metacopy=on over our upper and work dir: the same tree, the same numbers.
    assert diff_snapshots(kernel_over(ko2, [top, bottom], up_u, wk_u, KO_META), theirs) == [], \
        "kernel overlayfs over our upper and work dir"
    m3 = union_mount([top, bottom], up_u, wk_u, options=OURS)
    ours_ino = inode_numbers(m3.mnt)
    m3.stop()
    kernel_ino = kernel_numbers_over(ko2, [top, bottom], up_u, wk_u, KO_META)
    assert {p: (n, kernel_ino.get(p)) for p, n in ours_ino.items() if n != kernel_ino.get(p)} == {}


def test_writes_after_metadata_changes(tmp_path, union_mount):
    """The data path of one file through every step, read back by the kernel over our upper."""
    lower, up, wk, ko = mkdirs(tmp_path, "lower", "up", "wk", "ko")
    data = os.urandom(1 << 20)
    (lower / "f").write_bytes(data)
    (lower / "d").mkdir()
    m = union_mount([lower], up, wk, options=OURS)
    f = m.mnt / "f"
    with open(f, "rb") as reader:     # open before the copy-up, it keeps reading the same data
        os.chmod(f, 0o600)
        os.chown(f, 1000, 1000)
        os.setxattr(f, "user.x", b"1")
        assert (up / "f").stat().st_blocks < 16 and (up / "f").stat().st_size == len(data)
        assert os.getxattr(up / "f", "trusted.overlay.metacopy") == b""
        assert os.stat(f).st_blocks == os.stat(lower / "f").st_blocks
        os.rename(f, m.mnt / "d/g")
        assert os.getxattr(up / "d/g", "trusted.overlay.redirect") == b"/f"
        os.link(m.mnt / "d/g", m.mnt / "h")
        assert (m.mnt / "h").read_bytes() == data and reader.read() == data
        with open(m.mnt / "h", "r+b") as w:   # the first write: the data comes up, the mark goes
            w.seek(10)
            w.write(b"XY")
        want = data[:10] + b"XY" + data[12:]
        assert "trusted.overlay.metacopy" not in os.listxattr(up / "d/g")
        assert (m.mnt / "d/g").read_bytes() == want
        reader.seek(0)
        assert reader.read() == want  # a reader opened before the copy-up sees the new data
    assert (lower / "f").read_bytes() == data
    st = os.stat(m.mnt / "d/g")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_nlink) == (0o600, 1000, 2)
    m.stop()
    with overlay_mount(ko, [lower], up, wk, KO_META):
        assert (ko / "d/g").read_bytes() == want and (ko / "h").read_bytes() == want
        assert not (ko / "f").exists()


def test_truncate_of_metacopy_file(tmp_path, union_mount):
    lower, up, wk, ko = mkdirs(tmp_path, "lower", "up", "wk", "ko")
    (lower / "a").write_bytes(b"a" * 10000)
    (lower / "b").write_bytes(b"b" * 10000)
    m = union_mount([lower], up, wk, options=OURS)
    for n in ("a", "b"):
        os.chmod(m.mnt / n, 0o640)
    os.truncate(m.mnt / "a", 5)
    with open(m.mnt / "b", "wb") as w:   # O_TRUNC: nothing to copy
        w.write(b"new")
    assert (m.mnt / "a").read_bytes() == b"aaaaa" and (m.mnt / "b").read_bytes() == b"new"
    assert _metacopy_files(up) == []
    m.stop()
    with overlay_mount(ko, [lower], up, wk, KO_META):
        assert (ko / "a").read_bytes() == b"aaaaa" and (ko / "b").read_bytes() == b"new"


def test_kernel_without_metacopy_refuses_a_metacopy_upper(tmp_path, union_mount):
    """Why metacopy is off by default: kernel overlayfs mounted without ``metacopy=on`` (its default)
    refuses to follow a metacopy file, so an upper dir written with it needs every later mount to
    say ``metacopy=on``."""
    lower, up, wk, ko = mkdirs(tmp_path, "lower", "up", "wk", "ko")
    (lower / "f").write_bytes(b"data")
    m = union_mount([lower], up, wk, options=OURS)
    os.chmod(m.mnt / "f", 0o600)
    m.stop()
    with overlay_mount(ko, [lower], up, wk, "index=on,redirect_dir=on"):
        with pytest.raises(PermissionError):   # "refusing to follow metacopy origin"
            (ko / "f").read_bytes()


def test_bad_metacopy_option(tmp_path):
    lower, mnt = mkdirs(tmp_path, "lower", "mnt")
    r = subprocess.run(unionfs_cmd("mount", "--lower", str(lower), "-o", "metacopy=maybe", str(mnt)),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "metacopy" in r.stderr


ROUNDS = 3


@pytest.mark.parametrize("seed", range(3))
def test_stacked_rounds_with_metacopy(tmp_path, union_mount, seed):
    """Each round's upper dir becomes the next round's top lower layer: metacopy files (and their
    redirects) in lower layers, written by the kernel and by us, followed by the other side."""
    top, bottom = mkdirs(tmp_path, "top", "bottom")
    _big_lower(bottom)
    gen = Generator(seed, build_lower(top, bottom, hardlinks=False), dir_moves=0.15, without=("link",),
                    more=METADATA_OPS[:-1])
    stacked_rounds(tmp_path, union_mount, gen, [top, bottom], ROUNDS, 60, KO_META, OURS,
                   "metacopy=on,redirect_dir=follow")


def test_commit_of_a_metacopy_upper_carries_the_lower_data(tmp_path):
    """``diff`` shows a chmod of a lower file as a change, and the committed layer holds the file's
    data (read from below), not the empty upper inode: the kernel writes the upper, GNU tar reads
    the layer."""
    from unionfs.container.changeset import write_changeset
    from unionfs.container.diff import changes
    from unionfs.container.view import UnionView

    lower, up, wk, ko, out = mkdirs(tmp_path, "lower", "up", "wk", "ko", "out")
    data = os.urandom(200_000)
    (lower / "f").write_bytes(data)
    (lower / "g").write_bytes(b"g data")
    (lower / "d").mkdir()
    with overlay_mount(ko, [lower], up, wk, KO_META):
        os.chmod(ko / "f", 0o751)
        os.rename(ko / "g", ko / "d/g2")
    assert sorted(_metacopy_files(up)) == ["d/g2", "f"]
    with UnionView([str(lower)]) as image, UnionView([str(lower)], str(up), str(wk)) as merged:
        ch = changes(str(up), str(wk), image, merged)
        assert ch.lines() == ["C /d", "A /d/g2", "C /f", "D /g"]
        buf = io.BytesIO()
        write_changeset(ch, merged, buf)
    (tmp_path / "layer.tar").write_bytes(buf.getvalue())
    subprocess.run(["tar", "-xf", str(tmp_path / "layer.tar"), "-C", str(out)], check=True, timeout=60)
    assert (out / "f").read_bytes() == data and stat.S_IMODE((out / "f").stat().st_mode) == 0o751
    assert (out / "d/g2").read_bytes() == b"g data"
    with tarfile.open(tmp_path / "layer.tar") as t:
        assert "d/.wh.g" not in t.getnames() and ".wh.g" in t.getnames()


def test_metacopy_refused_rootless(tmp_path):
    """Rootless, metacopy=on is refused in one line (its marks are trusted.* xattrs; the kernel
    refuses metacopy with userxattr too), and nothing is mounted or written."""
    from rootless_env import rootless_user, user_dir
    with rootless_user() as user:
        base = user_dir(user, user.runtime.parent, tmp_path.name)
        lower, up, wk, mnt = (user_dir(user, base, n) for n in ("l", "u", "w", "mnt"))
        r = user.unionfs("mount", "-o", f"lowerdir={lower},upperdir={up},workdir={wk},metacopy=on", str(mnt),
                         check=False)
        err = r.stderr.decode().strip()
        assert r.returncode == 2 and len(err.splitlines()) == 1 and "metacopy" in err, err
        assert not os.path.ismount(mnt) and os.listdir(wk) == [] and os.listdir(up) == []
