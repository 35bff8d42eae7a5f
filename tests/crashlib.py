"""Crash safety, shared by tests/test_crash.py and scripts/crash-test.

A scenario is a lower stack and a list of steps (each one syscall-level operation through the
mount: a rename, an unlink, a copy-up...).  A reference run mounts with every changing syscall
the daemon makes on a layer counted (tests/inject.py), and snapshots the merged view before and
after each step: S0..Sk.  Then, for a crash point n, a fresh upper dir is mounted by a daemon
that SIGKILLs itself just before its n-th changing syscall; the steps run until one fails (the
daemon died under it: step j).  The dead mount is unmounted with ``unionfs umount`` (the
"Transport endpoint is not connected" case), a normal daemon mounts the upper dir again, and:

* the work dir's temporary area is empty (cleaned at mount);
* the view is S_j or S_{j+1}: the interrupted step happened entirely or not at all;
* the remaining steps, run from there, give the reference S_{j+1}.. Sk (nothing half-done
  gets in the way of later operations), and the daemon logs no error.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from helpers import UnionMount, force_unmount, is_mounted, snapshot, unionfs_cmd  # noqa: E402
from inject import InjectedMount  # noqa: E402


def _w(p: Path, data: bytes = b"", mode: int = 0o644) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.chmod(p, mode)


def _create(p: Path) -> None:
    os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))


def _append(p: Path, data: bytes) -> None:
    with open(p, "ab") as f:
        f.write(data)


@dataclass
class Scenario:
    name: str
    build: Callable[[Path], None]              # fills the lower layer
    steps: list[tuple[str, Callable[[Path], None]]] = field(default_factory=list)
    options: list[str] = field(default_factory=list)   # unionfs -o options


def _lower_tree(lower: Path) -> None:
    _w(lower / "d/a", b"a" * 100)
    _w(lower / "d/sub/c", b"c")
    _w(lower / "f", b"file f")
    _w(lower / "g", b"file g")
    _w(lower / "o/x", b"x")
    _w(lower / "o/y", b"y")
    (lower / "empty").mkdir()
    _w(lower / "h1", b"linked", 0o640)
    os.link(lower / "h1", lower / "h2")
    os.setxattr(lower / "f", "user.tag", b"lower")
    os.chmod(lower / "d", 0o2755)


def _three_links(lower: Path) -> None:
    _lower_tree(lower)
    os.link(lower / "h1", lower / "h3")


def _big(lower: Path, size: int = 24 << 20) -> None:
    _lower_tree(lower)
    _w(lower / "big", os.urandom(1 << 20) * (size >> 20))


SCENARIOS = [
    Scenario("rename-dirs", _lower_tree, [
        ("rename lower dir (redirect)", lambda m: os.rename(m / "d", m / "e")),
        ("rename nested lower dir out", lambda m: os.rename(m / "e/sub", m / "sub2")),
        ("write into the moved dir", lambda m: _append(m / "sub2/c", b"+")),
        ("rename it back over an empty lower dir", lambda m: os.rename(m / "sub2", m / "empty")),
    ]),
    Scenario("whiteouts", _lower_tree, [
        ("unlink lower file (whiteout)", lambda m: os.unlink(m / "f")),
        ("copy up g", lambda m: _append(m / "g", b"+")),
        ("unlink copied-up g (whiteout over upper)", lambda m: os.unlink(m / "g")),
        ("rmdir lower empty dir", lambda m: os.rmdir(m / "empty")),
        ("create over a whiteout", lambda m: _create(m / "f")),
        ("rename file over a lower file", lambda m: os.rename(m / "f", m / "d/a")),
    ]),
    Scenario("opaque", _lower_tree, [
        ("unlink o/x", lambda m: os.unlink(m / "o/x")),
        ("unlink o/y", lambda m: os.unlink(m / "o/y")),
        ("rmdir o", lambda m: os.rmdir(m / "o")),
        ("mkdir o (opaque)", lambda m: os.mkdir(m / "o")),
        ("create o/new", lambda m: _create(m / "o/new")),
        ("chmod lower file (metadata copy-up)", lambda m: os.chmod(m / "d/a", 0o600)),
    ]),
    Scenario("hardlinks", _lower_tree, [
        ("write h1 (copy-up through the index)", lambda m: _append(m / "h1", b"+")),
        ("link h2 -> h3", lambda m: os.link(m / "h2", m / "h3")),
        ("unlink h1", lambda m: os.unlink(m / "h1")),
        ("write h3", lambda m: _append(m / "h3", b"!")),
    ]),
    Scenario("hardlinks-lower-names", _three_links, [
        ("write h1 (copy-up through the index)", lambda m: _append(m / "h1", b"+")),
        ("unlink h1", lambda m: os.unlink(m / "h1")),
        ("unlink h2 (a name only in the lower layer)", lambda m: os.unlink(m / "h2")),
        ("rename g over h3 (the last name)", lambda m: os.rename(m / "g", m / "h3")),
    ]),
    Scenario("metacopy", _big, [
        ("chmod the 24 MiB lower file (metadata only)", lambda m: os.chmod(m / "big", 0o600)),
        ("rename it (a redirect to its data)", lambda m: os.rename(m / "big", m / "d/big2")),
        ("append (its data copied up in place)", lambda m: _append(m / "d/big2", b"!")),
        ("chmod another", lambda m: os.chmod(m / "g", 0o640)),
        ("truncate that one (its data up, cut)", lambda m: os.truncate(m / "g", 1)),
    ], options=["metacopy=on"]),
    Scenario("large-copy-up", _big, [
        ("append to a 24 MiB lower file", lambda m: _append(m / "big", b"!")),
        ("truncate it", lambda m: os.truncate(m / "big", 1000)),
    ]),
]


class Failure(AssertionError):
    pass


def _clean(*dirs: Path) -> None:
    for d in dirs:
        if d.exists():
            subprocess.run(["rm", "-rf", str(d)], check=True)
        d.mkdir(parents=True)


def _unmount_dead(mnt: Path) -> None:
    """The daemon is dead: ``unionfs umount`` must cope ("Transport endpoint is not connected")."""
    r = subprocess.run(unionfs_cmd("umount", str(mnt)), capture_output=True, text=True, timeout=60)
    if r.returncode != 0 or is_mounted(mnt):
        force_unmount(mnt)
        raise Failure(f"unionfs umount of a dead mount failed: {r.stderr.strip()}")


class Runner:
    """Runs one scenario in ``base`` (a scratch directory)."""

    def __init__(self, scenario: Scenario, base: Path) -> None:
        self.sc = scenario
        self.base = base
        self.lower, self.upper, self.work, self.mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
        _clean(self.lower, self.mnt)
        scenario.build(self.lower)
        self.lower_snap = snapshot(self.lower)
        self.ref: list[dict] = []
        self.bounds: list[int] = []   # crash points 1..bounds[j] fall in steps 0..j
        self.points = 0
        self.mounts = 0
        self.kernel_check = False  # also mount kernel overlayfs over (a copy of) each crashed state

    def _mount(self, spec: dict | None = None) -> UnionMount:
        self.mounts += 1
        log = self.base / "log"
        if spec is None:
            return UnionMount(self.mnt, [self.lower], self.upper, self.work, self.sc.options, log=log).start()
        # Crash points are counted syscalls, the same in every run only without the writeback
        # cache: with it the kernel decides when (and how often) it sends a file's times.  The
        # mounts that check a crashed state and replay the rest run with it (the default).
        m = InjectedMount(self.mnt, [self.lower], self.upper, self.work, [*self.sc.options, "writeback=0"], log=log,
                          spec=spec)
        return m.start()

    def reference(self) -> None:
        _clean(self.upper, self.work)
        trace = self.base / "trace"
        trace.unlink(missing_ok=True)
        m = self._mount({"trace": str(trace)})
        try:
            self.ref = [snapshot(self.mnt)]
            for _, step in self.sc.steps:
                step(self.mnt)
                self.ref.append(snapshot(self.mnt))
                self.bounds.append(len(trace.read_text().splitlines()))
        finally:
            m.stop()
        self.points = len(trace.read_text().splitlines())
        m = self._mount()
        try:
            if snapshot(self.mnt) != self.ref[-1]:
                raise Failure(f"{self.sc.name}: the final state did not survive a remount")
        finally:
            m.stop()

    def crash_at(self, n: int) -> tuple[int, bool]:
        """Crash at point n; check; returns (step interrupted, whether it had happened)."""
        _clean(self.upper, self.work)
        (self.base / "log").unlink(missing_ok=True)
        m = self._mount({"crash_at": n})
        done = len(self.sc.steps)
        try:
            for j, (_, step) in enumerate(self.sc.steps):
                try:
                    step(self.mnt)
                except OSError as e:
                    if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
                        raise Failure(f"{self.sc.name}@{n}: step {j} failed with {e!r}") from None
                    done = j
                    break
            m.proc.wait(timeout=30)
        except BaseException:
            m.stop()
            raise
        if done == len(self.sc.steps):
            m.stop()
            raise Failure(f"{self.sc.name}@{n}: the daemon did not crash (point beyond the scenario)")
        _unmount_dead(self.mnt)
        m.proc = None
        kernel = kernel_view(self.lower, self.upper, self.work, self.base,
                             [o for o in self.sc.options if o == "metacopy=on"]) if self.kernel_check else None
        m = self._mount()
        try:
            leftovers = os.listdir(self.work / "work")
            if leftovers:
                raise Failure(f"{self.sc.name}@{n}: work dir not cleaned at mount: {leftovers}")
            now = snapshot(self.mnt)
            if kernel is not None and kernel != now:
                from helpers import diff_snapshots
                raise Failure(f"{self.sc.name}@{n}: kernel overlayfs (index=on) over the crashed upper and "
                              "work dir shows another tree:\n  " + "\n  ".join(diff_snapshots(now, kernel)[:10]))
            if now == self.ref[done]:
                happened = False
            elif now == self.ref[done + 1]:
                happened = True
            else:
                from helpers import diff_snapshots
                raise Failure(f"{self.sc.name}@{n}: step {done} ({self.sc.steps[done][0]}) is half done:\n  "
                              + "\n  ".join(diff_snapshots(self.ref[done], now)[:10]))
            for j in range(done + happened, len(self.sc.steps)):
                self.sc.steps[j][1](self.mnt)
                if snapshot(self.mnt) != self.ref[j + 1]:
                    raise Failure(f"{self.sc.name}@{n}: after the crash, step {j} "
                                  f"({self.sc.steps[j][0]}) gives a different tree")
        finally:
            m.stop()
        errors = m.log_errors()
        if errors:
            raise Failure(f"{self.sc.name}@{n}: daemon errors after the crash: {errors[:5]}")
        if snapshot(self.lower) != self.lower_snap:
            raise Failure(f"{self.sc.name}@{n}: the lower layer changed")
        return done, happened


def kernel_view(lower: Path, upper: Path, work: Path, base: Path, options: list[str] = ()) -> dict:
    """What kernel overlayfs with index=on,redirect_dir=on (and ``options``: ``metacopy=on`` for a
    metacopy upper dir, which it refuses to follow without) shows over a copy of ``upper`` and
    ``work`` (a copy: its mount rewrites the work dir, and the crashed state must stay as it was
    for our own mount).  One ``cp -a`` keeps the links between the upper dir and the index."""
    from difftest import without_private_xattrs
    from helpers import overlay_mount
    scratch = base / "kernel"
    _clean(scratch)
    subprocess.run(["cp", "-a", str(upper), str(work), str(scratch)], check=True, timeout=60)
    mnt = scratch / "mnt"
    mnt.mkdir()
    with overlay_mount(mnt, [lower], scratch / upper.name, scratch / work.name,
                       ",".join(["index=on,redirect_dir=on", *options])):
        return without_private_xattrs(snapshot(mnt, skip_unstatable=True))


# --- commit to the store ----------------------------------------------------------------------

COMMIT_KILLER = """
import os, signal, sys
n = int(os.environ["CRASH_RENAME_AT"])
count = [0]
for name in ("rename", "replace"):
    real = getattr(os, name)
    def counted(*a, _real=real, **k):
        count[0] += 1
        if count[0] >= n:
            os.kill(os.getpid(), signal.SIGKILL)
        return _real(*a, **k)
    setattr(os, name, counted)
from unionfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def store_state(root: Path) -> dict:
    """What the store says: images with their layers and tags, and the leftovers."""
    import json
    images = {}
    for name in sorted(os.listdir(root / "images")):
        rec = json.loads((root / "images" / name).read_text())
        images[name] = [d["diff_id"] for d in rec["layers"]]
    return {"images": images, "tags": json.loads((root / "repositories.json").read_text())
            if (root / "repositories.json").exists() else {},
            "layers": sorted(os.listdir(root / "layers"))}


def commit_crash(root: Path, container: str, tag: str, n: int | None, delay: float | None = None) -> str:
    """Run ``unionfs commit`` killed before its n-th rename (or after ``delay`` seconds, or never).

    Returns "killed" or "completed"."""
    env = dict(os.environ, CRASH_RENAME_AT=str(n if n is not None else 1 << 30))
    proc = subprocess.Popen([sys.executable, "-c", COMMIT_KILLER, "--root", str(root), "commit", container, tag],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    if delay is not None:
        time.sleep(delay)
        proc.kill()
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        return "completed"
    if proc.returncode == -9:
        return "killed"
    raise Failure(f"commit failed: {err.decode()}")


def check_store_after(root: Path, before: dict, tag: str, run) -> bool:
    """After a killed commit: the next writer cleans up; every image is whole (its layers are there,
    no layer without an image), the tags are the old ones or the old ones plus ``tag``.
    A commit killed between the image record and the tag leaves a whole, untagged image (Docker's
    ``<none>``), by design: records appear in order, layers, image, tag. Returns whether it happened."""
    run("images")              # a reader: must not trip on anything
    # a writer (takes the lock, cleans tmp/ and unreferenced layers): tag and untag a scratch name
    run("tag", "app:1", "scratch:1")
    run("rmi", "scratch:1")
    after = store_state(root)
    leftovers = os.listdir(root / "tmp")
    if leftovers:
        raise Failure(f"store tmp/ not cleaned: {leftovers}")
    used = {d.removeprefix("sha256:") for layers in after["images"].values() for d in layers}
    if set(after["layers"]) != used:
        raise Failure(f"layers not matching images: {after}")
    for image, layers in before["images"].items():
        if after["images"].get(image) != layers:
            raise Failure(f"image {image} changed by a commit: {after}")
    happened = tag in after["tags"]
    if {k: v for k, v in after["tags"].items() if k != tag} != before["tags"]:
        raise Failure(f"tags changed: {before['tags']} -> {after['tags']}")
    if not happened and len(after["images"]) > len(before["images"]) + 1:
        raise Failure(f"more than one new image: {after}")
    return happened
