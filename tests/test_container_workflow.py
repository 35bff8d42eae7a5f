"""Containers through real mounts: create, ps, mount, rm, diff and commit, each checked against real trees."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tarfile

import pytest

from helpers import diff_snapshots, force_unmount, is_mounted, snapshot, unionfs_cmd
from unionfs.image.report import human_size
from image_archives import Img, d, docker_save_legacy, f, hard, layer_tar, sym

BASE = layer_tar([
    d("etc"), f("etc/os-release", b"ID=base\n"), f("etc/shared", b"base"), f("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    d("usr/bin"), f("usr/bin/tool", b"#!/bin/sh\n", 0o755), f("usr/bin/suid", b"s", 0o4755),
    d("usr/lib"), f("usr/lib/liba.so", b"a" * 5000), hard("usr/lib/liba.so.1", "usr/lib/liba.so"),
    sym("usr/lib/link.so", "liba.so.1"),
    d("srv/app/conf"), f("srv/app/conf/a.conf", b"a=1"), f("srv/app/main", b"main", uid=1000, gid=1000),
    d("srv/app/data"), f("srv/app/data/x", b"x"),
    d("var/cache"), f("var/cache/one", b"1"), d("var/cache/sub"), f("var/cache/sub/two", b"2"),
    d("home/user", 0o700, uid=1000, gid=1000), f("home/user/notes", b"mine", 0o600, uid=1000, gid=1000,
                                                    pax={"SCHILY.xattr.user.tag": "lower"}),
    f("file2dir", b"was a file"), d("dir2file"), f("dir2file/inner", b"inner"),
])
APP = layer_tar([f("etc/os-release", b"ID=app\n"), f("app", b"app", 0o700)])


def run(store, *args, timeout=120, input=None):
    return subprocess.run(unionfs_cmd("--root", str(store), *args), capture_output=True, text=True, timeout=timeout,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL)


def ok(store, *args, **kw):
    r = run(store, *args, **kw)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


@pytest.fixture
def store(tmp_path):
    """A store holding app:1 (two layers); every mount below tmp_path is undone at the end."""
    root = tmp_path / "store"
    archive = tmp_path / "app.tar"
    docker_save_legacy(archive, [Img([BASE, APP], ["app:1"])])
    ok(root, "load", str(archive))
    yield root
    with open("/proc/self/mountinfo") as fh:
        mps = [line.split()[4] for line in fh if str(tmp_path) in line.split()[4]]
    for mp in mps:
        subprocess.run(unionfs_cmd("umount", mp), capture_output=True, timeout=30)
        if is_mounted(mp):
            force_unmount(mp)


def mkdirs(tmp_path, *names):
    out = []
    for n in names:
        p = tmp_path / n
        p.mkdir()
        out.append(p)
    return out


def ps_rows(store):
    lines = ok(store, "ps", "--no-trunc").splitlines()
    header = lines[0]
    cols = [header.index(h) for h in ("CONTAINER ID", "IMAGE", "CREATED", "MOUNTED", "SIZE", "NAMES")]
    rows = {}
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(cols, cols[1:] + [None])]
        rows[cells[5]] = cells
    return rows


def test_create_ps_mount_two_containers_rm(store, tmp_path):
    a_id = ok(store, "create", "app:1", "--name", "a").strip()
    b_id = ok(store, "create", "app:1", "--name", "b").strip()
    assert len(a_id) == 64 and a_id != b_id
    r = run(store, "create", "app:1", "--name", "a")
    assert r.returncode == 2 and "already in use" in r.stderr and "Traceback" not in r.stderr
    for bad, msg in [(["create", "nope:1"], "no such image"), (["create", "app:1", "--name", "a/b"], "invalid"),
                     (["rm", "nope"], "no such container"), (["diff", "nope"], "no such container")]:
        r = run(store, *bad)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.splitlines()) == 1, (bad, r.stderr)
    rows = ps_rows(store)
    assert set(rows) == {"a", "b"} and rows["a"][0] == a_id and rows["a"][1] == "app:1" and rows["a"][3] == "-"
    assert rows["a"][4].startswith("0B (virtual ")

    ma, mb = mkdirs(tmp_path, "ma", "mb")
    ok(store, "mount", "a", str(ma))
    ok(store, "mount", b_id[:10], str(mb))            # by id prefix
    r = run(store, "mount", "a", str(tmp_path))
    assert r.returncode == 2 and "already mounted" in r.stderr
    (ma / "only-a").write_bytes(b"A" * 3000)
    os.unlink(mb / "etc/shared")
    assert not (mb / "only-a").exists() and (ma / "etc/shared").read_bytes() == b"base"
    assert (ma / "etc/os-release").read_text() == "ID=app\n"
    rows = ps_rows(store)
    assert rows["a"][3] == str(ma) and rows["b"][3] == str(mb)
    assert rows["a"][4] == f"3kB (virtual {human_size(3000 + len(BASE) + len(APP))})"
    assert rows["b"][4] == f"0B (virtual {human_size(len(BASE) + len(APP))})"
    # the two containers share the image's layers: one copy of each in the store
    assert len(os.listdir(store / "layers")) == 2

    r = run(store, "rm", "a")
    assert r.returncode == 2 and "mounted on" in r.stderr and "--force" in r.stderr
    assert (store / "containers" / a_id / "upper/only-a").exists()     # refused: nothing lost
    r = run(store, "rmi", "app:1")
    assert r.returncode == 2 and "in use by container" in r.stderr
    ok(store, "umount", "b")                           # umount by container name
    assert not is_mounted(mb) and ps_rows(store)["b"][3] == "-"
    ok(store, "rm", "--force", "a")
    assert not is_mounted(ma) and not (store / "containers" / a_id).exists()
    ok(store, "mount", "b", str(mb))                   # b's changes survived its unmount
    assert not (mb / "etc/shared").exists()
    ok(store, "umount", str(mb))
    ok(store, "rm", "b")
    assert ok(store, "ps", "-q") == "\n" and os.listdir(store / "containers") == []
    ok(store, "rmi", "app:1")


def change_everything(m):
    """Delete, replace and rename lower files and dirs; add files of every kind."""
    os.unlink(m / "etc/shared")                                   # D file
    shutil.rmtree(m / "var/cache/sub")                            # D dir
    (m / "etc/os-release").write_text("ID=changed\n")             # C (copy-up, data)
    os.chmod(m / "usr/bin/tool", 0o700)                           # C (metadata only)
    os.setxattr(m / "home/user/notes", "user.tag", b"upper")      # C (xattr)
    os.rename(m / "srv/app", m / "srv/renamed")                   # a lower dir renamed (redirect)
    (m / "srv/renamed/conf/b.conf").write_text("b=2")             # ... and changed inside
    os.unlink(m / "srv/renamed/data/x")
    os.rename(m / "etc/passwd", m / "etc/passwd-")                # a lower file renamed
    os.unlink(m / "file2dir")                                     # file -> dir
    os.mkdir(m / "file2dir")
    (m / "file2dir/new").write_text("new")
    shutil.rmtree(m / "dir2file")                                 # dir -> file
    (m / "dir2file").write_text("now a file")
    with open(m / "usr/lib/liba.so", "ab") as fh:                 # a hard-linked lower file, copied up once
        fh.write(b"!")
    os.mkdir(m / "new")                                           # A: dirs, files, links, fifo, xattrs
    (m / "new/f").write_bytes(b"\x00\x01" * 1000)
    os.link(m / "new/f", m / "new/f-link")
    os.symlink("../etc/os-release", m / "new/rel-link")
    os.mkfifo(m / "new/fifo")
    os.chown(m / "new/f", 1234, 5678)
    os.setxattr(m / "new/f", "user.binary", b"\xff\x00\xfe")
    os.chmod(m / "new/f", 0o2751)
    os.mkdir(m / "var/cache/sub")                                 # recreated where a dir was deleted: opaque
    (m / "var/cache/sub/three").write_text("3")


EXPECTED_DIFF = """\
C /dir2file
C /etc
C /etc/os-release
D /etc/passwd
A /etc/passwd-
D /etc/shared
C /file2dir
A /file2dir/new
C /home
C /home/user
C /home/user/notes
A /new
A /new/f
A /new/f-link
A /new/fifo
A /new/rel-link
C /srv
D /srv/app
A /srv/renamed
A /srv/renamed/conf
A /srv/renamed/conf/a.conf
A /srv/renamed/conf/b.conf
A /srv/renamed/data
A /srv/renamed/main
C /usr
C /usr/bin
C /usr/bin/tool
C /usr/lib
C /usr/lib/liba.so
C /usr/lib/liba.so.1
C /var
C /var/cache
C /var/cache/sub
A /var/cache/sub/three
D /var/cache/sub/two
"""


def test_diff_mounted_and_not(store, tmp_path):
    ok(store, "create", "app:1", "--name", "c")
    (m,) = mkdirs(tmp_path, "m")
    ok(store, "mount", "c", str(m))
    change_everything(m)
    mounted = ok(store, "diff", "c")
    ok(store, "umount", str(m))
    unmounted = ok(store, "diff", "c")
    assert mounted == unmounted
    assert unmounted == EXPECTED_DIFF
    ok(store, "create", "app:1", "--name", "empty")
    assert ok(store, "diff", "empty") == ""


def test_commit_mounts_back_identical(store, tmp_path):
    ok(store, "create", "app:1", "--name", "c")
    m, back, again = mkdirs(tmp_path, "m", "back", "again")
    ok(store, "mount", "c", str(m))
    change_everything(m)
    view = snapshot(m)
    image_mounted = ok(store, "commit", "c", "app:mounted").strip()   # read through the mount
    ok(store, "umount", str(m))
    image_id = ok(store, "commit", "c", "app:2", "-m", "everything", "--author", "T <t@example.com>").strip()
    info = json.loads(ok(store, "inspect", "app:2"))[0]
    info_m = json.loads(ok(store, "inspect", "app:mounted"))[0]
    assert info["Id"] == image_id and len(info["RootFS"]["Layers"]) == 3
    # the same changes give the same layer, whether read through FUSE or in-process
    assert info["RootFS"]["Layers"] == info_m["RootFS"]["Layers"]
    assert info["Author"] == "T <t@example.com>" and info["Comment"] == "everything"
    hist = ok(store, "history", "app:2").splitlines()
    assert "everything" in hist[1] and len(hist) == 4

    ok(store, "mount", "app:2", str(back))
    assert diff_snapshots(view, snapshot(back)) == []
    ok(store, "umount", str(back))
    ok(store, "mount", "c", str(again))                     # the container itself is unchanged by commit
    assert diff_snapshots(view, snapshot(again)) == []
    ok(store, "umount", str(again))

    # the layer tar: OCI changeset form, deterministic order, no private xattrs
    diff_id = info["RootFS"]["Layers"][-1]
    with tarfile.open(store / "blobs/sha256" / diff_id[7:]) as tf:
        members = tf.getmembers()
    names = [mb.name for mb in members]
    assert names == sorted(names, key=lambda n: n.split("/"))
    by = {mb.name: mb for mb in members}
    for wh in ("etc/.wh.shared", "etc/.wh.passwd", "srv/.wh.app", "srv/renamed/.wh..wh..opq",
               "var/cache/sub/.wh..wh..opq", "file2dir/.wh..wh..opq"):
        assert wh in by and by[wh].isreg() and by[wh].size == 0, wh
    assert "var/cache/sub/.wh.two" not in by          # hidden by the opaque marker already
    assert by["new/f-link"].islnk() and by["new/f-link"].linkname == "new/f"
    assert by["usr/lib/liba.so.1"].islnk() and by["usr/lib/liba.so.1"].linkname == "usr/lib/liba.so"
    assert by["new/f"].mode == 0o2751 and (by["new/f"].uid, by["new/f"].gid) == (1234, 5678)
    assert by["new/f"].pax_headers["SCHILY.xattr.user.binary"].encode("utf-8", "surrogateescape") == b"\xff\x00\xfe"
    assert by["new/fifo"].isfifo() and by["new/rel-link"].linkname == "../etc/os-release"
    assert by["srv/renamed/conf/a.conf"].isreg()       # a renamed dir carries its whole content
    for mb in members:
        assert not any(k.startswith(("SCHILY.xattr.trusted.overlay", "SCHILY.xattr.trusted.unionfs",
                                     "SCHILY.xattr.user.overlay")) for k in mb.pax_headers), mb.name


def test_commit_changes_and_mistakes(store, tmp_path):
    ok(store, "create", "app:1", "--name", "c")
    before = sorted(os.listdir(store / "images"))
    for args, msg in [(["commit", "c", "Bad:Tag!"], "invalid"), (["commit", "c", "--change", "FROM x"], "unknown instruction"),
                      (["commit", "c", "--change", "EXPOSE http"], "PORT"), (["commit", "nope"], "no such container")]:
        r = run(store, *args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert sorted(os.listdir(store / "images")) == before
    ok(store, "commit", "c", "app:3", "-c", 'CMD ["/app", "--serve"]', "-c", "ENTRYPOINT /bin/run me",
       "-c", 'ENV A=1 B="two words"', "-c", "WORKDIR /srv", "-c", "WORKDIR app", "-c", "USER 1000:1000",
       "-c", "EXPOSE 80 53/udp", "-c", "LABEL org.example=yes", "-c", 'VOLUME ["/data"]')
    cfg = json.loads(ok(store, "inspect", "app:3"))[0]["Config"]
    assert cfg["Cmd"] == ["/app", "--serve"] and cfg["Entrypoint"] == ["/bin/sh", "-c", "/bin/run me"]
    assert cfg["Env"] == ["PATH=/usr/bin:/bin", "A=1", "B=two words"] and cfg["WorkingDir"] == "/srv/app"
    assert cfg["User"] == "1000:1000" and cfg["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}}
    assert cfg["Labels"] == {"org.example": "yes"} and cfg["Volumes"] == {"/data": {}}
    # a commit of a commit: the new image is itself a base
    ok(store, "create", "app:3", "--name", "c3")
    (m,) = mkdirs(tmp_path, "m")
    ok(store, "mount", "c3", str(m))
    (m / "third").write_text("3")
    ok(store, "umount", str(m))
    ok(store, "commit", "c3", "app:4")
    assert len(json.loads(ok(store, "inspect", "app:4"))[0]["RootFS"]["Layers"]) == 4
    assert ok(store, "diff", "c3") == "A /third\n"
