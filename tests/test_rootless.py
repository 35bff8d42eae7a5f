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

from difftest import build_lower, without_private_xattrs
from helpers import diff_snapshots, overlay_mount, program_mount, snapshot
from rootless_env import User, UserMount, chown_tree, edited, rootless_user, user_allow_other, user_dir
from test_image_interop import _w

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
            over_ours = _linked_symlinks_apart(without_private_xattrs(snapshot(ko2, skip_unstatable=True)))
        assert diff_snapshots(over_ours, theirs) == [], "kernel overlayfs (userxattr) over our upper dir"
    # Nothing privileged was written: no device whiteouts, no trusted.* xattrs.
    for dirpath, dirnames, filenames in os.walk(up_u):
        for n in [dirpath] + [os.path.join(dirpath, x) for x in dirnames + filenames]:
            assert not [x for x in os.listxattr(n, follow_symlinks=False) if x.startswith("trusted.")], n
            st = os.lstat(n)
            assert not (st.st_mode & 0o170000 == 0o020000 and st.st_rdev == 0) or n == str(up_u / "gone"), n


def test_missing_pieces_get_one_line(user, ubase):
    """What an unprivileged mount cannot do without is named in one line, exit status 2."""
    base, mounts = ubase
    lower, mnt = user_dir(user, base, "l"), user_dir(user, base, "mnt")
    os.chmod("/dev/fuse", 0o600)
    try:
        r = user.unionfs("mount", "--lower", str(lower), str(mnt), check=False)
    finally:
        os.chmod("/dev/fuse", 0o666)
    assert r.returncode == 2
    err = r.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "/dev/fuse" in err, err
    assert not os.path.ismount(mnt)


def _umoci_layout(base: Path, fill) -> Path:
    """An OCI layout made by umoci (as root) with one layer: ``fill(rootfs)`` makes its tree."""
    import subprocess
    layout, bundle = base / "oci", base / "bundle"
    sh = lambda *a: subprocess.run(a, check=True, capture_output=True, timeout=120)  # noqa: E731
    sh("umoci", "init", "--layout", str(layout))
    sh("umoci", "new", "--image", f"{layout}:app")
    sh("umoci", "unpack", "--image", f"{layout}:app", str(bundle))
    fill(bundle / "rootfs")
    sh("umoci", "repack", "--image", f"{layout}:app", str(bundle))
    shutil.rmtree(bundle)
    chown_tree(layout, 0, 0)
    for dirpath, dirnames, filenames in os.walk(layout):
        os.chmod(dirpath, 0o755)
        for n in filenames:
            os.chmod(os.path.join(dirpath, n), 0o644)
    return layout


def _write_files(root: Path, files) -> None:
    for rel, data, mode, owner in files:
        _w(root, rel, data, mode, owner)


def _umoci_image(base: Path) -> Path:
    """An OCI layout made by umoci (as root): files of several owners, setuid, a deleted-later dir."""
    def fill(root: Path) -> None:
        _write_files(root, [("etc/motd", b"hi\n", 0o644, (0, 0)), ("bin/su", b"su", 0o4755, (0, 0)),
                            ("home/app/notes", b"app", 0o600, (1000, 1000)),
                            ("var/www/index.html", b"www", 0o640, (33, 33)),
                            ("old/a", b"a", 0o644, (0, 0)), ("old/b/c", b"c", 0o644, (0, 0))])
        os.chown(root / "home/app", 1000, 1000)
    return _umoci_layout(base, fill)


def _user_snapshot(user: User, root: Path) -> dict:
    return _unsnap(json.loads(user.python(
        "import json, sys; from rootless_diff import snapshot_as_user;"
        "print(json.dumps(snapshot_as_user(sys.argv[1])))", str(root)).stdout))


