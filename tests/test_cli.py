"""The command line: mounting in the background and foreground, unmounting, and clean errors."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from helpers import force_unmount, is_mounted, unionfs_cmd
from stacks import write


def run(*args, timeout=60):
    return subprocess.run(unionfs_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def stack(tmp_path):
    top, bottom, mnt = tmp_path / "top", tmp_path / "bottom", tmp_path / "mnt"
    for d in (top, bottom, mnt):
        d.mkdir()
    write(bottom, "hello", b"world\n")
    yield top, bottom, mnt
    if is_mounted(mnt):
        force_unmount(mnt)


def test_background_mount_and_umount(stack):
    top, bottom, mnt = stack
    r = run("mount", "--lower", f"{top}:{bottom}", str(mnt))
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt / "hello").read_text() == "world\n"
        with open("/proc/self/mounts") as f:
            line = next(line for line in f if line.split()[1] == str(mnt))
        assert line.split()[2] == "fuse.unionfs" and "ro" in line.split()[3].split(",")
    finally:
        r = run("umount", str(mnt))
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mnt)


def test_overlayfs_option_spelling(stack):
    top, bottom, mnt = stack
    r = run("mount", "-o", f"lowerdir={top}:{bottom},fsname=myimage", str(mnt))
    assert r.returncode == 0, r.stderr
    try:
        with open("/proc/self/mounts") as f:
            assert any(line.split()[:2] == ["myimage", str(mnt)] for line in f)
        assert os.listdir(mnt) == ["hello"]
    finally:
        run("umount", str(mnt))


def test_umount_after_daemon_died(stack):
    top, bottom, mnt = stack
    assert run("mount", "--lower", f"{top}:{bottom}", str(mnt)).returncode == 0
    pidfile = f"/run/unionfs/{str(mnt).strip('/').replace('/', '%')}.pid"
    pid = int(open(pidfile).read())
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    with pytest.raises(OSError):
        os.listdir(mnt)  # ENOTCONN: nothing hangs
    r = run("umount", str(mnt))
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mnt)
    assert not os.path.exists(pidfile)  # the dead daemon's, removed by umount


def test_foreground_sigterm_unmounts(stack, tmp_path):
    top, bottom, mnt = stack
    p = subprocess.Popen(unionfs_cmd("mount", "-f", "--lower", f"{top}:{bottom}", str(mnt)),
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mnt) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert is_mounted(mnt)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 0
        assert not is_mounted(mnt)
        assert b"Traceback" not in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("case,message", [
    ("missing-mountpoint", "no such directory"),
    ("file-mountpoint", "not a directory"),
    ("missing-layer", "no such directory"),
    ("file-layer", "not a directory"),
    ("same-layer-twice", "same directory"),
    ("no-layers", "no lower layers"),
    ("bad-option", "unknown mount option"),
    ("upper-without-work", "needs a work dir"),
    ("bare-upperdir", "upperdir needs a directory"),
    ("empty-workdir", "workdir needs a directory"),
    ("empty-lowerdir", "lowerdir needs directories"),
    ("bad-max-inodes", "max_inodes needs a number"),
])
def test_usage_errors_are_one_line(stack, tmp_path, case, message):
    top, bottom, mnt = stack
    f = tmp_path / "afile"
    f.touch()
    args = {
        "missing-mountpoint": ["--lower", f"{top}", str(tmp_path / "nope")],
        "file-mountpoint": ["--lower", f"{top}", str(f)],
        "missing-layer": ["--lower", f"{top}:{tmp_path / 'nope'}", str(mnt)],
        "file-layer": ["--lower", f"{top}:{f}", str(mnt)],
        "same-layer-twice": ["--lower", f"{top}:{bottom}:{top}", str(mnt)],
        "no-layers": [str(mnt)],
        "bad-option": ["-o", f"lowerdir={top},frobnicate", str(mnt)],
        "upper-without-work": ["--lower", f"{bottom}", "--upper", str(top), str(mnt)],
        "bare-upperdir": ["-o", f"lowerdir={bottom},upperdir", str(mnt)],
        "empty-workdir": ["-o", f"lowerdir={bottom},upperdir={top},workdir=", str(mnt)],
        "empty-lowerdir": ["-o", "lowerdir=", str(mnt)],
        "bad-max-inodes": ["-o", f"lowerdir={bottom},max_inodes=lots", str(mnt)],
    }[case]
    r = run("mount", *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert not is_mounted(mnt)


def test_umount_errors(tmp_path):
    r = run("umount", str(tmp_path))
    assert r.returncode == 2 and "not mounted" in r.stderr
    r = run("umount", str(tmp_path / "nope"))
    assert r.returncode == 2 and "no such directory" in r.stderr


def test_python_m_and_console_script():
    assert run("--help").returncode == 0
    r = subprocess.run(["unionfs", "--help"], capture_output=True, text=True,
                       env={**os.environ, "PATH": os.path.dirname(os.sys.executable) + ":" + os.environ["PATH"]})
    assert r.returncode == 0 and "mount" in r.stdout
