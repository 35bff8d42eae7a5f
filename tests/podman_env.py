"""podman with a private store, for tests: nothing touches the host's containers or images.

The vfs storage driver needs no mount program, cgroupfs and a file events log need no
systemd, and ``podman build --isolation chroot`` needs no runtime; ``load`` and ``save``
need none either.  Every podman process is waited for with a timeout.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

HAVE_PODMAN = bool(shutil.which("podman"))
needs_podman = pytest.mark.skipif(not HAVE_PODMAN, reason="podman is needed (scripts/setup --test installs it)")


class Podman:
    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.runroot = Path(tempfile.mkdtemp(prefix="unionfs-podman-"))  # podman wants it under 50 characters

    def cmd(self, *args: str) -> list[str]:
        b = self.base
        return ["podman", "--root", str(b / "root"), "--runroot", str(self.runroot), "--tmpdir", str(b / "tmp"),
                "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file", *args]

    def run(self, *args: str, timeout: float = 300) -> str:
        r = subprocess.run(self.cmd(*args), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
        return r.stdout

    def close(self) -> None:
        """Remove the private store: vfs layers are plain directories, nothing is mounted.  (Not
        ``podman system reset``, which also removes the host's networks.)"""
        shutil.rmtree(self.base, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)
