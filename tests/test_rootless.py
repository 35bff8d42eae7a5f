"""Rootless: every command as an ordinary user (no capabilities), through fusermount3.

The user is made by the test setup (:mod:`rootless_env`); ``/dev/fuse`` is 0666 for the session,
as on a normal system. What the user does is compared with what kernel overlayfs, mounted by root,
does for the same user.
"""
from __future__ import annotations

import json
import os
import sys
import shutil
import stat
from pathlib import Path

import pytest

from difftest import build_lower
from helpers import diff_snapshots, overlay_mount, snapshot
from rootless_env import User, UserMount, chown_tree, rootless_user, user_dir

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = int(os.environ.get("UNIONFS_ROOTLESS_SEEDS", "8"))
STEPS = int(os.environ.get("UNIONFS_DIFF_STEPS", "120"))
# Rootless kernel overlayfs: userxattr (which refuses redirect_dir=on); mounted here by root, used by the user.
KO_OPTS = "userxattr,index=on"


@pytest.fixture(scope="module")
def user():
    with rootless_user() as u:
        yield u


@pytest.fixture
def ubase(user, tmp_path):
    """A scratch dir of the user's (tmp_path is not searchable by it); every mount below it goes at the end."""
    base = user_dir(user, user.runtime.parent, tmp_path.name)
    mounts: list[UserMount] = []
    yield base, mounts
    errors = []
    for m in mounts:
        m.stop()
        errors += m.log_errors()

    shutil.rmtree(base, ignore_errors=True)
    assert not errors, "daemon logged errors:\n" + "\n".join(errors)


def _mount(user: User, mounts: list, base: Path, name: str, lower, upper=None, work=None) -> UserMount:
    mnt = user_dir(user, base, name)
    m = UserMount(user, mnt, list(lower), upper, work, log=base / f"{name}.log")
    mounts.append(m)
    return m.start()


def _rootless_lower(user: User, base: Path) -> tuple[Path, Path, list[str]]:
    """The differential test's two lower layers, owned by the user, opaque dir in user.overlay.*."""
    top, bottom = user_dir(user, base, "top"), user_dir(user, base, "bottom")
    initial = build_lower(top, bottom)
    os.removexattr(top / "opq", "trusted.overlay.opaque")
    os.setxattr(top / "opq", "user.overlay.opaque", b"y")
    chown_tree(top, user.uid, user.gid)
    chown_tree(bottom, user.uid, user.gid)
    return top, bottom, initial


def _unsnap(raw: dict) -> dict:
    return {k: eval(v) for k, v in raw.items()}  # noqa: S307 - our own repr, from our own child


def _without_unionfs_xattrs(snap: dict) -> dict:
    out = {}
    for k, rec in snap.items():
        if k.startswith("<"):
            out[k] = rec
            continue
        *head, xattrs = rec
        out[k] = (*head, {n: v for n, v in xattrs.items() if not n.startswith(("user.unionfs.", "trusted.unionfs."))})
    return out


def _linked_symlinks_apart(snap: dict) -> dict:
    """Rootless kernel overlayfs numbers the names of a linked, copied-up symlink apart (no user.*
    xattr on a symlink keeps its origin); we keep them one inode, as the upper dir has them."""
    out = dict(snap)
    out["<hardlinks>"] = [g for g in snap["<hardlinks>"] if not all(stat.S_ISLNK(snap[n][0]) for n in g)]
    return out


