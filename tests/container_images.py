"""Images and helpers shared by the container tests: a two-layer image with every kind of entry, a
container changed in every way a lower layer can be, a per-test store, and the CLI."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from helpers import force_unmount, is_mounted, mkdirs, snapshot, unionfs_cmd  # noqa: F401 (mkdirs: re-exported)
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


def mounted_snapshot(store, name, mnt):
    """What image or container ``name`` shows when mounted on ``mnt`` (unmounted again afterwards)."""
    ok(store, "mount", name, str(mnt))
    try:
        return snapshot(mnt)
    finally:
        ok(store, "umount", str(mnt))


def ps_rows(store):
    """``ps -a`` as {name: [id, image, command, created, status, mounted, size, name]}."""
    lines = ok(store, "ps", "-a", "--no-trunc").splitlines()
    header = lines[0]
    cols = [header.index(h) for h in ("CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "MOUNTED", "SIZE",
                                      "NAMES")]
    rows = {}
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(cols, cols[1:] + [None])]
        rows[cells[7]] = cells
    return rows


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




# --- a tiny runnable image: busybox-static (and the host's dpkg, for a package-manager workload) ------------

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "echo", "cat", "ls", "id", "pwd", "env", "true", "false", "sleep", "mkdir", "rm", "hostname",
           "head", "wc", "touch", "ln", "mv", "stat", "tar", "diff", "cmp", "find", "readlink", "start-stop-daemon",
           "grep", "sed", "chmod", "chown", "cp", "test", "[")
PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
GROUP = b"root:x:0:\napp:x:1000:\nextra:x:2000:app\n"


def _host_file(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def busybox_layer(dpkg: bool = False) -> bytes:
    """A rootfs layer: /bin/busybox and its applets, users, /tmp; with ``dpkg``, also the host's dpkg,
    dpkg-deb, dpkg-split and GNU tar with their shared libraries and an empty dpkg database (a package manager in 10 MB)."""
    entries = [d("bin"), f("bin/busybox", _host_file(BUSYBOX), 0o755)]
    entries += [sym(f"bin/{a}", "busybox") for a in APPLETS if not (dpkg and a == "tar")]
    entries += [d("etc"), f("etc/passwd", PASSWD), f("etc/group", GROUP), d("tmp", 0o1777), d("root", 0o700),
                d("home/app", uid=1000, gid=1000), d("proc"), d("sys"), d("dev")]
    if dpkg:
        libs = set()
        for binary in ("/usr/bin/dpkg", "/usr/bin/dpkg-deb", "/usr/bin/dpkg-split", "/usr/bin/tar"):
            out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
            libs.update(w for line in out.splitlines() for w in line.split() if w.startswith("/"))
        entries += [d("usr/bin"), d("usr/sbin"), d("sbin"), d("lib64"), d("lib/x86_64-linux-gnu"),
                    f("usr/bin/dpkg", _host_file("/usr/bin/dpkg"), 0o755),
                    f("usr/bin/dpkg-deb", _host_file("/usr/bin/dpkg-deb"), 0o755),
                    f("usr/bin/dpkg-split", _host_file("/usr/bin/dpkg-split"), 0o755),
                    f("usr/bin/tar", _host_file("/usr/bin/tar"), 0o755),   # dpkg-deb needs GNU tar
                    f("sbin/ldconfig", b"#!/bin/sh\nexit 0\n", 0o755),
                    d("var/lib/dpkg/info"), d("var/lib/dpkg/updates"), d("var/lib/dpkg/triggers"),
                    f("var/lib/dpkg/status"), f("var/lib/dpkg/available"), d("etc/dpkg/dpkg.cfg.d"),
                    d("usr/share/hello"), f("usr/share/hello/old", b"from the image\n")]
        for lib in sorted(libs):
            real = os.path.realpath(lib)
            name = "lib/x86_64-linux-gnu/" + os.path.basename(real)
            if not any(e.name == name for e in entries):
                entries.append(f(name, _host_file(real), 0o755))
            if lib.startswith("/lib64/"):
                entries.append(sym(lib.lstrip("/"), "/" + name))
            elif os.path.basename(lib) != os.path.basename(real):
                entries.append(sym("lib/x86_64-linux-gnu/" + os.path.basename(lib), os.path.basename(real)))
    seen, out = set(), []
    for e in entries:
        if e.name not in seen:
            seen.add(e.name)
            out.append(e)
    return layer_tar(out)


def busybox_image(path, tag: str, dpkg: bool = False, **cfg) -> None:
    from image_archives import config, sha
    layer = busybox_layer(dpkg)
    base = {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "GREETING=hello"], "WorkingDir": "/home/app",
            "User": "app", "Cmd": ["sh", "-c", "echo $GREETING from $(pwd) as $(id -u):$(id -g) $(id -G)"]}
    base.update(cfg)
    docker_save_legacy(path, [Img([layer], [tag], config=config([sha(layer)], **base))])


def build_deb(tmp_path) -> str:
    """hello-unionfs_1.0_all.deb: a script, a conffile, a hard link, a file replacing one of the image's,
    and a postinst; built with the host's dpkg-deb."""
    pkg = tmp_path / "pkg"
    for sub in ("DEBIAN", "usr/bin", "usr/share/hello", "etc"):
        (pkg / sub).mkdir(parents=True)
    (pkg / "DEBIAN/control").write_text("Package: hello-unionfs\nVersion: 1.0\nArchitecture: all\n"
                                        "Maintainer: tests <t@example.com>\nDescription: a test package\n")
    (pkg / "DEBIAN/conffiles").write_text("/etc/hello.conf\n")
    (pkg / "DEBIAN/postinst").write_text("#!/bin/sh\nset -e\necho postinst ran > /var/lib/hello-postinst\n")
    (pkg / "usr/bin/hello").write_text("#!/bin/sh\necho hello from the package\n")
    (pkg / "usr/share/hello/data").write_text("data\n")
    os.link(pkg / "usr/share/hello/data", pkg / "usr/share/hello/data-link")
    (pkg / "usr/share/hello/old").write_text("from the package\n")
    (pkg / "etc/hello.conf").write_text("conf=1\n")
    for p in ("DEBIAN/postinst", "usr/bin/hello"):
        os.chmod(pkg / p, 0o755)
    out = tmp_path / "hello.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(out)], check=True,
                   capture_output=True, timeout=60)
    return str(out)