def _mounted_view(user: User, base: Path, what: str, name: str, change: str | None = None) -> dict:
    """Mount ``what`` (an image or a container) as the user, run the shell command ``change`` in the
    mount, and snapshot it as the user sees it."""
    mnt = user_dir(user, base, name)
    user.unionfs("mount", what, str(mnt))
    try:
        if change:
            user.run(["sh", "-c", f"cd {mnt} && {change}"])
        return _user_snapshot(user, mnt)
    finally:
        user.unionfs("umount", str(mnt))


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is needed (scripts/setup --test)")
def test_image_and_container_workflow_as_user(user, ubase, tmp_path):
    """load, images, inspect, history, tag, mount, create, mount the container, change it, diff,
    commit, save, rmi: all as the user; the save loads as root with the same tree."""
    import subprocess
    base, mounts = ubase
    layout = _umoci_image(base)
    u = user.unionfs
    assert b"Loaded image: app:1" in u("load", str(layout), "--tag", "app:1").stdout
    assert b"app" in u("images").stdout
    assert json.loads(u("inspect", "app:1").stdout)[0]["RepoTags"] == ["app:1"]
    assert b"umoci" in u("history", "app:1").stdout or u("history", "app:1").returncode == 0
    u("tag", "app:1", "app:2")
    store = user.data / "unionfs"
    assert store.is_dir() and store.stat().st_uid == user.uid      # the store is the user's, by default
    view = _mounted_view(user, base, "app:1", "img")
    assert view["bin/su"][1] == 0o4755 and view["home/app/notes"][1] == 0o600
    cid = u("create", "--name", "c1", "app:1").stdout.decode().strip()
    assert b"c1" in u("ps", "-a").stdout
    changed = _mounted_view(user, base, "c1", "ctr", change=(
        "echo new > etc/new && echo more >> etc/motd && rm -r old && mv home/app home/app2"
        " && mkdir -p srv && echo s > srv/s && chmod 0700 srv"))
    diff = u("diff", "c1").stdout.decode().split("\n")
    for line in ("A /etc/new", "C /etc/motd", "D /old", "A /srv"):
        assert line in diff, diff
    u("commit", "c1", "app:changed")
    out = base / "save.tar"
    u("save", "--output", str(out), "app:changed")
    assert len(cid) == 64
    # As root, into a store of root's: the same tree, owners included (the user's store records them).
    rstore = tmp_path / "rootstore"
    from helpers import unionfs_cmd
    subprocess.run(unionfs_cmd("--root", str(rstore), "load", str(out)), check=True, capture_output=True, timeout=120)
    rmnt = tmp_path / "rmnt"
    rmnt.mkdir()
    subprocess.run(unionfs_cmd("--root", str(rstore), "mount", "app:changed", str(rmnt)), check=True,
                   capture_output=True, timeout=60)
    try:
        as_root = snapshot(rmnt)
    finally:
        subprocess.run(unionfs_cmd("umount", str(rmnt)), capture_output=True, timeout=60)
    assert diff_snapshots(as_root, changed) == []
    assert as_root["var/www/index.html"][2:4] == (33, 33)
    assert as_root["bin/su"][1:4] == (0o4755, 0, 0)
    u("rm", "c1")
    u("rmi", "app:2")
    assert b"app:2" not in u("images").stdout


def test_push_and_pull_as_user(user, ubase, tmp_path):
    """push from the user's store to a registry, pull as the user into another store and as root:
    the same tree, owners included, the manifest digest unchanged."""
    import subprocess

    from helpers import unionfs_cmd
    from registry_server import Registry, have_registry
    if not have_registry() or shutil.which("umoci") is None:
        pytest.skip("docker-registry and umoci are needed (scripts/setup --test)")
    base, mounts = ubase
    u = user.unionfs
    u("load", str(_umoci_image(base)), "--tag", "app:1")
    with Registry(tmp_path / "registry") as reg:
        ref = f"{reg.host}/team/app:v1"
        pushed = u("push", "app:1", ref, "--insecure").stdout.decode().strip().splitlines()[-1]
        digest = pushed.split("digest: ")[1].split()[0]
        store2 = user_dir(user, base, "store2")
        assert f"Digest: {digest}" in u("--root", str(store2), "pull", ref, "--insecure").stdout.decode()
        rstore = tmp_path / "rootstore"
        subprocess.run(unionfs_cmd("--root", str(rstore), "pull", ref, "--insecure"), check=True,
                       capture_output=True, timeout=120)
    views = []
    for args in ([], ["--root", str(store2)]):
        mnt = user_dir(user, base, f"m{len(views)}")
        u(*args, "mount", "app:1" if not args else ref, str(mnt))
        try:
            views.append(_user_snapshot(user, mnt))
        finally:
            u("umount", str(mnt))
    rmnt = tmp_path / "rmnt"
    rmnt.mkdir()
    subprocess.run(unionfs_cmd("--root", str(rstore), "mount", ref, str(rmnt)), check=True, capture_output=True,
                   timeout=60)
    try:
        as_root = snapshot(rmnt)
    finally:
        subprocess.run(unionfs_cmd("umount", str(rmnt)), capture_output=True, timeout=60)
    assert diff_snapshots(views[0], views[1]) == []
    assert diff_snapshots(as_root, views[0]) == []
    assert as_root["home/app/notes"][1:4] == (0o600, 1000, 1000)   # the pushed layer kept the image's owners


