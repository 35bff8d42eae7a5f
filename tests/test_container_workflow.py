"""Containers through real mounts: create, ps, mount, rm, diff and commit, each checked against real trees."""
from __future__ import annotations

import json
import os
import tarfile

from container_images import APP, BASE, change_everything, mkdirs, ok, ps_rows, run, store  # noqa: F401
from helpers import diff_snapshots, is_mounted, snapshot

from unionfs.image.report import human_size


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
    assert set(rows) == {"a", "b"} and rows["a"][0] == a_id and rows["a"][1] == "app:1" and rows["a"][5] == "-"
    assert rows["a"][6].startswith("0B (virtual ")

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
    assert rows["a"][5] == str(ma) and rows["b"][5] == str(mb)
    assert rows["a"][6] == f"3kB (virtual {human_size(3000 + len(BASE) + len(APP))})"
    assert rows["b"][6] == f"0B (virtual {human_size(len(BASE) + len(APP))})"
    # the two containers share the image's layers: one copy of each in the store
    assert len(os.listdir(store / "layers")) == 2

    r = run(store, "rm", "a")
    assert r.returncode == 2 and "mounted on" in r.stderr and "--force" in r.stderr
    assert (store / "containers" / a_id / "upper/only-a").exists()     # refused: nothing lost
    r = run(store, "rmi", "app:1")
    assert r.returncode == 2 and "in use by container" in r.stderr
    ok(store, "umount", "b")                           # umount by container name
    assert not is_mounted(mb) and ps_rows(store)["b"][5] == "-"
    ok(store, "rm", "--force", "a")
    assert not is_mounted(ma) and not (store / "containers" / a_id).exists()
    ok(store, "mount", "b", str(mb))                   # b's changes survived its unmount
    assert not (mb / "etc/shared").exists()
    ok(store, "umount", str(mb))
    ok(store, "rm", "b")
    assert ok(store, "ps", "-aq") == "\n" and os.listdir(store / "containers") == []
    ok(store, "rmi", "app:1")


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
