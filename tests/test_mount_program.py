"""The ``unionfs`` command as fuse-overlayfs's drop-in: its argv (podman's ``-o OPTS MOUNTPOINT``,
mount.fuse3's ``SOURCE MOUNTPOINT -o OPTS``), its options, and owner shifting compared with
fuse-overlayfs itself on the same layers."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from helpers import as_user, force_unmount, is_mounted, program_mount
from podman_env import FUSE_OVERLAYFS, UNIONFS

pytestmark = pytest.mark.skipif(shutil.which("fuse-overlayfs") is None,
                                reason="fuse-overlayfs is needed (scripts/setup --test installs it)")


def _program(program: str, opts: str, mnt: Path, cwd: Path | None = None, *, argv: list[str] | None = None):
    return subprocess.run(argv or [program, "-o", opts, str(mnt)], capture_output=True, text=True, timeout=60,
                          cwd=cwd, stdin=subprocess.DEVNULL)


mounted = program_mount


def _mount_options(mnt: Path) -> tuple[str, str, set[str]]:
    """(fs type, source, options) of a mount from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ")
            if left.split()[4] == str(mnt):
                fstype, source, super_opts = right.split()
                return fstype, source, set(left.split()[5].split(",")) | set(super_opts.split(","))
    raise AssertionError(f"{mnt} not mounted")


def _driver_home(tmp_path: Path) -> Path:
    """containers/storage's layout: <id>/diff layers, l/<short> symlinks to them, <id>/work, <id>/merged."""
    home = tmp_path / "overlay"
    for layer in ("base", "top", "ctr"):
        (home / layer / "diff").mkdir(parents=True)
    (home / "ctr/work").mkdir()
    (home / "ctr/merged").mkdir()
    (home / "l").mkdir()
    os.symlink("../base/diff", home / "l/BASE")
    os.symlink("../top/diff", home / "l/TOP")
    (home / "base/diff/bin").mkdir()
    (home / "base/diff/bin/tool").write_text("#!/bin/sh\necho tool\n")
    os.chmod(home / "base/diff/bin/tool", 0o4755)
    (home / "top/diff/etc").mkdir()
    (home / "top/diff/etc/conf").write_text("top\n")
    return home