@pytest.mark.skipif(shutil.which("crun") is None, reason="crun is needed (scripts/setup --test)")
def test_run_as_user(user, ubase):
    """run with crun in a user namespace whose root is the user: the store's files are root's inside,
    the container writes its own layer; another image user gets one line."""
    from container_images import busybox_image
    base, mounts = ubase
    archive = base / "bb.tar"
    busybox_image(archive, "bb:1")
    os.chmod(archive, 0o644)
    user.unionfs("load", str(archive))
    r = user.unionfs("run", "--name", "r1", "--user", "0", "bb:1", "sh", "-c",
                     "id -u; id -g; echo hi > /x; cat /x; stat -c %u:%g /bin/busybox", timeout=120)
    assert r.stdout.decode().split() == ["0", "0", "hi", "0:0"], r
    assert "A /x" in user.unionfs("diff", "r1").stdout.decode().splitlines()
    user.unionfs("rm", "r1")
    r = user.unionfs("run", "--rm", "bb:1", "true", check=False, timeout=120)   # the image's User is app
    err = r.stderr.decode().strip()
    assert r.returncode != 0 and len(err.splitlines()) == 1 and "--user 0" in err, err
    # build: a RUN step (through run) and a COPY, as the user.
    ctx = user_dir(user, base, "ctx")
    (ctx / "Dockerfile").write_text("FROM bb:1\nUSER 0\nRUN echo hi > /f && mkdir /d\nCOPY a /d/a\n")
    (ctx / "a").write_text("A\n")
    chown_tree(ctx, user.uid, user.gid)
    user.unionfs("build", "-t", "b:1", str(ctx), timeout=300)
    assert user.unionfs("run", "--rm", "b:1", "cat", "/f", "/d/a").stdout == b"hi\nA\n"


@pytest.mark.skipif(shutil.which("crun") is None or shutil.which("newuidmap") is None,
                    reason="crun and newuidmap are needed (scripts/setup --test)")
