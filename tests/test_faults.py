"""Faults: an exception inside a handler, and a daemon killed in the middle of a copy-up."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import force_unmount, is_mounted
from stacks import write

# The daemon, with Union.getattr broken for one name: the injected fault.
FAULTY_DAEMON = """
import sys
from unionfs.fs import union
real = union.Union.getattr
def getattr(self, node):
    if node.name == b"poison":
        raise RuntimeError("injected fault")
    return real(self, node)
union.Union.getattr = getattr
from unionfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _wait(mnt, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while not is_mounted(mnt):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_handler_exception_is_eio_and_the_mount_keeps_serving(tmp_path):
    lower, mnt, log = tmp_path / "lower", tmp_path / "mnt", tmp_path / "log"
    lower.mkdir()
    mnt.mkdir()
    write(lower, "poison", b"x")
    write(lower, "fine", b"still here")
    proc = subprocess.Popen([sys.executable, "-c", FAULTY_DAEMON, "mount", "-f", "--log", str(log),
                             "--lower", str(lower), str(mnt)], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        _wait(mnt, proc)
        with pytest.raises(OSError) as e:
            os.stat(mnt / "poison")
        assert e.value.errno == errno.EIO
        assert (mnt / "fine").read_bytes() == b"still here"     # the daemon survived
        assert proc.poll() is None
        text = log.read_text()
        assert "internal error in lookup" in text and "injected fault" in text  # logged with context
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        proc.wait(timeout=20)
        if is_mounted(mnt):
            force_unmount(mnt)


def test_kill_during_copy_up_leaves_old_or_new(tmp_path):
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    data = os.urandom(1 << 20) * 400  # 400 MiB: the copy-up takes a while
    (lower / "big").write_bytes(data)
    cmd = [sys.executable, "-m", "unionfs", "mount", "-f", "--log", str(tmp_path / "log"), "--lower", str(lower),
           "--upper", str(upper), "--work", str(work), str(mnt)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        _wait(mnt, proc)
        writer = subprocess.Popen([sys.executable, "-c", f"open({str(mnt / 'big')!r}, 'ab').write(b'!')"],
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.listdir(work / "work") and time.monotonic() < deadline:
            time.sleep(0.005)   # the copy-up has started in the work dir
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)
        writer.wait(timeout=20)
    finally:
        if is_mounted(mnt):
            force_unmount(mnt)
    assert not (upper / "big").exists() or (upper / "big").stat().st_size == len(data) + 1
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        _wait(mnt, proc)
        assert os.listdir(work / "work") == []                  # leftovers cleaned at mount
        seen = (mnt / "big").read_bytes()
        assert seen in (data, data + b"!")                      # the old view or the new one
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        proc.wait(timeout=20)
        if is_mounted(mnt):
            force_unmount(mnt)
