"""Loading archives as real tools write them, the OCI whiteout rules, and the image commands."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from helpers import diff_snapshots, is_mounted, overlay_mount, snapshot, unionfs_cmd
from image_archives import Entry, Img, d, docker_save_legacy, f, hard, layer_tar, oci_layout, sha, sym


def run(*args, env=None):
    return subprocess.run(unionfs_cmd(*args), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          env=env)


def load(store, path, *extra):
    r = run("--root", str(store), "load", str(path), *extra)
    assert r.returncode == 0, r.stderr
    return r


def inspect(store, name):
    r = run("--root", str(store), "inspect", name)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)[0]


BASE = layer_tar([d("etc"), f("etc/os-release", b"ID=base\n"), f("etc/shared", b"base"),
                  d("usr/bin"), f("usr/bin/tool", b"#!/bin/sh\n", 0o755)])
APP = layer_tar([f("etc/os-release", b"ID=app\n"), f("app", b"app", 0o700, uid=1000, gid=1000)])
OTHER = layer_tar([f("other", b"other")])


def test_legacy_docker_save_with_symlinked_layers(tmp_path):
    archive = tmp_path / "legacy.tar"
    docker_save_legacy(archive, [Img([BASE, APP], ["app:1"]), Img([BASE, OTHER], ["other:1", "other:latest"])])
    with tarfile.open(archive) as tf:
        assert any(m.issym() and m.name.endswith("layer.tar") for m in tf)   # the shared layer is a symlink
    store = tmp_path / "store"
    r = load(store, archive)
    assert r.stdout.splitlines() == ["Loaded image: app:1", "Loaded image: other:1", "Loaded image: other:latest"]
    assert sorted(os.listdir(store / "layers")) == sorted(sha(x)[7:] for x in (BASE, APP, OTHER))
    a, o = inspect(store, "app:1"), inspect(store, "other")   # the default tag is latest
    assert a["RootFS"]["Layers"] == [sha(BASE), sha(APP)] and o["RootFS"]["Layers"][0] == sha(BASE)
    assert o["RepoTags"] == ["other:1", "other:latest"]
    cfg = Img([BASE, APP], []).config_bytes()
    assert a["Id"] == sha(cfg)  # the id is the digest of the config bytes as stored
    assert (store / "blobs/sha256" / sha(cfg)[7:]).read_bytes() == cfg
    assert a["Created"] == "2024-01-02T03:04:05.123456789Z" and a["Author"] == "tests"
    assert a["Config"]["Cmd"] == ["/bin/sh"] and a["Config"]["Env"] == ["PATH=/usr/bin:/bin"]
    assert a["Size"] == len(BASE) + len(APP)


def test_docker25_form(tmp_path):
    archive = tmp_path / "d25.tar"
    files = oci_layout(None, [Img([BASE, APP], ["app:25"])], tar_path=archive, docker25=True)
    store = tmp_path / "store"
    assert load(store, archive).stdout.strip() == "Loaded image: app:25"
    info = inspect(store, "app:25")
    oci_manifest = [n for n, data in files.items() if b'"application/vnd.oci.image.manifest.v1+json", "config"' in data][0]
    assert info["Metadata"]["ManifestDigest"] == "sha256:" + oci_manifest.rsplit("/", 1)[1]


@pytest.mark.parametrize("compression", ["gzip", "zstd", None])
@pytest.mark.parametrize("as_tar", [False, True])
def test_oci_layout_compressions(tmp_path, compression, as_tar):
    store = tmp_path / "store"
    img = Img([BASE, APP], ["x"], compression=compression)
    if as_tar:
        path = tmp_path / "layout.tar"
        oci_layout(None, [img], tar_path=path)
    else:
        path = tmp_path / "layout"
        oci_layout(path, [img])
    r = load(store, path, "--tag", "comp:" + (compression or "plain"))
    info = inspect(store, "comp:" + (compression or "plain"))
    assert info["RootFS"]["Layers"] == [sha(BASE), sha(APP)]
    assert (store / "layers" / sha(APP)[7:] / "root/etc/os-release").read_bytes() == b"ID=app\n"
    meta = json.loads((store / "layers" / sha(APP)[7:] / "layer.json").read_text())
    assert meta["compression"] == (compression or "plain") and meta["whiteout_style"] == "overlay"
    assert "Loaded image: comp:" in r.stdout


def test_oci_bare_ref_name_needs_a_tag(tmp_path):
    path = tmp_path / "layout"
    oci_layout(path, [Img([BASE], ["v1"])])
    store = tmp_path / "store"
    r = load(store, path)
    assert r.stdout.startswith("Loaded image ID: sha256:") and "--tag" in r.stderr
    assert run("--root", str(store), "images").stdout.splitlines()[1].startswith("<none>")


def test_layer_without_end_of_archive_blocks(tmp_path):
    layer = layer_tar([d("etc"), f("etc/a", b"a" * 600), f("etc/b", b"b")], end_blocks=False)
    assert len(layer) % 512 == 0 and layer[-1024:] != b"\0" * 1024
    archive = tmp_path / "noend.tar"
    docker_save_legacy(archive, [Img([layer], ["noend:1"])])
    store = tmp_path / "store"
    load(store, archive)
    root = store / "layers" / sha(layer)[7:] / "root"
    assert (root / "etc/a").read_bytes() == b"a" * 600 and (root / "etc/b").read_bytes() == b"b"


CAP = "\x01\x00\x00\x02\x00\x20" + "\x00" * 14   # vfs cap v2: cap_net_raw permitted


def test_extraction_keeps_what_a_rootfs_needs(tmp_path):
    layer = layer_tar([
        d("bin", mtime=1_500_000_000),
        f("bin/su", b"su", 0o4755, mtime=1_400_000_000),
        f("bin/wall", b"wall", 0o2755, gid=5),
        d("tmp", 0o1777),
        d("home/u", 0o700, uid=1000, gid=1000),
        f("home/u/f", b"f", 0o640, uid=1000, gid=100, pax={"SCHILY.xattr.user.note": "hi",
                                                          "SCHILY.xattr.security.capability": CAP}),
        f("home/u/ovl", b"o", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}),
        sym("bin/sh", "busybox", uid=7, gid=7),
        hard("bin/su2", "bin/su"),
        Entry("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        Entry("dev/loop0", type=tarfile.BLKTYPE, devmajor=7, devminor=0, mode=0o660, gid=6),
        Entry("run/fifo", type=tarfile.FIFOTYPE, mode=0o620),
        d("ro", 0o555, mtime=1_300_000_000),
        f("ro/inside", b"i"),
    ])
    archive = tmp_path / "rootfs.tar"
    docker_save_legacy(archive, [Img([layer], ["rootfs:1"])])
    store = tmp_path / "store"
    load(store, archive)
    root = store / "layers" / sha(layer)[7:] / "root"

    def st(rel):
        return os.lstat(root / rel)
    assert stat.S_IMODE(st("bin/su").st_mode) == 0o4755 and st("bin/su").st_mtime == 1_400_000_000
    assert stat.S_IMODE(st("bin/wall").st_mode) == 0o2755 and st("bin/wall").st_gid == 5
    assert stat.S_IMODE(st("tmp").st_mode) == 0o1777
    assert (st("home/u").st_uid, stat.S_IMODE(st("home/u").st_mode)) == (1000, 0o700)
    assert (st("home/u/f").st_uid, st("home/u/f").st_gid) == (1000, 100)
    assert os.getxattr(root / "home/u/f", "user.note") == b"hi"
    assert os.getxattr(root / "home/u/f", "security.capability") == CAP.encode()
    # an image's own overlay xattr is escaped, so it is content, not an opaque marker
    assert os.getxattr(root / "home/u/ovl", "trusted.overlay.overlay.opaque") == b"y"
    assert os.readlink(root / "bin/sh") == "busybox" and st("bin/sh").st_uid == 7
    assert st("bin/su2").st_ino == st("bin/su").st_ino and st("bin/su").st_nlink == 2
    assert stat.S_ISCHR(st("dev/null").st_mode) and st("dev/null").st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(st("dev/loop0").st_mode) and stat.S_IMODE(st("dev/loop0").st_mode) == 0o660
    assert stat.S_ISFIFO(st("run/fifo").st_mode) and stat.S_IMODE(st("run/fifo").st_mode) == 0o620
    # directory modes and mtimes are set after their contents
    assert st("bin").st_mtime == 1_500_000_000 and st("ro").st_mtime == 1_300_000_000
    assert stat.S_IMODE(st("ro").st_mode) == 0o555 and (root / "ro/inside").read_bytes() == b"i"


def test_oci_whiteout_rules(tmp_path, union_mount):
    """Opaque markers apply regardless of order; whiteouts hide lower layers only; a same-layer
    directory under a whiteout becomes opaque; checked through our mount and kernel overlayfs."""
    lower = layer_tar([d("opq"), f("opq/old", b"old"), d("dir"), f("dir/old", b"old"), f("file", b"f"),
                       f("keep", b"lower"), d("wd"), f("wd/old", b"old"), f("gone", b"g")])
    upper = layer_tar([
        d("opq"), f("opq/new", b"new"), f("opq/.wh..wh..opq"),     # marker after the layer's own entry
        f(".wh.keep"), f("keep", b"upper"),                          # whiteout + same name in one layer
        f(".wh.wd"), d("wd"), f("wd/new", b"new"),                   # whiteout + same-layer dir
        f(".wh.gone"),
        f("dir/.wh.old"),
    ])
    archive = tmp_path / "wh.tar"
    docker_save_legacy(archive, [Img([lower, upper], ["wh:1"])])
    store = tmp_path / "store"
    load(store, archive)
    layers = [store / "layers" / sha(x)[7:] / "root" for x in (upper, lower)]
    m = union_mount(layers)
    view = {str(p.relative_to(m.mnt)) for p in m.mnt.rglob("*")}
    assert view == {"opq", "opq/new", "dir", "file", "keep", "wd", "wd/new"}
    assert (m.mnt / "keep").read_bytes() == b"upper"
    kmnt = tmp_path / "kmnt"
    kmnt.mkdir()
    with overlay_mount(kmnt, layers):
        assert not diff_snapshots(snapshot(m.mnt), snapshot(kmnt))


def test_already_stored_layers_are_not_extracted_again(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    docker_save_legacy(a, [Img([BASE], ["base:1"])])
    docker_save_legacy(b, [Img([BASE, APP], ["app:1"])])
    store = tmp_path / "store"
    assert "1 extracted, 0 already" in load(store, a).stderr
    marker = store / "layers" / sha(BASE)[7:] / "layer.json"
    before = marker.stat().st_mtime_ns
    assert "1 extracted, 1 already" in load(store, b).stderr
    assert marker.stat().st_mtime_ns == before
    assert "0 extracted, 2 already" in load(store, b).stderr


def test_commands(tmp_path):
    archive = tmp_path / "a.tar"
    hist = [{"created": "2024-01-01T00:00:00Z", "created_by": "ADD base /"},
            {"created": "2024-01-01T00:00:01Z", "created_by": "ENV X=1", "empty_layer": True},
            {"created": "2024-01-01T00:00:02Z", "created_by": "COPY app /", "comment": "the app"}]
    docker_save_legacy(archive, [Img([BASE, APP], ["app:1"], history=hist), Img([BASE, OTHER], ["other:1"])])
    store = tmp_path / "store"
    load(store, archive)
    R = ["--root", str(store)]

    images = run(*R, "images").stdout.splitlines()
    assert images[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    app_id = inspect(store, "app:1")["Id"]
    assert any(line.split()[:3] == ["app", "1", app_id[7:19]] for line in images)

    h = run(*R, "history", "app:1").stdout.splitlines()
    assert len(h) == 4 and "COPY app /" in h[1] and "the app" in h[1] and "<empty>" in h[2] and "ADD base" in h[3]

    # names: repo:tag, full id, unique prefix, sha256: prefix
    for name in (app_id, app_id[7:], app_id[7:15], "sha256:" + app_id[7:15]):
        assert inspect(store, name)["Id"] == app_id

    # tag, with validation
    assert run(*R, "tag", "app:1", "registry.example:5000/team/app:v2.0_rc-1").returncode == 0
    assert "registry.example:5000/team/app:v2.0_rc-1" in inspect(store, app_id)["RepoTags"]
    for bad, why in [("app:bad:tag", "invalid repository name"), ("app:-x", "invalid tag"),
                     ("app:" + "x" * 129, "invalid tag"), ("App:1", "invalid repository name"),
                     ("app:t/x", "invalid"), ("app@sha256:00", "by digest")]:
        r = run(*R, "tag", "app:1", bad)
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.splitlines()) == 1, (bad, r.stderr)
    r = run(*R, "inspect", "nope:1")
    assert r.returncode == 2 and "no such image" in r.stderr

    # rmi: a tag goes first; the image and its own layers go with its last name; shared layers stay
    r = run(*R, "rmi", "registry.example:5000/team/app:v2.0_rc-1")
    assert r.returncode == 0 and r.stdout.strip() == "Untagged: registry.example:5000/team/app:v2.0_rc-1"
    r = run(*R, "rmi", "app:1")
    assert r.returncode == 0 and f"Deleted: {app_id}" in r.stdout
    assert sorted(os.listdir(store / "layers")) == sorted([sha(BASE)[7:], sha(OTHER)[7:]])
    assert not (store / "blobs/sha256" / app_id[7:]).exists()
    r = run(*R, "rmi", "other:1")
    assert r.returncode == 0 and os.listdir(store / "layers") == [] and os.listdir(store / "blobs/sha256") == []


def _app_store_and_mountpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A store with app:1 loaded from a legacy docker archive, and an empty mount point."""
    archive = tmp_path / "a.tar"
    docker_save_legacy(archive, [Img([BASE, APP], ["app:1"])])
    store = tmp_path / "store"
    load(store, archive)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return store, mnt