def test_reported_failures_fixed(user, ubase):
    """The issue's session: rm of a lower file, mv of a lower dir, ls: as the user, all work."""
    base, mounts = ubase
    l1, l2, up, wk = (user_dir(user, base, n) for n in ("l1", "l2", "up", "wk"))
    user.python("import os, sys; os.makedirs(sys.argv[1] + '/d'); open(sys.argv[1] + '/a', 'w').write('a');"
                "open(sys.argv[1] + '/d/f', 'w').write('f')", str(l2))
    mnt = user_dir(user, base, "mnt")
    user.unionfs("mount", "-o", f"lowerdir={l1}:{l2},upperdir={up},workdir={wk}", str(mnt))
    try:
        user.run(["rm", str(mnt / "a")])
        user.run(["mv", str(mnt / "d"), str(mnt / "d2")])
        ls = user.run(["ls", "-A", str(mnt)]).stdout.decode().split()
        assert ls == ["d2"]
        assert user.run(["cat", str(mnt / "d2/f")]).stdout == b"f"
        # On disk: what kernel overlayfs reads in userxattr mode.
        assert os.getxattr(up / "a", "user.overlay.whiteout") is not None
        assert os.stat(up / "a").st_size == 0
        assert os.getxattr(up, "user.overlay.opaque") == b"x"
        assert os.getxattr(up / "d2", "user.overlay.redirect") == b"/d"
        assert not [n for n in os.listxattr(up / "d2") if n.startswith("trusted.")]
        # Pidfile below XDG_RUNTIME_DIR.
        assert list((user.runtime / "unionfs").iterdir())
    finally:
        user.unionfs("umount", str(mnt), check=False)
    assert not os.path.ismount(mnt)
    # The kernel in userxattr mode over our upper dir: the whiteout hides, the redirect it refuses
    # to follow (rootless kernel overlayfs has no redirect_dir).
    ko, kw = user_dir(user, base, "ko"), user_dir(user, base, "kw")
    with overlay_mount(ko, [l1, l2], up, kw, "userxattr"):
        assert os.listdir(ko) == []     # a and d whited out; d2 dropped, as its lookup fails:
        with pytest.raises(PermissionError):
            os.stat(ko / "d2")


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_operations_match_kernel_rootless(user, ubase, seed):
    """The writable differential test, as the user: our rootless mount against kernel overlayfs
    (userxattr, mounted by root) under the same operations by the same user."""
    base, mounts = ubase
    top, bottom, initial = _rootless_lower(user, base)
    up_k, wk_k, up_u, wk_u = (user_dir(user, base, n) for n in ("up_k", "wk_k", "up_u", "wk_u"))
    ko = user_dir(user, base, "ko")
    with overlay_mount(ko, [top, bottom], up_k, wk_k, KO_OPTS):
        m = _mount(user, mounts, base, "mnt", [top, bottom], up_u, wk_u)
        out = json.loads(user.run([sys.executable, os.path.join(HERE, "rootless_diff.py"), str(m.mnt), str(ko),
                                   str(seed), str(STEPS), json.dumps(initial)],
                                  cwd=HERE, timeout=300).stdout)
        assert out["mismatch"] is None, out["mismatch"]
        theirs, ours = _linked_symlinks_apart(_unsnap(out["kernel"])), _linked_symlinks_apart(_unsnap(out["ours"]))
        assert diff_snapshots(ours, theirs) == []
        m.stop()
    # Remounted by the user: the same tree.
    m2 = _mount(user, mounts, base, "mnt2", [top, bottom], up_u, wk_u)
    again = _unsnap(json.loads(user.python(
        "import json, sys; from rootless_diff import snapshot_as_user;"
        "print(json.dumps(snapshot_as_user(sys.argv[1])))", str(m2.mnt)).stdout))
    assert diff_snapshots(_linked_symlinks_apart(again), theirs) == [], "after remount"
    m2.stop()
    if out["exdev"] == 0:
        # No directory rename, so no redirect: the rootless kernel reads our upper dir as we do.
        ko2 = user_dir(user, base, "ko2")
        with overlay_mount(ko2, [top, bottom], up_u, wk_u, KO_OPTS):
            over_ours = _linked_symlinks_apart(_without_unionfs_xattrs(snapshot(ko2, skip_unstatable=True)))
        assert diff_snapshots(over_ours, theirs) == [], "kernel overlayfs (userxattr) over our upper dir"
    # Nothing privileged was written: no device whiteouts, no trusted.* xattrs.
    for dirpath, dirnames, filenames in os.walk(up_u):
        for n in [dirpath] + [os.path.join(dirpath, x) for x in dirnames + filenames]:
            assert not [x for x in os.listxattr(n, follow_symlinks=False) if x.startswith("trusted.")], n
            st = os.lstat(n)
            assert not (st.st_mode & 0o170000 == 0o020000 and st.st_rdev == 0) or n == str(up_u / "gone"), n