def test_run_other_users_with_subordinate_ids(user, ubase, tmp_path):
    """With subordinate ids (newuidmap) and user_allow_other, a rootless container runs as the image's
    user and as any uid, owners as the image has them, permissions checked: as in root's run.
    Without them, one line naming what is missing."""
    import subprocess

    from container_images import busybox_image
    from helpers import unionfs_cmd
    base, mounts = ubase
    archive = base / "bb.tar"
    busybox_image(archive, "sub:1")
    os.chmod(archive, 0o644)
    user.unionfs("load", str(archive))
    rstore = tmp_path / "rootstore"
    subprocess.run(unionfs_cmd("--root", str(rstore), "load", str(archive)), check=True, capture_output=True,
                   timeout=120)
    script = ("id -u; id -g; id -G; stat -c %u:%g:%a /home/app /etc/passwd /tmp; echo x > /home/app/f && "
              "stat -c %u:%g /home/app/f; (echo y > /etc/x) 2>/dev/null || echo denied; ls /root 2>/dev/null || "
              "echo closed")
    for args in ([], ["-u", "33:33"]):   # the image's User is app (1000)
        r = user.unionfs("run", "--rm", *args, "sub:1", "sh", "-c", script, check=False, timeout=120)
        err = r.stderr.decode().strip()
        assert r.returncode != 0 and len(err.splitlines()) == 1 and "user_allow_other" in err, err
    with user_allow_other():
        for args, uid in (([], "1000"), (["-u", "33:33"], "33"), (["-u", "0"], "0")):
            ours = user.unionfs("run", "--rm", *args, "sub:1", "sh", "-c", script, timeout=120).stdout.decode()
            theirs = subprocess.run(unionfs_cmd("--root", str(rstore), "run", "--rm", *args, "sub:1", "sh", "-c",
                                                script), capture_output=True, timeout=120).stdout.decode()
            assert ours == theirs, (args, ours, theirs)
            assert ours.split()[0] == uid and "1000:1000:755" in ours, ours
        with edited("/etc/subuid", lambda text: "".join(line + "\n" for line in text.splitlines()
                                                        if not line.startswith(user.name + ":"))):
            r = user.unionfs("run", "--rm", "-u", "33", "sub:1", "true", check=False, timeout=120)
            err = r.stderr.decode().strip()
            assert r.returncode != 0 and len(err.splitlines()) == 1, err
            assert f"no subordinate ids for {user.name} in /etc/subuid" in err, err