def test_rmi_refused_while_used(tmp_path):
    store, mnt = _app_store_and_mountpoint(tmp_path)
    R = ["--root", str(store)]
    assert run(*R, "mount", "app:1", str(mnt)).returncode == 0
    try:
        r = run(*R, "rmi", "app:1")
        assert r.returncode == 2 and "mounted" in r.stderr and "unmount first" in r.stderr
    finally:
        assert run("umount", str(mnt)).returncode == 0
    # a container record (a writable layer) holds the image too
    cid = "c" * 64
    (store / "containers" / cid).mkdir()
    (store / "containers" / cid / "container.json").write_text(json.dumps({"Id": cid, "Image": inspect(store, "app:1")["Id"]}))
    r = run(*R, "rmi", "app:1")
    assert r.returncode == 2 and "in use by container" in r.stderr and cid[:12] in r.stderr
    assert inspect(store, "app:1")


def test_mount_by_name(tmp_path):
    store, mnt = _app_store_and_mountpoint(tmp_path)
    env = {**os.environ, "UNIONFS_ROOT": str(store)}   # the environment names the store too
    r = run("mount", "app:1", str(mnt), env=env)
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt / "etc/os-release").read_bytes() == b"ID=app\n"
        assert (mnt / "etc/shared").read_bytes() == b"base"
        with open("/proc/self/mounts") as fh:
            line = next(x for x in fh if x.split()[1] == str(mnt))
        assert line.split()[0] == "app:1" and "ro" in line.split()[3].split(",")
        with pytest.raises(OSError):
            (mnt / "new").write_text("x")
    finally:
        run("umount", str(mnt))
    assert not is_mounted(mnt)
    for args, msg in [(["mount", "nope:1", str(mnt)], "no such image"),
                      (["mount", "app:1", str(tmp_path / "nope")], "no such directory"),
                      (["mount", "--lower", str(tmp_path), "app:1", str(mnt)], "not both"),
                      (["mount", "a", "b", "c"], "[IMAGE] MOUNTPOINT")]:
        r = run("--root", str(store), *args)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr


def test_mount_writable(tmp_path):
    store, mnt = _app_store_and_mountpoint(tmp_path)
    r = run("--root", str(store), "mount", "--writable", "app:1", str(mnt))
    assert r.returncode == 0, r.stderr
    cid = r.stdout.split()[-1]
    try:
        (mnt / "etc/os-release").write_bytes(b"ID=changed\n")
        (mnt / "new").write_text("new")
        os.unlink(mnt / "etc/shared")
    finally:
        assert run("umount", str(mnt)).returncode == 0
    upper = store / "containers" / cid / "upper"
    assert (upper / "etc/os-release").read_bytes() == b"ID=changed\n" and (upper / "new").read_text() == "new"
    assert stat.S_ISCHR(os.lstat(upper / "etc/shared").st_mode)          # an overlay whiteout
    assert (store / "layers" / sha(APP)[7:] / "root/etc/os-release").read_bytes() == b"ID=app\n"
    rec = json.loads((store / "containers" / cid / "container.json").read_text())
    assert rec["Image"] == inspect(store, "app:1")["Id"]
    r = run("--root", str(store), "rmi", "app:1")
    assert r.returncode == 2 and "in use by container" in r.stderr


def test_progress_bar_only_on_a_terminal(tmp_path):
    from unionfs.image.load import progress_enabled
    assert not progress_enabled()    # pytest captures stderr: not a terminal
    r = run("--root", str(tmp_path / "s"), "load", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "extracting" not in r.stderr
    archive = tmp_path / "a.tar"
    docker_save_legacy(archive, [Img([BASE], ["b:1"])])
    r = load(tmp_path / "s", archive)
    assert "\r" not in r.stderr and "extracting" not in r.stderr


def test_store_locations(tmp_path):
    from unionfs.image.store import default_root
    env = {k: v for k, v in os.environ.items() if k != "UNIONFS_ROOT"}
    code = "from unionfs.image.store import default_root; print(default_root())"
    py = unionfs_cmd()[0]
    out = subprocess.run([py, "-c", code], env=env, capture_output=True, text=True).stdout.strip()
    assert out == "/var/lib/unionfs"
    out = subprocess.run([py, "-c", code], env={**env, "UNIONFS_ROOT": str(tmp_path)}, capture_output=True,
                         text=True).stdout.strip()
    assert out == str(tmp_path)
    nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", py, "-c", code],
                            env={**env, "XDG_DATA_HOME": "/x/data"}, capture_output=True, text=True)
    assert nobody.stdout.strip() == "/x/data/unionfs", nobody.stderr
    assert default_root() in ("/var/lib/unionfs", os.environ.get("UNIONFS_ROOT"))


def test_demo_sample_image(tmp_path):
    """The image scripts/demo loads: built by our own code, the same bytes every time, mounted by name."""
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "sample_image.py")
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    for p in (a, b):
        subprocess.run([sys.executable, script, str(p)], check=True)
    assert a.read_bytes() == b.read_bytes() and a.stat().st_size < 64 * 1024
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    assert load(store, a).stdout.strip() == "Loaded image: sample:1.1"
    assert run("--root", str(store), "mount", "sample", str(mnt)).returncode == 2   # sample:latest: no such image
    assert run("--root", str(store), "mount", "sample:1.1", str(mnt)).returncode == 0
    try:
        files = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
        assert (mnt / "etc/os-release").read_text().endswith('VERSION="1.1"\n')
        assert os.readlink(mnt / "bin/hi") == "/bin/hello"
    finally:
        run("umount", str(mnt))
    assert files == ["app", "app/main.py", "bin", "bin/hello", "bin/hi", "etc", "etc/app.conf", "etc/os-release",
                     "usr", "usr/share", "usr/share/doc", "usr/share/doc/changelog", "var", "var/cache",
                     "var/cache/fresh.db"]
