"""An unprivileged user for the rootless tests: created once, run with a clean environment.

The machine is prepared as a normal Debian system is for its users: ``/dev/fuse`` 0666 (a udev
rule does it there; here it is 0600), and the interpreter reachable (a pyenv below ``/root`` gets a search ACL for the user). Each change is
undone at the end of the session, also when a test fails.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil

import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from helpers import UnionMount, unmount_all_below

USER = "unionfs-rt"


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path
    runtime: Path    # XDG_RUNTIME_DIR
    data: Path       # XDG_DATA_HOME: the store is data/unionfs

    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
                "PATH": os.path.dirname(sys.executable) + ":/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                "XDG_RUNTIME_DIR": str(self.runtime), "XDG_DATA_HOME": str(self.data), "LANG": "C.UTF-8"}

    def argv(self, argv: list[str]) -> list[str]:
        """``argv`` as this user: no capabilities, own groups only, a clean environment."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--reset-env",
                "env", "-i", *(f"{k}={v}" for k, v in self.env().items()), *argv]

    def run(self, argv: list[str], cwd: str | os.PathLike | None = None, check: bool = True,
            timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(self.argv(argv), cwd=cwd, capture_output=True, timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise AssertionError(f"{argv} as {self.name} exited {p.returncode}: "
                                 f"{p.stderr.decode(errors='replace')[-3000:]}")
        return p

    def unionfs(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-m", "unionfs", *args], **kw)

    def python(self, code: str, *args: str, **kw) -> subprocess.CompletedProcess:
        tests = os.path.dirname(os.path.abspath(__file__))
        return self.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {tests!r})\n" + code, *args], **kw)


def _ensure_user() -> tuple[int, int, Path]:
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--user-group", USER],
                       check=True, capture_output=True, timeout=60)
        pw = pwd.getpwnam(USER)
    _ensure_subids(USER)
    return pw.pw_uid, pw.pw_gid, Path(pw.pw_dir)


SUBIDS = (100000, 65536)


def _ensure_subids(name: str) -> None:
    """Subordinate ids for the user, as useradd gives them on Debian (kept, like the user)."""
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            lines = Path(path).read_text().splitlines()
        except FileNotFoundError:
            lines = []
        if not any(line.split(":")[0] == name for line in lines):
            with open(path, "a") as f:
                f.write(f"{name}:{SUBIDS[0]}:{SUBIDS[1]}\n")


@contextlib.contextmanager
def edited(path: str, edit):
    """``path`` with its text changed by ``edit`` for a while, put back as it was after."""
    p = Path(path)
    before = p.read_text() if p.exists() else None
    p.write_text(edit(before or ""))
    try:
        yield
    finally:
        if before is None:
            p.unlink()
        else:
            p.write_text(before)


def user_allow_other():
    """/etc/fuse.conf with ``user_allow_other`` (a container of the user's with other users needs it)."""
    return edited("/etc/fuse.conf", lambda text: text + "\nuser_allow_other\n")


@contextlib.contextmanager
def _dev_fuse_for_all():
    mode = os.stat("/dev/fuse").st_mode & 0o7777
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


@contextlib.contextmanager
def _interpreter_reachable(uid: int):
    """Directories above the interpreter the user cannot search get an ACL entry, removed after."""
    added = []
    for d in (Path(sys.executable).parents, Path(os.path.realpath(sys.executable)).parents):
        for p in d:
            if os.stat(p).st_mode & 0o001 == 0 and str(p) not in added:
                subprocess.run(["setfacl", "-m", f"u:{uid}:x", str(p)], check=True, capture_output=True)
                added.append(str(p))
    try:
        yield
    finally:
        for p in added:
            subprocess.run(["setfacl", "-x", f"u:{uid}", str(p)], capture_output=True)


@contextlib.contextmanager
def rootless_user():
    """The session's user, with a fresh home, runtime and data dir below a private /tmp dir."""
    uid, gid, home = _ensure_user()
    base = Path(tempfile.mkdtemp(prefix="unionfs-rootless-"))
    os.chmod(base, 0o755)
    user = User(USER, uid, gid, home, base / "run", base / "data")
    for d in (user.runtime, user.data):
        d.mkdir(mode=0o700)
        os.chown(d, uid, gid)
    try:
        with _dev_fuse_for_all(), _interpreter_reachable(uid):
            yield user
    finally:
        unmount_all_below(base)
        subprocess.run(["pkill", "-KILL", "-u", str(uid)], capture_output=True)  # daemons of this user only
        shutil.rmtree(base, ignore_errors=True)


def user_dir(user: User, base: Path, name: str) -> Path:
    """A directory the user owns (test dirs below /tmp/pytest-of-root are not searchable by it)."""
    p = base / name
    p.mkdir(parents=True, exist_ok=True)
    os.chown(p, user.uid, user.gid)
    return p


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give a tree built as root to the user, modes (setuid bits) kept."""
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [dirpath] + [os.path.join(dirpath, x) for x in dirnames + filenames]:
            st = os.lstat(n)
            os.lchown(n, uid, gid)
            if not os.path.islink(n):
                os.chmod(n, st.st_mode & 0o7777)


class UserMount(UnionMount):
    """A unionfs daemon the user starts (in the foreground), through fusermount3."""

    def __init__(self, user: User, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.user = user

    def spawn(self, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(self.user.argv([sys.executable, "-m", "unionfs", *args]),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