def _umoci_owners_image(base: Path) -> Path:
    """An OCI layout made by umoci (as root) whose layer has what a user cannot make: files of several
    owners, setuid/setgid/sticky, a read-only file, hard links, a char and a block device, a fifo."""
    def fill(root: Path) -> None:
        for rel, mode, owner in [("tmp", 0o1777, (0, 0)), ("var/www", 0o750, (33, 33)),
                                 ("home/app", 0o700, (1000, 1000)), ("srv/shared", 0o2775, (0, 50))]:
            (root / rel).mkdir(parents=True, exist_ok=True)
            os.chown(root / rel, *owner)
            os.chmod(root / rel, mode)
        _write_files(root, [("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644, (0, 0)),
                            ("bin/su", b"su", 0o4755, (0, 0)), ("usr/bin/wall", b"wall", 0o2755, (0, 5)),
                            ("opt/ro", b"ro", 0o444, (0, 0)), ("home/app/notes", b"app", 0o600, (1000, 1000)),
                            ("var/www/index.html", b"www", 0o640, (33, 33))])
        os.link(root / "bin/su", root / "bin/su2")
        os.symlink("notes", root / "home/app/link")
        (root / "dev").mkdir(exist_ok=True)
        (root / "run").mkdir(exist_ok=True)
        for rel, kind, perm, dev, owner in [("dev/null", stat.S_IFCHR, 0o666, os.makedev(1, 3), (0, 0)),
                                            ("dev/sda", stat.S_IFBLK, 0o660, os.makedev(8, 0), (0, 6)),
                                            ("run/fifo", stat.S_IFIFO, 0o620, 0, (0, 5))]:
            os.mknod(root / rel, kind | perm, dev)
            os.chown(root / rel, *owner)
            os.chmod(root / rel, perm)
    return _umoci_layout(base, fill)


def _root_snapshot(store: Path, image: str, mnt: Path) -> dict:
    import subprocess

    from helpers import unionfs_cmd
    mnt.mkdir(exist_ok=True)
    subprocess.run(unionfs_cmd("--root", str(store), "mount", image, str(mnt)), check=True, capture_output=True,
                   timeout=60)
    try:
        return snapshot(mnt)
    finally:
        subprocess.run(unionfs_cmd("umount", str(mnt)), capture_output=True, timeout=60)


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is needed (scripts/setup --test)")
def test_owners_modes_devices_as_user(user, ubase, tmp_path):
    """A user's store keeps the image's owners, modes and devices in user.containers.override_stat:
    the user's mount shows every entry as root's mount of the same image does; the user, root of
    the container, changes owners and modes of lower and new files; commit and save carry them, and
    the save loads as root with the same tree."""
    import subprocess

    from helpers import unionfs_cmd
    base, mounts = ubase
    layout = _umoci_owners_image(base)
    u = user.unionfs
    u("load", str(layout), "--tag", "own:1")
    rstore = tmp_path / "rootstore"
    subprocess.run(unionfs_cmd("--root", str(rstore), "load", str(layout), "--tag", "own:1"), check=True,
                   capture_output=True, timeout=120)
    as_root = _root_snapshot(rstore, "own:1", tmp_path / "r1")
    assert as_root["dev/null"][:6] == (stat.S_IFCHR, 0o666, 0, 0, 0, os.makedev(1, 3))
    as_user = _mounted_view(user, base, "own:1", "img")
    assert diff_snapshots(as_root, as_user) == []
    # fuse-overlayfs (xattr_permissions=2, as podman's force_mask runs it) reads the user's store alike:
    # owners and modes of files and directories (version 1.10 predates the device form of the record).
    lower = json.loads(u("inspect", "own:1").stdout)[0]["GraphDriver"]["Data"]["LowerDir"]
    fo = tmp_path / "fo"
    for d in ("up", "work", "mnt"):
        (fo / d).mkdir(parents=True)
    with program_mount("fuse-overlayfs", f"lowerdir={lower},upperdir={fo / 'up'},workdir={fo / 'work'},"
                       "xattr_permissions=2", fo / "mnt"):
        theirs = snapshot(fo / "mnt")
    checked = [rel for rel, v in as_root.items() if not rel.startswith("<") and v[0] in (stat.S_IFREG, stat.S_IFDIR)]
    assert len(checked) > 10 and all(theirs[rel][:4] == as_root[rel][:4] for rel in checked), \
        [(rel, theirs[rel][:4], as_root[rel][:4]) for rel in checked if theirs[rel][:4] != as_root[rel][:4]]

    cid = u("create", "--name", "o1", "own:1").stdout.decode().strip()
    changed = _mounted_view(user, base, "o1", "ctr", change=(
        "chown 33:33 etc/passwd && echo x >> opt/ro && chmod 4711 opt/ro"
        " && echo new > etc/new && mkdir -m 2750 srv/d && chown 1000:33 srv/d && echo s > srv/shared/s"
        " && chown 0:0 home/app/notes && echo more >> var/www/index.html && mkfifo -m 0600 run/f2"
        " && chmod 0640 dev/null && rm bin/su2 && ln -s passwd etc/link && ln -s s srv/shared/l"))
    assert changed["etc/passwd"][1:4] == (0o644, 33, 33) and changed["opt/ro"][1:4] == (0o4711, 0, 0)
    assert changed["etc/new"][1:4] == (0o644, 0, 0) and changed["srv/d"][1:4] == (0o2750, 1000, 33)
    assert changed["srv/shared/s"][2:4] == (0, 50)   # the setgid dir's group, recorded
    assert changed["etc/link"][:4] == (stat.S_IFLNK, 0o777, 0, 0)
    assert changed["var/www/index.html"][1:4] == (0o640, 33, 33)   # copied up, owners kept
    assert changed["dev/null"][:6] == (stat.S_IFCHR, 0o640, 0, 0, 0, os.makedev(1, 3))
    # On disk, the user's own files with containers/storage's record (what fuse-overlayfs reads).
    up = user.data / "unionfs/containers" / cid / "upper"
    assert (up / "etc/passwd").stat().st_uid == user.uid
    assert os.getxattr(up / "etc/passwd", "user.containers.override_stat") == b"33:33:0644:file"
    assert os.getxattr(up / "run/f2", "user.containers.override_stat") == b"0:0:0600:pipe"
    u("commit", "o1", "own:2")
    out = base / "save.tar"
    u("save", "--output", str(out), "own:2")
    subprocess.run(unionfs_cmd("--root", str(rstore), "load", str(out)), check=True, capture_output=True, timeout=120)
    assert diff_snapshots(_root_snapshot(rstore, "own:2", tmp_path / "r2"), changed) == []
    u("rm", "o1")