def test_podman_argv_relative_layers_and_root_defaults(tmp_path):
    r = subprocess.run([UNIONFS, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("unionfs version "), r
    home = _driver_home(tmp_path)
    # As containers/storage calls it: cwd at the driver home, relative l/ lower dirs, an empty item.
    opts = f"lowerdir=l/TOP:l/BASE,upperdir={home}/ctr/diff,workdir={home}/ctr/work,,volatile"
    with mounted(UNIONFS, opts, home / "ctr/merged", cwd=home) as m:
        fstype, source, flags = _mount_options(m)
        assert fstype == "fuse.unionfs" and {"allow_other", "default_permissions"} <= flags, flags
        assert not {"nosuid", "nodev"} & flags, flags       # a rootfs needs setuid binaries and devices
        assert (m / "etc/conf").read_text() == "top\n" and os.stat(m / "bin/tool").st_mode & 0o4000
        (m / "etc/conf").write_text("changed\n")
        root = os.open(m, os.O_PATH)   # (the test's tmp dirs are 0700)
        try:                                                  # allow_other: not only root sees the mount
            assert as_user(1000, lambda: os.stat("bin/tool", dir_fd=root)) == 0
        finally:
            os.close(root)
        with open(m / "new", "w") as f:
            f.write("x")
            os.fsync(f.fileno())                              # volatile: fsync returns, nothing waits
    assert (home / "ctr/diff/etc/conf").read_text() == "changed\n"
    # Told otherwise, it does otherwise.
    with mounted(UNIONFS, f"lowerdir={home}/base/diff,nosuid,nodev,allow_root", home / "ctr/merged") as m:
        _, _, flags = _mount_options(m)
        assert {"nosuid", "nodev"} <= flags, flags
        root = os.open(m, os.O_PATH)
        try:                  # allow_root (the kernel's allow_other, and libfuse turns other users away)
            assert as_user(1000, lambda: os.stat("bin/tool", dir_fd=root)) == errno.EACCES
        finally:
            os.close(root)


def test_mount_fuse3_fstab_form(tmp_path):
    """``mount -t fuse.unionfs SOURCE MNT -o ...`` runs mount.fuse3, which runs ``unionfs SOURCE MNT -o rw,...``
    found in mount's own PATH (/usr/local/bin first: where ``pip install`` puts it; Debian's unionfs-fuse
    owns /usr/bin/unionfs).  In a mount namespace of its own, with our entry point in a /usr/local/bin
    of its own, so nothing on the host changes; and the classic ``-t fuse PROGRAM#SOURCE`` form."""
    home = _driver_home(tmp_path)
    mnt = home / "ctr/merged"
    opts = f"lowerdir={home}/top/diff:{home}/base/diff,upperdir={home}/ctr/diff,workdir={home}/ctr/work"
    script = f"""set -e
mount -t tmpfs none /usr/local/bin; ln -s {UNIONFS} /usr/local/bin/unionfs
mount -t fuse.unionfs mystack {mnt} -o {opts}
grep " {mnt} " /proc/self/mountinfo; echo a > {mnt}/bin/added; ls {mnt}; umount {mnt}
"""
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    fields = r.stdout.splitlines()[0].split(" - ")[1].split()
    assert fields[:2] == ["fuse.unionfs", "mystack"] and r.stdout.splitlines()[1:] == ["bin", "etc"], r.stdout
    assert (home / "ctr/diff/bin/added").read_text() == "a\n"

    r = subprocess.run(["mount", "-t", "fuse", f"{UNIONFS}#other", str(mnt), "-o", opts],
                       capture_output=True, text=True, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert _mount_options(mnt)[:2] == ("fuse.unionfs", "other")
        assert (mnt / "bin/added").read_text() == "a\n"
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30)
        if is_mounted(mnt):
            force_unmount(mnt)


# fuse-overlayfs's options that change nothing here (README: "unionfs as podman's mount_program").
NO_OPS = ("threaded=1,timeout=5,redirect_dir=on,xino=auto,ino32_t,fast_ino=1,writeback=1,kernel_cache,"
          "max_write=131072,splice_read,diratime,fsync=0,xattr_permissions=0,noatime,exec,dev,suid,"
          'context="system_u:object_r:container_file_t:s0:c1,c2"')


def test_options_accepted_with_their_meaning_or_refused(tmp_path):
    home = _driver_home(tmp_path)
    (home / "base/diff/bin/sub").mkdir()
    os.setxattr(home / "base/diff/bin/tool", "user.k", b"v")
    mnt = home / "ctr/merged"
    layers = f"lowerdir={home}/top/diff:{home}/base/diff,upperdir={home}/ctr/diff,workdir={home}/ctr/work"
    with mounted(UNIONFS, f"{layers},{NO_OPS}", mnt) as m:
        assert os.getxattr(m / "bin/tool", "user.k") == b"v"
        assert os.stat(m / "bin").st_nlink == 3                # a single layer's directory: its real count
    for program in (UNIONFS, FUSE_OVERLAYFS):
        with mounted(program, f"{layers},static_nlink,noxattrs=1,noacl", mnt) as m:
            assert os.stat(m / "bin").st_nlink == 1, program
            with pytest.raises(OSError) as e:
                os.getxattr(m / "bin/tool", "user.k")
            assert e.value.errno == 95, program                # EOPNOTSUPP, as fuse-overlayfs
    for bad, says in (("bogus", "unknown mount option 'bogus'"), ("uidmapping=0:1", "invalid id mapping"),
                      ("squash_to_uid=x", "needs a number"), ("plugins=/x.so", "plugins"),
                      ("xattr_permissions=3", "want 0, 1"), ("allow_root,allow_other", "exclude"),
                      ("writeback=yes", "want a number")):
        r = _program(UNIONFS, f"{layers},{bad}", mnt)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, (bad, r.stderr)
        assert not is_mounted(mnt)


def _lower_with_owners(base: Path) -> None:
    for rel, uid, gid in (("root-file", 0, 0), ("app-file", 1000, 1000), ("far-file", 70000, 70001),
                          ("mixed", 5, 100005)):
        (base / rel).write_text(rel)
        os.chown(base / rel, uid, gid)
    (base / "tmp").mkdir()
    os.chmod(base / "tmp", 0o1777)


def _owners(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if rel.startswith("work") or name.startswith(".wh."):
                continue
            st = os.lstat(p)
            out[rel] = (st.st_uid, st.st_gid)
    return out


def _shift_session(program: str, base: Path, tmp: Path, opts: str) -> dict:
    up, wk, mnt = tmp / "upper", tmp / "work", tmp / "mnt"
    for p in (up, wk, mnt):
        p.mkdir(parents=True)
    with mounted(program, f"lowerdir={base},upperdir={up},workdir={wk},{opts}", mnt) as m:
        seen = _owners(m)
        (m / "by-root").write_text("r")                        # a caller no range covers: the overflow id
        os.mkdir(m / "dir-by-root")
        os.chown(m / "app-file", 100007, 100008)               # a chown of a lower file: copied up, shifted in
        root = os.open(m, os.O_PATH)   # (the test's tmp dirs are 0700)
        try:
            created = as_user(100005, lambda: os.close(os.open("tmp/by-mapped", os.O_CREAT | os.O_WRONLY, 0o644,
                                                               dir_fd=root)), gid=100006)
        finally:
            os.close(root)
        after = _owners(m)
    assert created == 0, created
    return {"seen": seen, "after": after, "stored": _owners(up)}


@pytest.mark.parametrize("opts", [
    "uidmapping=:0:100000:65536,gidmapping=:0:100000:65536",          # as containers/storage writes it
    "uidmapping=0:100000:1000:1000:300000:10,gidmapping=0:100000:200000",
    "squash_to_root",
    "squash_to_uid=7,squash_to_gid=8",
    "squash_to_root,squash_to_gid=9,uidmapping=0:100000:65536",
])
def test_owner_shifting_as_fuse_overlayfs(tmp_path, opts):
    base = tmp_path / "base"
    base.mkdir()
    _lower_with_owners(base)
    ours = _shift_session(UNIONFS, base, tmp_path / "ours", opts)
    theirs = _shift_session(FUSE_OVERLAYFS, base, tmp_path / "theirs", opts)
    theirs["stored"].pop("work", None)
    assert ours == theirs
    if opts.startswith("uidmapping=:0:100000"):
        assert ours["seen"]["app-file"] == (101000, 101000) and ours["seen"]["far-file"] == (65534, 65534)
        assert ours["stored"]["tmp/by-mapped"] == (5, 6) and ours["stored"]["app-file"] == (7, 8)
        assert ours["stored"]["by-root"] == (65534, 65534)


def test_subcommands_are_never_taken_for_a_mount_program_argv():
    from unionfs import cli
    sub = next(a for a in cli.parser()._actions if a.dest == "command")
    assert set(sub.choices) == cli._COMMANDS
    assert not cli._is_mount_program_argv(["mount", "-o", "lowerdir=x", "/m"])
    assert cli._is_mount_program_argv(["-o", "lowerdir=x", "/m"]) and cli._is_mount_program_argv(["src", "/m", "-o", "x"])


def _daemon_pid(mnt: Path) -> int:
    pidfile = "/run/unionfs/" + str(mnt).strip("/").replace("/", "%") + ".pid"
    return int(Path(pidfile).read_text())


def _traced(pid: int, tid: str) -> bool:
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in f)


def _fsyncs_of_the_daemon(tmp_path: Path, opts: str) -> list[str]:
    """The fsync(2)/fdatasync(2) calls the daemon makes while a client fsyncs a file (seen by strace)."""
    for d in ("up", "wk", "mnt", "low"):
        (tmp_path / d).mkdir(parents=True)
    mnt, trace = tmp_path / "mnt", tmp_path / "trace"
    with mounted(UNIONFS, f"lowerdir={tmp_path}/low,upperdir={tmp_path}/up,workdir={tmp_path}/wk{opts}", mnt):
        pid = _daemon_pid(mnt)
        tids = os.listdir(f"/proc/{pid}/task")
        strace = subprocess.Popen(["strace", "-qq", "-e", "trace=fsync,fdatasync", "-o", str(trace),
                                   *(a for t in tids for a in ("-p", t))], stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not all(_traced(pid, t) for t in tids):   # attached before the client's fsync
                assert time.monotonic() < deadline and strace.poll() is None, "strace did not attach"
                time.sleep(0.05)
            fd = os.open(mnt / "f", os.O_CREAT | os.O_WRONLY, 0o644)
            os.write(fd, b"data")
            os.fsync(fd)
            os.fdatasync(fd)
            os.close(fd)
        finally:
            strace.terminate()
            strace.wait(timeout=30)
    return [line for line in trace.read_text().splitlines() if "sync(" in line]


def test_volatile_means_no_fsync(tmp_path):
    if shutil.which("strace") is None:
        pytest.skip("strace is needed (scripts/setup --test installs it)")
    assert len(_fsyncs_of_the_daemon(tmp_path / "a", "")) == 2                  # the caller's fsync reaches the disk
    assert _fsyncs_of_the_daemon(tmp_path / "b", ",,volatile") == []            # podman's run --rm and build
    assert _fsyncs_of_the_daemon(tmp_path / "c", ",fsync=0") == []


def test_noacl_as_fuse_overlayfs(tmp_path):
    """POSIX ACLs are enforced by the kernel (an ACL entry that shuts uid 1000 out of a 0644 file), and with
    noacl not at all, for both programs."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "secret").write_text("s")
    subprocess.run(["setfacl", "-m", "u:1000:---", str(base / "secret")], check=True, timeout=30)
    seen = {}
    for name, program in (("ours", UNIONFS), ("theirs", FUSE_OVERLAYFS)):
        for opts in ("", ",noacl"):
            up, wk, mnt = (tmp_path / f"{name}{opts.strip(',')}-{d}" for d in ("up", "wk", "mnt"))
            for d in (up, wk, mnt):
                d.mkdir()
            with mounted(program, f"lowerdir={base},upperdir={up},workdir={wk}{opts}", mnt) as m:
                root = os.open(m, os.O_PATH)
                try:
                    seen[name, opts] = as_user(1000, lambda: os.close(os.open("secret", os.O_RDONLY, dir_fd=root)))
                finally:
                    os.close(root)
    assert seen == {("ours", ""): errno.EACCES, ("ours", ",noacl"): 0,
                    ("theirs", ""): errno.EACCES, ("theirs", ",noacl"): 0}


def st_owner(p: Path) -> tuple[int, int]:
    st = os.lstat(p)
    return st.st_uid, st.st_gid


def _override_session(program: str, base: Path, tmp: Path, level: int) -> dict:
    from unionfs.fs.formats import Override, override_name
    up, wk, mnt = tmp / "upper", tmp / "work", tmp / "mnt"
    for p in (up, wk, mnt):
        p.mkdir(parents=True)

    def shown(root: Path) -> dict:
        return {rel: (st.st_uid, st.st_gid, oct(st.st_mode)) for rel in ("a", "b", "d", "d/e")
                for st in [os.lstat(root / rel)]}

    with mounted(program, f"lowerdir={base},upperdir={up},workdir={wk},xattr_permissions={level}", mnt) as m:
        seen = shown(m)
        os.chown(m / "a", 7, 8)          # lower files: copied up, the owner and mode recorded
        os.chmod(m / "b", 0o640)
        os.chown(m / "d/e", 9, -1)
        after = shown(m)
    stored = {}
    for rel in ("a", "b", "d/e"):
        ov = Override.decode(os.getxattr(up / rel, override_name(level)) if program == UNIONFS else None)
        stored[rel] = (ov.uid, ov.gid, oct(ov.perm), st_owner(up / rel)) if ov else None
    return {"seen": seen, "after": after, "stored": stored}


@pytest.mark.parametrize("level", [1, 2])
def test_xattr_permissions_as_fuse_overlayfs(tmp_path, level):
    """``xattr_permissions=1|2`` (podman's force_mask): owners and modes recorded in
    ``user.fuseoverlayfs.override_stat`` / ``user.containers.override_stat`` show, and chown/chmod record
    theirs, as fuse-overlayfs does on the same layer."""
    from unionfs.fs.formats import override_name
    name = override_name(level)
    base = tmp_path / "base"
    (base / "d").mkdir(parents=True)
    for rel, value in ((".", b"0:0:0755:dir"), ("a", b"1000:1000:0600:file"), ("b", b"33:33:4755"), ("d", b"5:6:0750:dir"),
                       ("d/e", b"0:5:2755:file")):
        if not (base / rel).exists():
            (base / rel).write_text(rel)
        if value is not None:
            os.setxattr(base / rel, name, value)
    ours = _override_session(UNIONFS, base, tmp_path / "ours", level)
    theirs = _override_session(FUSE_OVERLAYFS, base, tmp_path / "theirs", level)
    assert ours["seen"] == theirs["seen"]
    assert ours["seen"]["b"] == (33, 33, oct(0o104755)) and ours["seen"]["d"] == (5, 6, oct(0o40750))
    # fuse-overlayfs 1.10 (Debian 12) records a chmod with the file's real owner and a chown's -1 as
    # 65534 (both fixed in its 1.14); we keep what the entry showed.
    assert ours["after"] == {"a": (7, 8, oct(0o100600)), "b": (33, 33, oct(0o100640)), "d": (5, 6, oct(0o40750)),
                             "d/e": (9, 5, oct(0o100755))}
    assert theirs["after"]["a"] == ours["after"]["a"]
    # Recorded in the upper layer in the option's name, the files themselves still root's.
    assert ours["stored"] == {"a": (7, 8, oct(0o600), (0, 0)), "b": (33, 33, oct(0o640), (0, 0)),
                              "d/e": (9, 5, oct(0o755), (0, 0))}
