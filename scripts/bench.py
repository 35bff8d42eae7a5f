"""Benchmark unionfs against kernel overlayfs and fuse-overlayfs on one layer stack, side by side.

Builds a fixed stack once (cached under --cache): a bottom layer of files copied from
/usr, a middle layer that changes and deletes some of them (whiteouts, opaque dirs), a
top layer that adds files, a directory of many entries and one big file.  Then every
workload runs on every filesystem, each repetition on a fresh mount with an empty
upper dir, interleaved so that machine noise hits all of them alike.  Prints
min/median/max seconds and each median's ratio to kernel overlayfs; --json writes the
same.  Nothing here asserts a time: the smoke test only checks that it runs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import stat
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

SIZES = {
    #            bottom files, big dir entries, big file bytes, subtree files, creates
    "full": dict(files=30000, bigdir=100_000, blob=1 << 30, subtree=5000, creates=10_000, preads=20_000),
    "quick": dict(files=2000, bigdir=5000, blob=64 << 20, subtree=300, creates=500, preads=1000),
    "tiny": dict(files=300, bigdir=1000, blob=4 << 20, subtree=100, creates=100, preads=200),
}


# --- the layer stack ------------------------------------------------------------------

def build_stack(cache: Path, size: str) -> Path:
    p = SIZES[size]
    root = cache / f"stack-{size}"
    if (root / ".complete").exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    bottom, mid, top = root / "bottom", root / "mid", root / "top"
    for d in (bottom, mid, top):
        d.mkdir(parents=True)
    print(f"bench: building the {size} stack in {root} (once)", file=sys.stderr)
    files = subprocess.run(["find", "usr", "-xdev", "(", "-type", "f", "-o", "-type", "l", ")"], cwd="/",
                           capture_output=True, text=True, check=True).stdout.split("\n")
    files = sorted(f for f in files if f)[: p["files"]]
    listing = root / "files.txt"
    listing.write_text("\n".join(files) + "\n")
    subprocess.run(f"tar -C / --no-recursion -cf - -T {listing} | tar -C {bottom} -xf -", shell=True, check=True)
    sub = files[: p["subtree"]]
    (root / "subtree.txt").write_text("\n".join(sub) + "\n")
    for name in ("src", "rmme", "chmodme"):
        (bottom / name).mkdir()
        subprocess.run(f"tar -C / --no-recursion -cf - -T {root / 'subtree.txt'} | tar -C {bottom / name} -xf -",
                       shell=True, check=True)
    subprocess.run(f"tar -C / --no-recursion -cf {root / 'untar.tar'} -T {root / 'subtree.txt'}", shell=True,
                   check=True)
    big = bottom / "bigdir"
    big.mkdir()
    fd = os.open(big, os.O_RDONLY)
    for i in range(p["bigdir"]):
        os.close(os.open(f"entry{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
    os.close(fd)
    with open(bottom / "blob", "wb") as f:
        for _ in range(p["blob"] >> 20):
            f.write(os.urandom(1 << 20))
    # middle: change every 10th file, delete every 20th, replace a few dirs wholesale
    regular = [f for f in files if os.path.isfile(bottom / f) and not os.path.islink(bottom / f)]
    for i, f in enumerate(regular):
        if i % 10 == 0:
            (mid / f).parent.mkdir(parents=True, exist_ok=True)
            (mid / f).write_bytes(b"changed in the middle layer\n")
        elif i % 20 == 5:
            (mid / f).parent.mkdir(parents=True, exist_ok=True)
            os.mknod(mid / f, stat.S_IFCHR | 0o600, 0)
    dirs = sorted({os.path.dirname(f) for f in regular if f.count("/") >= 3})[:5]
    for d in dirs:
        (mid / d).mkdir(parents=True, exist_ok=True)
        os.setxattr(mid / d, "trusted.overlay.opaque", b"y")
        (mid / d / "replacement").write_text("opaque dir content\n")
    # top: new files, in new and in existing dirs
    for i in range(p["files"] // 15):
        d = top / "added" / f"d{i % 50}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(b"added on top\n" * 8)
    for f in regular[1::97]:
        (top / f).parent.mkdir(parents=True, exist_ok=True)
        (top / (f + ".new")).write_text("added next to a lower file\n")
    (root / ".complete").touch()
    return root


# --- filesystems ------------------------------------------------------------------------

def drop_caches() -> None:
    subprocess.run(["sync"])
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _wait_mounted(mnt: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    real = str(mnt.resolve())
    while time.monotonic() < deadline:
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == real for line in f):
                return
        time.sleep(0.01)
    raise RuntimeError(f"{mnt} did not mount")


@dataclass
class Mounted:
    name: str
    mnt: Path
    pid: int | None = None  # the daemon, for memory figures


class FS:
    name = "?"

    def __init__(self, stack: Path, scratch: Path) -> None:
        self.stack = stack
        self.scratch = scratch
        self.lowers = [stack / "top", stack / "mid", stack / "bottom"]

    def fresh(self) -> tuple[Path, Path, Path]:
        base = self.scratch / self.name
        if base.exists():
            subprocess.run(["rm", "-rf", str(base)], check=True)
        up, work, mnt = base / "upper", base / "work", base / "mnt"
        for d in (up, work, mnt):
            d.mkdir(parents=True)
        return up, work, mnt

    def lowerdir(self) -> str:
        return ":".join(str(p) for p in self.lowers)

    def mount(self) -> Mounted:
        raise NotImplementedError

    def umount(self, m: Mounted) -> None:
        subprocess.run(["umount", str(m.mnt)], capture_output=True)
        if m.pid:
            for _ in range(500):
                if not os.path.exists(f"/proc/{m.pid}"):
                    break
                time.sleep(0.01)


class Kernel(FS):
    name = "overlay"

    def mount(self) -> Mounted:
        up, work, mnt = self.fresh()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.lowerdir()},upperdir={up},workdir={work},index=on,redirect_dir=on",
                        str(mnt)], check=True)
        return Mounted(self.name, mnt)


class FuseOverlayfs(FS):
    name = "fuse-overlayfs"

    def mount(self) -> Mounted:
        up, work, mnt = self.fresh()
        subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={self.lowerdir()},upperdir={up},workdir={work}",
                        str(mnt)], check=True, capture_output=True)
        _wait_mounted(mnt)
        pid = subprocess.run(["pgrep", "-n", "-f", f"fuse-overlayfs.*{mnt}"], capture_output=True,
                             text=True).stdout.strip()
        return Mounted(self.name, mnt, int(pid) if pid else None)


class Unionfs(FS):
    name = "unionfs"

    def mount(self) -> Mounted:
        up, work, mnt = self.fresh()
        subprocess.run([PY, "-m", "unionfs", "mount", "--lower", self.lowerdir(), "--upper", str(up),
                        "--work", str(work), str(mnt)], check=True, cwd=REPO)
        pidfile = Path("/run/unionfs") / (str(mnt.resolve()).strip("/").replace("/", "%") + ".pid")
        return Mounted(self.name, mnt, int(pidfile.read_text()))


# --- workloads ------------------------------------------------------------------------------

def sh(cmd: str, cwd: Path, check: bool = True) -> None:
    subprocess.run(cmd, shell=True, cwd=cwd, check=check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                   if not check else None)


def walk(mnt: Path) -> int:
    """lstat every entry, like find(1): never follow a symlink (os.walk does, to classify them)."""
    n = 0
    stack = [os.fspath(mnt)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                try:
                    os.lstat(e.path)
                except FileNotFoundError:
                    continue  # kernel overlayfs lists some whiteouts it cannot stat
                n += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return n


@dataclass
class Workload:
    name: str
    run: object                   # fn(mnt, params) -> None
    prepare: object = None        # fn(mnt, params) -> None, untimed, after mount
    cold: bool = False            # drop caches after mounting


def _preads(mnt: Path, p: dict) -> None:
    rng = random.Random(1)
    fd = os.open(mnt / "blob", os.O_RDONLY)
    try:
        last = p["blob"] - 4096
        for _ in range(p["preads"]):
            os.pread(fd, 4096, rng.randrange(0, last) & ~4095)
    finally:
        os.close(fd)


def _creates(mnt: Path, p: dict) -> None:
    d = mnt / "created"
    d.mkdir()
    data = b"x" * 4096
    for i in range(p["creates"]):
        with open(d / f"f{i}", "wb") as f:
            f.write(data)


def _chmods(mnt: Path, p: dict) -> None:
    for dirpath, dirnames, filenames in os.walk(mnt / "chmodme"):
        for n in filenames:
            path = os.path.join(dirpath, n)
            if not os.path.islink(path):
                os.chmod(path, 0o600)


def _copy_up(mnt: Path, p: dict) -> None:
    with open(mnt / "blob", "ab") as f:
        f.write(b"!")


WORKLOADS = [
    Workload("walk cold (lstat all)", lambda m, p: walk(m), cold=True),
    Workload("walk warm (lstat all)", lambda m, p: walk(m), prepare=lambda m, p: walk(m)),
    Workload("ls -l bigdir", lambda m, p: sh("ls -l bigdir > /dev/null", m)),
    # du: kernel overlayfs lists some whiteouts it cannot stat, and du says so (exit 1)
    Workload("du -s", lambda m, p: sh("du -s . > /dev/null", m, check=False), prepare=lambda m, p: walk(m)),
    Workload("seq read blob", lambda m, p: sh("dd if=blob of=/dev/null bs=1M status=none", m)),
    Workload("seq read blob warm", lambda m, p: sh("dd if=blob of=/dev/null bs=1M status=none", m),
             prepare=lambda m, p: sh("dd if=blob of=/dev/null bs=1M status=none", m)),
    Workload("random 4K preads", _preads),
    Workload("tar cf subtree", lambda m, p: sh("tar cf /dev/null src", m)),
    Workload("create 4K files", _creates),
    Workload("write new big file", lambda m, p: sh(
        f"dd if=/dev/zero of=newblob bs=1M count={p['blob'] >> 20} conv=fsync status=none", m)),
    Workload("copy-up big file", _copy_up),
    Workload("chmod lower files", _chmods),
    Workload("rm -rf lower subtree", lambda m, p: sh("rm -rf rmme", m)),
    Workload("untar into mount", lambda m, p: sh(f"mkdir untar && tar -C untar -xf {p['stack']}/untar.tar", m)),
]


def rss_kb(pid: int | None, field_name: str = "VmRSS") -> int | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (under two minutes)")
    ap.add_argument("--size", choices=sorted(SIZES), help="stack size (default full, or quick with --quick)")
    ap.add_argument("--repeat", type=int, default=None, help="repetitions per figure (default 5, quick 3)")
    ap.add_argument("--only", action="append", help="run workloads whose name contains this (repeatable)")
    ap.add_argument("--fs", action="append", choices=["overlay", "fuse-overlayfs", "unionfs"],
                    help="filesystems to run (default all)")
    ap.add_argument("--cache", default="/var/tmp/unionfs-bench", help="where the layer stack is built once")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: run as root (it mounts filesystems and drops caches)", file=sys.stderr)
        return 2
    size = args.size or ("quick" if args.quick else "full")
    repeat = args.repeat or (2 if size == "quick" else 1 if size == "tiny" else 5)
    cache = Path(args.cache)
    stack = build_stack(cache, size)
    p = dict(SIZES[size], stack=stack)
    scratch = cache / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    classes = [Kernel, FuseOverlayfs, Unionfs]
    if args.fs:
        classes = [c for c in classes if c.name in args.fs]
    if FuseOverlayfs in classes and not shutil.which("fuse-overlayfs"):
        classes.remove(FuseOverlayfs)
    systems = [c(stack, scratch) for c in classes]
    workloads = [w for w in WORKLOADS if not args.only or any(o in w.name for o in args.only)]
    times: dict[str, dict[str, list[float]]] = {w.name: {s.name: [] for s in systems} for w in workloads}
    memory: dict[str, dict] = {}
    for w in workloads:
        for r in range(repeat):
            for s in systems:  # interleaved: noise hits every filesystem alike
                m = s.mount()
                try:
                    if w.prepare:
                        w.prepare(m.mnt, p)
                    if w.cold:
                        drop_caches()
                    before = rss_kb(m.pid)
                    t0 = time.perf_counter()
                    w.run(m.mnt, p)
                    times[w.name][s.name].append(time.perf_counter() - t0)
                    if w.name.startswith("walk cold") and r == 0 and m.pid:
                        entries = walk(m.mnt)
                        after = rss_kb(m.pid)
                        memory[s.name] = {"rss_before_walk_kb": before, "rss_after_walk_kb": after,
                                          "peak_rss_kb": rss_kb(m.pid, "VmHWM"), "entries": entries,
                                          "bytes_per_entry": round((after - before) * 1024 / entries)
                                          if before and after else None}
                finally:
                    s.umount(m)
            print(f"bench: {w.name}: round {r + 1}/{repeat} done", file=sys.stderr)
    # report
    ref = "overlay" if any(s.name == "overlay" for s in systems) else systems[0].name
    results = []
    print(f"\nstack: {size} ({p['files']} files from /usr + {p['bigdir']} entry dir + "
          f"{p['blob'] >> 20} MiB file), {repeat} runs, seconds min/median/max, ratio = median / {ref} median\n")
    head = f"{'workload':26}" + "".join(f"{s.name:>34}" for s in systems)
    print(head)
    for w in workloads:
        row = f"{w.name:26}"
        ref_med = statistics.median(times[w.name][ref])
        for s in systems:
            t = times[w.name][s.name]
            med = statistics.median(t)
            ratio = med / ref_med if ref_med else float("nan")
            row += f"{min(t):>9.3f}/{med:.3f}/{max(t):.3f} {ratio:5.2f}x"
            results.append({"workload": w.name, "fs": s.name, "runs": t, "min": min(t), "median": med,
                            "max": max(t), "ratio_to_" + ref: ratio})
        print(row)
    if memory:
        print("\nmemory (daemon, first cold walk):")
        for name, mem in memory.items():
            print(f"  {name:16} " + ", ".join(f"{k}={v}" for k, v in mem.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "repeat": repeat, "params": SIZES[size],
                                               "results": results,
                                               "memory": memory}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
