"""The warm daemon (unionfs.zygote): a mount through it behaves as a mount without it (podman's
relative lower dirs, mount options, errors, unmounting), a killed zygote is replaced, and nobody
but its own user gets a mount out of it."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from helpers import force_unmount, is_mounted
from podman_env import UNIONFS

COLD = {"UNIONFS_ZYGOTE": "0"}


@pytest.fixture
def zygotes():
    """A zygote directory of this test's own (the session's is shared), mode 0700 as the default
    ones; its zygotes stopped at the end."""
    from conftest import stop_zygotes
    d = Path(tempfile.mkdtemp(prefix="unionfs-zygote-test-"))
    yield d
    stop_zygotes(str(d))
    shutil.rmtree(d, ignore_errors=True)


def _run(argv: list[str], zdir: Path, cwd: Path | None = None, env: dict | None = None):
    e = dict(os.environ, UNIONFS_ZYGOTE_DIR=str(zdir), **(env or {}))
    return subprocess.run([UNIONFS, *argv], capture_output=True, text=True, timeout=60, cwd=cwd, env=e,
                          stdin=subprocess.DEVNULL)


def _zygote_pid(zdir: Path, timeout: float = 30) -> int:
    """The pid of the zygote in ``zdir`` once it listens (it starts in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pf in zdir.glob("*.pid"):
            sock = pf.with_suffix(".sock")
            try:
                pid = int(pf.read_text())
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
                return pid
            except (OSError, ValueError):
                pass
        time.sleep(0.05)
    raise AssertionError(f"no zygote came up in {zdir}")


def _daemon(mnt: Path) -> int:
    return int(Path("/run/unionfs/" + str(mnt).strip("/").replace("/", "%") + ".pid").read_text())


def _forked_by_zygote(pid: int) -> bool:
    """A daemon forked by the zygote carries its command line (python -m unionfs.zygote)."""
    return b"unionfs.zygote" in Path(f"/proc/{pid}/cmdline").read_bytes()


def _mountinfo(mnt: Path) -> tuple[str, str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ")
            if left.split()[4] == str(mnt):
                return left.split()[5], right.split(maxsplit=2)[2].split(",", 1)[1]   # mount opts, super opts
    raise AssertionError(f"{mnt} not mounted")


def _podman_home(tmp_path: Path, name: str) -> tuple[Path, str]:
    """A driver home as containers/storage lays it out, and the relative OPTS podman passes."""
    home = tmp_path / name
    for d in ("base/diff/etc", "ctr/diff", "ctr/work", "ctr/merged", "l"):
        (home / d).mkdir(parents=True)
    (home / "base/diff/etc/conf").write_text("base\n")
    os.symlink("../base/diff", home / "l/BASE")
    return home, f"lowerdir=l/BASE,upperdir={home}/ctr/diff,workdir={home}/ctr/work,,volatile"


def _unmount(*mnts: Path) -> None:
    for m in mnts:
        subprocess.run(["fusermount3", "-u", str(m)], capture_output=True, timeout=30)
        if is_mounted(m):
            force_unmount(m)


def test_warm_mount_is_the_cold_mount(tmp_path, zygotes):
    """Cold (no zygote yet: it starts one), then warm: podman's relative lower dir resolved in the
    caller's cwd, the same mount options, the same tree, writes landing in the upper dir."""
    cold_home, cold_opts = _podman_home(tmp_path, "cold")
    warm_home, warm_opts = _podman_home(tmp_path, "warm")
    cold_mnt, warm_mnt = cold_home / "ctr/merged", warm_home / "ctr/merged"
    try:
        r = _run(["-o", cold_opts, str(cold_mnt)], zygotes, cwd=cold_home)
        assert r.returncode == 0 and r.stderr == "" and is_mounted(cold_mnt), r.stderr
        assert not _forked_by_zygote(_daemon(cold_mnt))
        _zygote_pid(zygotes)
        r = _run(["-o", warm_opts, str(warm_mnt)], zygotes, cwd=warm_home)
        assert r.returncode == 0 and r.stderr == "" and is_mounted(warm_mnt), r.stderr
        assert _forked_by_zygote(_daemon(warm_mnt))
        assert _mountinfo(warm_mnt) == _mountinfo(cold_mnt)
        for mnt in (cold_mnt, warm_mnt):
            assert (mnt / "etc/conf").read_text() == "base\n"
            (mnt / "etc/new").write_text("new\n")
        assert (warm_home / "ctr/diff/etc/new").read_text() == (cold_home / "ctr/diff/etc/new").read_text()
        assert sorted(os.listdir(warm_mnt / "etc")) == sorted(os.listdir(cold_mnt / "etc")) == ["conf", "new"]
    finally:
        _unmount(cold_mnt, warm_mnt)


def test_errors_are_the_same_one_line(tmp_path, zygotes):
    """A bad option, a missing layer, a missing mount point: one line, exit 2, warm as cold."""
    (tmp_path / "low").mkdir()
    (tmp_path / "mnt").mkdir()
    ok = _run(["-o", f"lowerdir={tmp_path}/low", str(tmp_path / "mnt")], zygotes)
    assert ok.returncode == 0, ok.stderr
    _unmount(tmp_path / "mnt")
    _zygote_pid(zygotes)
    cases = [["-o", f"lowerdir={tmp_path}/low,bogus=1", str(tmp_path / "mnt")],
             ["-o", "lowerdir=nowhere", str(tmp_path / "mnt")],
             ["-o", f"lowerdir={tmp_path}/low", str(tmp_path / "no-mnt")],
             ["-o", f"lowerdir={tmp_path}/low,max_read=abc", str(tmp_path / "mnt")],   # refused by libfuse, in the daemon
             ["mount", "--lower", "nowhere", str(tmp_path / "mnt")],
             ["umount", str(tmp_path / "mnt")]]
    for argv in cases:
        warm = _run(argv, zygotes, cwd=tmp_path)
        cold = _run(argv, zygotes, cwd=tmp_path, env=COLD)
        assert (warm.returncode, warm.stdout, warm.stderr) == (cold.returncode, cold.stdout, cold.stderr), argv
        assert warm.returncode == 2 and warm.stderr.startswith("unionfs: ") and warm.stderr.count("\n") == 1, argv
    assert not is_mounted(tmp_path / "mnt")


def test_a_killed_zygote_is_replaced_and_umount_waits_for_the_daemon(tmp_path, zygotes):
    (tmp_path / "low").mkdir()
    (tmp_path / "low/f").write_text("f\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = f"lowerdir={tmp_path}/low"
    try:
        assert _run(["-o", opts, str(mnt)], zygotes).returncode == 0
        assert _run(["umount", str(mnt)], zygotes).returncode == 0
        first = _zygote_pid(zygotes)
        os.kill(first, signal.SIGKILL)   # its socket stays behind, nobody listening
        r = _run(["-o", opts, str(mnt)], zygotes)
        assert r.returncode == 0 and (mnt / "f").read_text() == "f\n", r.stderr
        assert not _forked_by_zygote(_daemon(mnt))   # served cold
        daemon = _daemon(mnt)
        r = _run(["umount", str(mnt)], zygotes)
        assert r.returncode == 0 and not is_mounted(mnt), r.stderr
        assert not os.path.exists(f"/proc/{daemon}") or b"Z" in Path(f"/proc/{daemon}/stat").read_bytes().rpartition(b")")[2][:3]
        second = _zygote_pid(zygotes)
        assert second != first
        r = _run(["-o", opts, str(mnt)], zygotes)
        assert r.returncode == 0 and _forked_by_zygote(_daemon(mnt)), r.stderr
        os.kill(_daemon(mnt), signal.SIGKILL)   # a dead daemon's mount: umount still detaches it
        r = _run(["umount", str(mnt)], zygotes)
        assert r.returncode == 0 and not is_mounted(mnt), r.stderr
    finally:
        _unmount(mnt)


def test_turned_off_no_zygote(tmp_path, zygotes):
    (tmp_path / "low").mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        assert _run(["-o", f"lowerdir={tmp_path}/low", str(mnt)], zygotes, env=COLD).returncode == 0
        time.sleep(0.5)
        assert list(zygotes.iterdir()) == []
    finally:
        _unmount(mnt)


def test_another_user_gets_nothing(tmp_path, zygotes):
    """Even through an opened directory and socket, another uid is turned away before any work
    (SO_PEERCRED), and a directory others may enter is not used at all."""
    (tmp_path / "low").mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert _run(["-o", f"lowerdir={tmp_path}/low", str(mnt)], zygotes).returncode == 0
    _unmount(mnt)
    _zygote_pid(zygotes)   # the directory: /tmp/unionfs-zygote-test-*, which others can reach
    sock = next(zygotes.glob("*.sock"))
    os.chmod(zygotes, 0o711)
    os.chmod(sock, 0o666)
    ident = subprocess.run([str(Path(UNIONFS).with_name("python3")), "-c", "import sys; from unionfs.zygote "
                            "import identity; sys.stdout.buffer.write(identity())"], capture_output=True,
                           check=True, timeout=30).stdout   # what the zygote's own user would send
    probe = f"""
import marshal, os, socket, struct
s = socket.socket(socket.AF_UNIX)
s.connect({str(sock)!r})
req = marshal.dumps(({ident!r}, ["--version"], dict(os.environ), 0o22))
try:
    socket.send_fds(s, [struct.pack("I", len(req))], [os.open(".", os.O_RDONLY), 0, 1, 2])
    s.sendall(req)
    s.shutdown(socket.SHUT_WR)
    print("accepted" if s.recv(16) else "refused")
except (ConnectionResetError, BrokenPipeError):   # closed before or with our request unread
    print("refused")
"""
    as_root = subprocess.run(["python3", "-c", probe], capture_output=True, text=True, timeout=30, cwd="/")
    # the probe is a real request (the fork's "unionfs version" shares the probe's stdout, in any order)
    assert "accepted" in as_root.stdout and "unionfs version" in as_root.stdout, as_root.stderr
    r = subprocess.run(["python3", "-c", probe], capture_output=True, text=True, timeout=30, cwd="/",
                       preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)))
    assert r.returncode == 0 and r.stdout.strip() == "refused", r.stderr
    try:   # a directory others can enter: not trusted, the mount runs cold
        r = _run(["-o", f"lowerdir={tmp_path}/low", str(mnt)], zygotes)
        assert r.returncode == 0 and not _forked_by_zygote(_daemon(mnt)), r.stderr
    finally:
        _unmount(mnt)



def _gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if b"Z" in Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2][:3]:
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def test_a_warm_daemon_outlives_its_zygote(tmp_path, zygotes):
    """The worker that took a mount program's request is the mount's daemon: in a process group of its
    own (no session leader, so no terminal to take), it keeps serving when the zygote's whole group is
    killed, and unmounts as any other."""
    (tmp_path / "low").mkdir()
    (tmp_path / "low/f").write_text("f\n")
    for d in ("up", "work", "mnt"):
        (tmp_path / d).mkdir()
    mnt = tmp_path / "mnt"
    opts = f"lowerdir={tmp_path}/low,upperdir={tmp_path}/up,workdir={tmp_path}/work"
    try:
        assert _run(["-o", opts, str(mnt)], zygotes).returncode == 0
        _unmount(mnt)
        zygote = _zygote_pid(zygotes)
        r = _run(["-o", opts, str(mnt)], zygotes)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        daemon = _daemon(mnt)
        assert _forked_by_zygote(daemon)
        group = os.getpgid(zygote)
        assert os.getpgid(daemon) == daemon != group and os.getsid(daemon) == os.getsid(zygote) != daemon
        os.killpg(group, signal.SIGKILL)
        assert _gone(zygote)
        assert (mnt / "f").read_text() == "f\n"
        (mnt / "g").write_text("g\n")
        assert (tmp_path / "up/g").read_text() == "g\n"
        r = _run(["umount", str(mnt)], zygotes)
        assert r.returncode == 0 and not is_mounted(mnt) and _gone(daemon, 5), r.stderr
    finally:
        _unmount(mnt)


def test_a_changed_source_retires_the_zygote(tmp_path, zygotes):
    """A change to a source file of unionfs (here only an inotify event: the times are set to what they
    were, so no bytecode goes stale) makes the next request run cold and start a fresh zygote."""
    import unionfs
    (tmp_path / "low").mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = f"lowerdir={tmp_path}/low"
    try:
        assert _run(["-o", opts, str(mnt)], zygotes).returncode == 0
        _unmount(mnt)
        first = _zygote_pid(zygotes)
        assert _run(["-o", opts, str(mnt)], zygotes).returncode == 0 and _forked_by_zygote(_daemon(mnt))
        _unmount(mnt)
        source = Path(unionfs.__file__).with_name("routing.py")
        st = source.stat()
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
        r = _run(["-o", opts, str(mnt)], zygotes)
        assert r.returncode == 0 and not _forked_by_zygote(_daemon(mnt)), r.stderr
        _unmount(mnt)
        assert _gone(first)
        second = _zygote_pid(zygotes)
        assert second != first
        assert _run(["-o", opts, str(mnt)], zygotes).returncode == 0 and _forked_by_zygote(_daemon(mnt))
    finally:
        _unmount(mnt)
