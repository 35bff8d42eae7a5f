import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from helpers import UnionMount, is_mounted, unmount_all_below  # noqa: E402

if os.geteuid() != 0:
    pytest.exit("the test suite mounts filesystems: run it as root (see README)", returncode=2)


# The warm daemons (unionfs.zygote) this session's mounts start live in a directory of its own and
# are stopped at its end; the idle timeout is the safety net if the session itself is killed.
_ZYGOTES = tempfile.mkdtemp(prefix="unionfs-zygotes-")
os.environ["UNIONFS_ZYGOTE_DIR"] = _ZYGOTES
os.environ.setdefault("UNIONFS_ZYGOTE_IDLE", "120")


def stop_zygotes(directory: str) -> None:
    """SIGTERM every zygote with a pidfile in ``directory`` (each removes its socket as it goes)."""
    for name in os.listdir(directory):
        if name.endswith(".pid"):
            try:
                os.kill(int(open(os.path.join(directory, name)).read()), signal.SIGTERM)
            except (OSError, ValueError):
                pass


def pytest_sessionfinish(session, exitstatus):
    stop_zygotes(_ZYGOTES)
    shutil.rmtree(_ZYGOTES, ignore_errors=True)


def pytest_sessionstart(session):
    if not os.path.exists("/sys/fs/fuse/connections/"):
        return
    if not os.listdir("/sys/fs/fuse/connections") and not is_mounted("/sys/fs/fuse/connections"):
        subprocess.run(["mount", "-t", "fusectl", "none", "/sys/fs/fuse/connections"], capture_output=True)


@pytest.fixture
def union_mount(tmp_path):
    """Factory: ``union_mount(lower=[...], upper=None, work=None, options=[])`` -> a started UnionMount.

    Every mount is stopped at the end of the test, and a test fails if the daemon logged an error.
    """
    mounts: list[UnionMount] = []

    def make(lower, upper=None, work=None, options=None, mnt=None):
        if mnt is None:
            mnt = tmp_path / f"mnt{len(mounts)}"
            mnt.mkdir()
        m = UnionMount(mnt, list(lower), upper, work, options, log=tmp_path / f"unionfs{len(mounts)}.log")
        mounts.append(m)
        return m.start()

    yield make
    errors = []
    for m in mounts:
        m.stop()
        errors += m.log_errors()
    assert not errors, "daemon logged errors:\n" + "\n".join(errors)


@pytest.fixture(autouse=True)
def _no_stale_mounts(tmp_path):
    yield
    stale = unmount_all_below(tmp_path)
    assert not stale, f"test left mounts behind: {stale}"


@pytest.fixture
def layers(tmp_path):
    """Factory for empty layer directories: ``layers(3)`` -> [top, ..., bottom]."""
    def make(n, prefix="layer"):
        out = []
        for i in range(n):
            p = tmp_path / f"{prefix}{i}"
            p.mkdir()
            out.append(p)
        return out
    return make
