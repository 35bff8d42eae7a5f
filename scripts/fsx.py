"""fsx for unionfs: random read/write/truncate/mmap/fallocate/fsync/reopen on files that start in a lower
layer, through a real mount, checked against an in-memory model.

After every operation the file's size is checked, and the bytes an operation changed are read back;
every read (read(2) or through a mapping) is compared; every --full-every operations and at each reopen
the whole file is compared; every --remount-every operations everything is closed, the mount is
restarted, and the files are compared through the mount and in the upper dir.

    scripts/fsx [--ops N] [--seed S] [--files F] [--maxlen BYTES] [--remount-every K]
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import mmap
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import UnionMount, force_unmount, is_mounted  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


class Mismatch(Exception):
    pass


class Fsx:
    def __init__(self, base: Path, seed: int, files: int, maxlen: int, log=print) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.maxlen = maxlen
        self.base = base
        self.log = log
        self.lower, self.upper, self.work, self.mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
        for d in (self.lower, self.upper, self.work, self.mnt):
            d.mkdir(parents=True)
        self.names = [f"file{i}" for i in range(files)]
        self.model: dict[str, bytearray] = {}
        for n in self.names:
            data = self.rng.randbytes(self.rng.randrange(maxlen))
            (self.lower / n).write_bytes(data)
            self.model[n] = bytearray(data)
        self.fds: dict[str, tuple[int, bool]] = {}
        self.counts: Counter = Counter()
        self.ops = 0
        self.mismatches = 0
        self.m: UnionMount | None = None

    # --- mount -----------------------------------------------------------------------
    def mount(self) -> None:
        self.m = UnionMount(self.mnt, [self.lower], self.upper, self.work, log=self.base / "unionfs.log").start()

    def unmount(self) -> None:
        for n in list(self.fds):
            self._close(n)
        if self.m is not None:
            self.m.stop()
            self.m = None

    # --- helpers ---------------------------------------------------------------------
    def _fd(self, name: str, write: bool) -> int:
        cur = self.fds.get(name)
        if cur is not None and (cur[1] or not write):
            return cur[0]
        if cur is not None:
            self._close(name)
        fd = os.open(self.mnt / name, os.O_RDWR if write else os.O_RDONLY)
        self.fds[name] = (fd, write)
        return fd

    def _close(self, name: str) -> None:
        fd, _ = self.fds.pop(name)
        os.close(fd)

    def fail(self, what: str) -> None:
        self.mismatches += 1
        raise Mismatch(f"seed {self.seed} op {self.ops}: {what}")

    def _expect(self, name: str, off: int, got: bytes, what: str) -> None:
        want = bytes(self.model[name][off:off + len(got)])
        if got != want:
            i = next(i for i in range(len(got)) if i >= len(want) or got[i] != want[i])
            self.fail(f"{what} {name} at {off}+{len(got)}: first difference at {off + i}")

    def _check_range(self, name: str, off: int, length: int) -> None:
        fd = self._fd(name, False)
        size = os.fstat(fd).st_size
        if size != len(self.model[name]):
            self.fail(f"{name}: size {size}, model {len(self.model[name])}")
        got = os.pread(fd, length, off)
        want = bytes(self.model[name][off:off + length])
        if got != want:
            self._expect(name, off, got, "read back")

    def check_all(self, where: Path | None = None) -> None:
        for n in self.names:
            if where is None:
                fd = self._fd(n, False)
                got = os.pread(fd, len(self.model[n]) + 1, 0)
            else:
                got = (where / n).read_bytes()
            if got != bytes(self.model[n]):
                self._expect(n, 0, got, f"whole file ({where or 'mount'})")
                if len(got) != len(self.model[n]):
                    self.fail(f"{n}: length {len(got)}, model {len(self.model[n])}")

    # --- operations ------------------------------------------------------------------
    def op(self) -> None:
        r = self.rng
        name = r.choice(self.names)
        model = self.model[name]
        size = len(model)
        kind = r.choices(["read", "write", "mapread", "mapwrite", "truncate", "ftruncate", "posix_fallocate",
                          "fallocate", "fsync", "reopen"], [20, 20, 10, 10, 5, 5, 4, 2, 3, 3])[0]
        self.ops += 1
        self.counts[kind] += 1
        off = r.randrange(self.maxlen)
        length = r.randrange(1, 1 + r.choice([16, 4096, 65536]))
        changed: tuple[int, int] | None = None
        if kind == "read":
            fd = self._fd(name, False)
            self._expect(name, off, os.pread(fd, length, off), "read")
        elif kind == "write":
            fd = self._fd(name, True)
            data = r.randbytes(length)
            if os.pwrite(fd, data, off) != length:
                self.fail("short write")
            if off > size:
                model.extend(bytes(off - size))
            model[off:off + length] = data
            changed = (min(off, size), off + length - min(off, size))
        elif kind in ("mapread", "mapwrite"):
            if size == 0:
                self.counts[kind] -= 1
                return
            off, length = r.randrange(size), min(length, size)
            length = min(length, size - off)
            fd = self._fd(name, kind == "mapwrite")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if kind == "mapwrite" else 0)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
            try:
                if kind == "mapread":
                    self._expect(name, off, mm[off:off + length], "mapped read")
                else:
                    data = r.randbytes(length)
                    mm[off:off + length] = data
                    model[off:off + length] = data
                    if r.random() < 0.3:
                        mm.flush()
                    changed = (off, length)
            finally:
                mm.close()
        elif kind in ("truncate", "ftruncate"):
            new = r.randrange(self.maxlen) if r.random() < 0.8 else 0
            if kind == "truncate":
                os.truncate(self.mnt / name, new)
            else:
                os.ftruncate(self._fd(name, True), new)
            if new < size:
                del model[new:]
            else:
                model.extend(bytes(new - size))
            changed = (max(0, min(new, size) - 16), 32)
        elif kind == "posix_fallocate":
            os.posix_fallocate(self._fd(name, True), off, length)
            if off + length > size:
                model.extend(bytes(off + length - size))
            changed = (off, length)
        elif kind == "fallocate":
            fd = self._fd(name, True)
            if _libc.fallocate(fd, 0, off, length) == 0:
                if off + length > size:
                    model.extend(bytes(off + length - size))
            elif ctypes.get_errno() != errno.EOPNOTSUPP:
                self.fail(f"fallocate: {os.strerror(ctypes.get_errno())}")
            else:
                self.counts["fallocate EOPNOTSUPP"] += 1
            changed = (off, length)
        elif kind == "fsync":
            if name in self.fds:
                os.fsync(self.fds[name][0])
        elif kind == "reopen":
            if name in self.fds:
                self._close(name)
            self._fd(name, r.random() < 0.5)
            self.check_all()
        if changed is not None:
            self._check_range(name, changed[0], changed[1])
        else:
            fd = self._fd(name, False)
            if os.fstat(fd).st_size != len(model):
                self.fail(f"{name}: size {os.fstat(fd).st_size}, model {len(model)}")


def run(ops: int, seed: int, files: int, maxlen: int, remount_every: int, full_every: int,
        base: Path | None = None, log=print) -> Fsx:
    own = base is None
    base = Path(tempfile.mkdtemp(prefix="unionfs-fsx-")) if own else base
    f = Fsx(base, seed, files, maxlen, log)
    remounts = 0
    try:
        f.mount()
        while f.ops < ops:
            f.op()
            if f.ops % full_every == 0:
                f.check_all()
            if remount_every and f.ops % remount_every == 0:
                f.unmount()
                f.check_all(f.upper)           # everything in the upper dir after unmount
                f.mount()
                f.check_all()
                remounts += 1
        f.check_all()
        f.unmount()
        f.check_all(f.upper)
        f.counts["remounts"] = remounts
        errs = []
        log_file = base / "unionfs.log"
        if log_file.exists():
            errs = [l for l in log_file.read_text().splitlines() if " ERROR " in l or "Traceback" in l]
        if errs:
            raise Mismatch(f"daemon errors: {errs[:3]}")
    finally:
        if f.m is not None:
            f.m.stop()
        if is_mounted(f.mnt):
            force_unmount(f.mnt)
        if own:
            subprocess.run(["rm", "-rf", str(base)])
    return f


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--maxlen", type=int, default=256 * 1024)
    ap.add_argument("--remount-every", type=int, default=10_000)
    ap.add_argument("--full-every", type=int, default=200)
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    t0 = time.monotonic()
    print(f"fsx: seed {seed}, {a.ops} ops on {a.files} lower files of up to {a.maxlen} bytes", flush=True)
    try:
        f = run(a.ops, seed, a.files, a.maxlen, a.remount_every, a.full_every)
    except Mismatch as e:
        print(f"MISMATCH: {e}")
        return 1
    dt = time.monotonic() - t0
    print(f"{f.ops} ops in {dt:.1f}s ({f.ops / dt:.0f}/s), 0 mismatches")
    for k, v in sorted(f.counts.items()):
        print(f"  {k:22} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
