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
import tempfile
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
UNIONFS = str(Path(PY).with_name("unionfs"))   # the venv's entry point, as podman calls it

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


def _wait_mounted(mnt: Path, timeout: float = 30, proc: subprocess.Popen | None = None) -> None:
    """Until mnt is a FUSE mount that answers (polled every ms: this is also the mount-latency row)."""
    deadline = time.monotonic() + timeout
    real = str(mnt.resolve())
    while time.monotonic() < deadline:
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == real and " - fuse" in line for line in f):
                os.stat(mnt)   # answered: INIT is done
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{mnt}: the daemon exited ({proc.returncode}) before mounting")
        time.sleep(0.001)
    raise RuntimeError(f"{mnt} did not mount")


@dataclass
class Mounted:
    name: str
    mnt: Path
    pid: int | None = None  # the daemon, for memory figures
    proc: subprocess.Popen | None = None   # a daemon in the foreground (request counts, floor)
    under: Path | None = None  # the floor's kernel overlay mount below it


class FS:
    name = "?"

    def __init__(self, stack: Path, scratch: Path) -> None:
        self.stack = stack
        self.scratch = scratch
        self.lowers = [stack / "top", stack / "mid", stack / "bottom"]

    def fresh(self) -> tuple[Path, Path, Path]:
        base = self.scratch / self.name
        for left in (base / "mnt", base / "merged"):   # never remove through a mount left behind
            while _is_mounted(left):
                subprocess.run(["umount", "-l", str(left)], check=True)
        if base.exists():
            subprocess.run(["rm", "-rf", "--one-file-system", str(base)], check=True)
        up, work, mnt = base / "upper", base / "work", base / "mnt"
        for d in (up, work, mnt):
            d.mkdir(parents=True)
        return up, work, mnt

    def lowerdir(self) -> str:
        return ":".join(str(p) for p in self.lowers)

    fuse = True   # a FUSE daemon whose requests can be counted

    def mount(self, debug_log: Path | None = None) -> Mounted:
        """Mounted and ready; with ``debug_log``, in the foreground with libfuse's debug output there."""
        raise NotImplementedError

    def umount(self, m: Mounted) -> None:
        subprocess.run(["umount", str(m.mnt)], capture_output=True)
        _wait_gone(m)


def _is_mounted(path: Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def _wait_gone(m: Mounted) -> None:
    if m.proc is not None:
        try:
            m.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            m.proc.kill()
            m.proc.wait()
    elif m.pid:
        for _ in range(3000):
            if not _alive(m.pid):
                break
            time.sleep(0.001)


def _alive(pid: int) -> bool:
    """Running: a zombie has exited (this machine's init may reap daemons late)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _foreground(argv: list[str], mnt: Path, log: Path | None) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=out, cwd=REPO)
    if log:
        out.close()
    _wait_mounted(mnt, proc=proc)
    return proc


def _kernel_overlay(lowerdir: str, up: Path, work: Path, mnt: Path, extra: str = "") -> None:
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lowerdir},upperdir={up},workdir={work},index=on,redirect_dir=on{extra}",
                    str(mnt)], check=True)


class Kernel(FS):
    name = "overlay"
    fuse = False
    extra = ""

    def mount(self, debug_log: Path | None = None) -> Mounted:
        up, work, mnt = self.fresh()
        _kernel_overlay(self.lowerdir(), up, work, mnt, self.extra)
        return Mounted(self.name, mnt)


class KernelMetacopy(Kernel):
    """Kernel overlayfs with metacopy=on: chmod/chown/utimes/xattrs of lower files copy no data."""
    name = "overlay-metacopy"
    extra = ",metacopy=on"


class FuseOverlayfs(FS):
    name = "fuse-overlayfs"

    def mount(self, debug_log: Path | None = None) -> Mounted:
        up, work, mnt = self.fresh()
        argv = ["fuse-overlayfs", "-o", f"lowerdir={self.lowerdir()},upperdir={up},workdir={work}", str(mnt)]
        if debug_log:
            proc = _foreground(argv[:1] + ["-d"] + argv[1:], mnt, debug_log)
            return Mounted(self.name, mnt, proc.pid, proc)
        subprocess.run(argv, check=True, capture_output=True)   # returns once mounted, as podman waits for it
        pid = subprocess.run(["pgrep", "-n", "-f", f"fuse-overlayfs.*{mnt}"], capture_output=True,
                             text=True).stdout.strip()
        return Mounted(self.name, mnt, int(pid) if pid else None)


class Unionfs(FS):
    """``unionfs -o lowerdir=... MNT`` as podman calls it (``style="mount"``: ``unionfs mount --lower``)."""
    name = "unionfs"
    style = "o"
    extra = ""   # more -o options (a --variant)
    program = UNIONFS   # another build's with --baseline

    def mount(self, debug_log: Path | None = None) -> Mounted:
        up, work, mnt = self.fresh()
        more = ["-o", self.extra] if self.extra else []
        if self.style == "o":
            argv = [self.program, "-o", f"lowerdir={self.lowerdir()},upperdir={up},workdir={work}", *more, str(mnt)]
        else:
            argv = [self.program, "mount", "--lower", self.lowerdir(), "--upper", str(up), "--work", str(work), *more,
                    str(mnt)]
        if debug_log:   # libfuse's debug output: one line per request, its opcode named
            argv = [self.program, "mount", "-f", "-o", "debug", *more, "--lower", self.lowerdir(), "--upper", str(up),
                    "--work", str(work), str(mnt)]
            proc = _foreground(argv, mnt, debug_log)
            return Mounted(self.name, mnt, proc.pid, proc)
        subprocess.run(argv, check=True, cwd=REPO)
        pidfile = Path("/run/unionfs") / (str(mnt.resolve()).strip("/").replace("/", "%") + ".pid")
        return Mounted(self.name, mnt, int(pidfile.read_text()))

    def umount(self, m: Mounted) -> None:
        if m.proc is not None:
            super().umount(m)
        else:
            subprocess.run([self.program, "umount", str(m.mnt)], check=True, capture_output=True)
            _wait_gone(m)


class UnionfsMetacopy(Unionfs):
    """unionfs with -o metacopy=on (fs/metacopy.py)."""
    name = "unionfs-metacopy"
    extra = "metacopy=on"


class Floor(FS):
    """pyfuse3 passthrough (scripts/bench_floor.py) of a kernel overlay mount: pyfuse3's cost, none of ours."""
    name = "floor"

    def mount(self, debug_log: Path | None = None) -> Mounted:
        up, work, mnt = self.fresh()
        under = mnt.parent / "merged"
        under.mkdir()
        _kernel_overlay(self.lowerdir(), up, work, under)
        argv = [PY, str(REPO / "scripts" / "bench_floor.py"), str(under), str(mnt)] + (["debug"] if debug_log else [])
        proc = _foreground(argv, mnt, debug_log)
        return Mounted(self.name, mnt, proc.pid, proc, under)

    def umount(self, m: Mounted) -> None:
        super().umount(m)
        subprocess.run(["umount", str(m.under)], capture_output=True)


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
    run: object                   # fn(mnt, params) -> None, or the figure itself (seconds) to record
    prepare: object = None        # fn(mnt, params) -> None, untimed, after mount
    cold: bool = False            # drop caches after mounting
    kind: str = "run"             # "run": time run(); "mount"/"umount": time the mount/umount itself


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


def _chmod_blob(mnt: Path, p: dict) -> None:
    os.chmod(mnt / "blob", 0o600)   # a copy-up of the whole big file, or (metacopy) of its metadata only


def _copy_up(mnt: Path, p: dict) -> None:
    with open(mnt / "blob", "ab") as f:
        f.write(b"!")


def _readers_during_copy_up(mnt: Path, p: dict) -> float:
    """The longest wait of two readers (stat + read of lower files not looked up yet) during a big copy-up."""
    import threading
    names = [f for f in (p["stack"] / "files.txt").read_text().split("\n") if f][::7]
    done = threading.Event()
    waits: list[float] = []

    def reader(part: list[str]) -> None:
        worst = 0.0
        i = 0
        while not done.is_set() and i < len(part):
            t0 = time.perf_counter()
            try:
                with open(mnt / part[i], "rb") as f:
                    f.read(4096)
            except OSError:
                pass
            worst = max(worst, time.perf_counter() - t0)
            i += 1
            time.sleep(0.002)
        waits.append(worst)
    readers = [threading.Thread(target=reader, args=(names[k::2],)) for k in range(2)]
    for t in readers:
        t.start()
    time.sleep(0.05)
    _copy_up(mnt, p)
    done.set()
    for t in readers:
        t.join()
    return max(waits)


WORKLOADS = [
    Workload("mount to ready", None, kind="mount"),
    Workload("umount", None, kind="umount"),
    Workload("walk cold (lstat all)", lambda m, p: walk(m), cold=True),
    Workload("walk warm (lstat all)", lambda m, p: walk(m), prepare=lambda m, p: walk(m)),
    Workload("ls -l bigdir", lambda m, p: sh("ls -l bigdir > /dev/null", m)),
    # du: kernel overlayfs lists some whiteouts it cannot stat, and du says so (exit 1)
    Workload("du -s", lambda m, p: sh("du -s . > /dev/null", m, check=False), prepare=lambda m, p: walk(m)),
    Workload("seq read blob", lambda m, p: sh("dd if=blob of=/dev/null bs=1M status=none", m)),
    Workload("seq read blob warm", lambda m, p: sh("dd if=blob of=/dev/null bs=1M status=none", m),
             prepare=lambda m, p: sh("dd if=blob of=/dev/null bs=1M status=none", m)),
    Workload("random 4K preads", _preads),
    Workload("random 4K preads warm", _preads, prepare=_preads),   # the same offsets again: the page cache
    Workload("tar cf subtree", lambda m, p: sh("tar cf /dev/null src", m)),
    Workload("create 4K files", _creates),
    Workload("write new big file", lambda m, p: sh(
        f"dd if=/dev/zero of=newblob bs=1M count={p['blob'] >> 20} conv=fsync status=none", m)),
    Workload("copy-up big file", _copy_up),
    Workload("chmod lower files", _chmods),
    Workload("chmod big lower file", _chmod_blob),
    Workload("rm -rf lower subtree", lambda m, p: sh("rm -rf rmme", m)),
    Workload("untar into mount", lambda m, p: sh(f"mkdir untar && tar -C untar -xf {p['stack']}/untar.tar", m)),
    Workload("readers' worst wait in copy-up", _readers_during_copy_up),
]


def _count_opcodes(data: bytes) -> dict[str, int]:
    """Requests by opcode in libfuse's debug output (one "opcode: NAME" line per request)."""
    import re
    ops: dict[str, int] = {}
    for match in re.finditer(rb"opcode: (\w+)", data):
        op = match[1].decode()
        ops[op] = ops.get(op, 0) + 1
    return ops


def count_requests(systems: list[FS], workloads: list[Workload], p: dict, scratch: Path) -> dict:
    """{workload: {fs: {opcode: n}}}: one untimed run each with libfuse's debug output, the run's part only."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for w in workloads:
        if w.kind != "run":
            continue
        for s in systems:
            log = scratch / f"{s.name}.debug.log"
            m = s.mount(debug_log=log)
            try:
                if w.prepare:
                    w.prepare(m.mnt, p)
                if w.cold:
                    drop_caches()
                start = log.stat().st_size
                w.run(m.mnt, p)
                os.sync()
                time.sleep(0.2)   # the last replies' lines
                end = log.stat().st_size
            finally:
                s.umount(m)
            with open(log, "rb") as f:
                f.seek(start)
                ops = _count_opcodes(f.read(end - start))
            log.unlink()
            counts.setdefault(w.name, {})[s.name] = ops
        print(f"bench: {w.name}: requests counted", file=sys.stderr)
    return counts


# --- whole-tool rows ---------------------------------------------------------------------

def _timed(argv: list[str], **kw) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600, **kw)
    return time.perf_counter() - t0


def _big_image(cache: Path) -> Path:
    """An OCI layout of three layers from this machine's /usr/lib (about 230 MB unpacked), made by umoci; built once."""
    layout = cache / "big-image"
    if (layout / ".complete").exists():
        return layout
    shutil.rmtree(layout, ignore_errors=True)
    bundle = cache / "big-image-bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", f"{layout}:big"], check=True)
    for src in ("/usr/lib/python3.11", "/usr/lib/python3", "/usr/lib/gcc"):
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:big", str(bundle)], check=True,
                       stdout=subprocess.DEVNULL)
        dest = bundle / "rootfs" / os.path.dirname(src).lstrip("/")
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", src, str(dest)], check=True)
        subprocess.run(["umoci", "repack", "--image", f"{layout}:big", str(bundle)], check=True)
        shutil.rmtree(bundle)
    subprocess.run(["tar", "-C", str(layout), "-cf", str(cache / "big-image.tar"), "."], check=True)
    (layout / ".complete").touch()
    return layout


DPKG_ROW = "podman run: dpkg -i of real debs"
# Real packages that dpkg -i takes alone in a minbase rootfs: every dependency is in minbase or in the set.
DPKG_PACKAGES = ("less", "file", "libmagic1", "libmagic-mgc", "bzip2", "xz-utils", "gzip")
DEBIAN_MIRROR = "http://deb.debian.org/debian"   # this machine's mirror (/etc/apt/sources.list.d)


def _debian_rootfs(cache: Path) -> Path | str:
    """A minbase Debian 12 rootfs made by debootstrap, built once; or why it cannot be ("no debootstrap")."""
    root = cache / "debian-12-minbase"
    done = cache / "debian-12-minbase.complete"   # outside the rootfs: it is imported as is
    if done.exists():
        return root
    if not shutil.which("debootstrap"):
        return "no debootstrap"
    _remove_rootfs(root)
    print(f"bench: debootstrap of Debian 12 minbase into {root} (once)", file=sys.stderr)
    try:
        r = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root), DEBIAN_MIRROR],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=1800)
    finally:
        _unmount_below(root)   # debootstrap's /proc and /sys in the target, if it stopped half-way
    if r.returncode != 0:
        return f"debootstrap failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}"
    done.touch()
    return root


def _unmount_below(root: Path) -> None:
    real = os.path.realpath(root)
    with open("/proc/self/mountinfo") as f:
        below = [line.split()[4] for line in f]
    for m in sorted((m for m in below if m == real or m.startswith(real + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True)


def _remove_rootfs(root: Path) -> None:
    """A half-made rootfs, never through a mount left in it (debootstrap mounts /proc there)."""
    if root.exists():
        _unmount_below(root)
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=True)


def _dpkg_debs(cache: Path) -> Path | str:
    """DPKG_PACKAGES as .debs from the host's apt (apt-get download), fetched once; or why they cannot be."""
    debs = cache / "dpkg-debs"
    done = cache / "dpkg-debs.complete"
    if done.exists():
        return debs
    shutil.rmtree(debs, ignore_errors=True)
    debs.mkdir(parents=True)
    r = subprocess.run(["apt-get", "download", *DPKG_PACKAGES], cwd=debs, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=600)
    if r.returncode != 0:
        return f"apt-get download failed: {r.stderr.strip().splitlines()[-1:]}"
    done.touch()
    return debs


def _dpkg_row(work: Path, cache: Path, repeat: int, podman_cls, programs: dict[str, str],
              skipped: dict[str, str], requests: dict | None = None) -> dict[str, list[float]]:
    """``dpkg -i`` of DPKG_PACKAGES in a Debian 12 container (the debs bind-mounted read-only), once per
    mount program in each round, interleaved; {} and a reason in ``skipped`` when it cannot run.
    With ``requests``, one more run each with its FUSE requests counted there ({program: {opcode: n}})."""
    rootfs = _debian_rootfs(cache)
    debs = _dpkg_debs(cache) if not isinstance(rootfs, str) else rootfs
    if isinstance(debs, str):
        skipped[DPKG_ROW] = debs
        return {}
    podmans = {n: podman_cls(work / f"pm-dpkg-{i}", prog) for i, (n, prog) in enumerate(programs.items())}
    row: dict[str, list[float]] = {n: [] for n in podmans}
    argv = ("run", "--rm", "-v", f"{debs}:/debs:ro", "deb:12", "sh", "-c", "dpkg -i /debs/*.deb >/dev/null")
    try:
        for pm in podmans.values():
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "--one-file-system", "-c", "."], stdout=subprocess.PIPE)
            r = subprocess.run(["podman", "import", "-", "deb:12"], stdin=tar.stdout, env=pm.env, cwd=pm.base,
                               capture_output=True, timeout=600)
            tar.stdout.close()
            assert tar.wait() == 0 and r.returncode == 0, f"podman import: {r.stderr.decode()[-500:]}"
            pm(*argv)   # warm, and proof that dpkg takes the set alone
        for _ in range(max(repeat, 3)):
            for n, pm in podmans.items():
                t0 = time.perf_counter()
                pm(*argv)
                row[n].append(time.perf_counter() - t0)
        if requests is not None:
            for n, pm in podmans.items():
                requests[n] = _tool_requests(pm, argv, work / "requests")
    finally:
        for pm in podmans.values():
            pm.close()
    return row


# A mount_program that runs PROGRAM with libfuse's debug output (-d: in the foreground, both
# fuse-overlayfs and unionfs) into LOGDIR, in the background, and returns once the mount is there.
DEBUG_MOUNT_PROGRAM = """#!/bin/sh
for mnt; do :; done
{program} -d "$@" </dev/null >/dev/null 2>"{logdir}/$$.log" &
pid=$!
i=0
until mountpoint -q "$mnt"; do
    kill -0 $pid 2>/dev/null || exit 1
    i=$((i + 1)); [ $i -lt 3000 ] || exit 1
    sleep 0.01
done
"""


def _tool_requests(pm, argv: tuple[str, ...], logdir: Path) -> dict[str, int]:
    """FUSE requests by opcode of one more ``podman ARGV`` on store ``pm``, its mounts through
    DEBUG_MOUNT_PROGRAM; the store mounts through its own program again after."""
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir(parents=True)
    wrapper = logdir.with_suffix(".sh")
    wrapper.write_text(DEBUG_MOUNT_PROGRAM.format(program=pm.program, logdir=logdir))
    wrapper.chmod(0o755)
    program = pm.program
    pm.use_program(str(wrapper))
    try:
        pm(*argv)
    finally:
        pm.use_program(program)
    time.sleep(0.3)   # the daemons' last lines (podman has unmounted: they are exiting)
    ops: dict[str, int] = {}
    for log in logdir.glob("*.log"):
        for op, n in _count_opcodes(log.read_bytes()).items():
            ops[op] = ops.get(op, 0) + n
    shutil.rmtree(logdir, ignore_errors=True)
    wrapper.unlink()
    return ops


def run_tool_rows(cache: Path, repeat: int, p: dict, only: list[str] | None = None,
                  skipped: dict[str, str] | None = None, baseline: str | None = None,
                  requests: dict | None = None) -> dict[str, dict[str, list[float]]]:
    """Rows that time whole tools, interleaved: podman with each mount program; loading a 100 MB image.
    With ``only`` (--only), the podman rows if one names them ("podman"), the dpkg row if one says "dpkg",
    the load row if one says "load"; with ``baseline`` (--baseline), its unionfs as one more mount program
    of the podman rows, "unionfs-base"; with ``requests`` (--requests), each podman row's FUSE requests by
    opcode in one more run per mount program ({row: {program: {opcode: n}}}).  A row that cannot run gets
    its reason in ``skipped``."""
    sys.path.insert(0, str(REPO / "tests"))
    from podman_env import FUSE_OVERLAYFS, Podman, write_image
    rows: dict[str, dict[str, list[float]]] = {}
    work = cache / "tools"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if shutil.which("podman") and (not only or any(o in "podman run --rm IMAGE true; podman run: 300 files written"
                                                    for o in only)):
        archive = work / "bb.tar"
        write_image(archive, "bb:1")
        podmans = {"fuse-overlayfs": Podman(work / "pm-fo", FUSE_OVERLAYFS), "unionfs": Podman(work / "pm-u", UNIONFS)}
        if baseline:
            podmans["unionfs-base"] = Podman(work / "pm-ub", baseline)
        try:
            for pm in podmans.values():
                pm("load", "-i", str(archive))
                pm("run", "--rm", "bb:1", "true")   # warm: the first run sets up the store
            runs = {"podman run --rm IMAGE true": ("run", "--rm", "bb:1", "true"),
                    "podman run: 300 files written": ("run", "--rm", "bb:1", "sh", "-c",
                                                      "cp -a /bin /tmp/b && cat /etc/* >/dev/null 2>&1; true")}
            for name in runs:
                rows.setdefault(name, {n: [] for n in podmans})
            for _ in range(max(repeat, 3)):
                for n, pm in podmans.items():
                    for name, argv in runs.items():
                        t0 = time.perf_counter()
                        pm(*argv)
                        rows[name][n].append(time.perf_counter() - t0)
            if requests is not None:
                for name, argv in runs.items():
                    requests[name] = {n: _tool_requests(pm, argv, work / "requests") for n, pm in podmans.items()}
        finally:
            for pm in podmans.values():
                pm.close()
    if shutil.which("podman") and (not only or any(o in DPKG_ROW for o in only)):
        dpkg_requests = {} if requests is not None else None
        dpkg = _dpkg_row(work, cache, repeat, Podman, {"fuse-overlayfs": FUSE_OVERLAYFS, "unionfs": UNIONFS,
                                                        **({"unionfs-base": baseline} if baseline else {})},
                         skipped if skipped is not None else {}, dpkg_requests)
        if dpkg:
            rows[DPKG_ROW] = dpkg
            if dpkg_requests:
                requests[DPKG_ROW] = dpkg_requests
    if only and not any(o in "load" for o in only):
        return rows
    layout = _big_image(cache)
    row = rows.setdefault(f"load {_du_mb(layout)} MB OCI image", {"podman load": [], "umoci unpack": [],
                                                                    "unionfs load": []})
    for _ in range(max(repeat, 3)):
        pm = Podman(work / "pm-load")
        try:
            row["podman load"].append(_timed(["podman", "load", "-i", str(cache / "big-image.tar")], env=pm.env))
        finally:
            pm.close()
        shutil.rmtree(work / "bundle", ignore_errors=True)
        row["umoci unpack"].append(_timed(["umoci", "unpack", "--image", f"{layout}:big", str(work / "bundle")]))
        shutil.rmtree(work / "bundle", ignore_errors=True)
        shutil.rmtree(work / "store", ignore_errors=True)
        row["unionfs load"].append(_timed([UNIONFS, "--root", str(work / "store"), "load", str(layout)]))
        shutil.rmtree(work / "store", ignore_errors=True)
    return rows


def _du_mb(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) >> 20


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
    ap.add_argument("--requests", action="store_true",
                    help="also count each workload's FUSE requests by opcode (one more, untimed, run each; "
                         "the podman rows' through a mount_program wrapper that runs each program with -d)")
    ap.add_argument("--tools", action=argparse.BooleanOptionalAction, default=None,
                    help="the whole-tool rows: podman run with each mount program, load against podman load "
                         "and umoci unpack (default: on, off with --size tiny)")
    ap.add_argument("--cold-start", action=argparse.BooleanOptionalAction, default=None,
                    help="the cold start from a registry rows (scripts/bench_lazy.py: run --lazy against pull + run "
                         "and podman run, through a 4 MB/s loopback link; default: with --tools)")
    ap.add_argument("--fs", action="append", choices=["overlay", "overlay-metacopy", "fuse-overlayfs", "floor",
                                                       "unionfs", "unionfs-metacopy"],
                    help="filesystems to run (default: all but the -metacopy ones)")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=OPTS",
                    help="also run unionfs with more -o options, as its own column named unionfs-LABEL "
                         "(e.g. wb0=writeback=0; repeatable)")
    ap.add_argument("--baseline", metavar="PROGRAM",
                    help="also run another build's unionfs (e.g. the main tree's venv/bin/unionfs), as the "
                         "column unionfs-base (and each --variant on it as unionfs-base-LABEL), and as one more "
                         "mount program of the whole-tool podman rows: before and after in one run")
    ap.add_argument("--cache", default="/var/tmp/unionfs-bench", help="where the layer stack is built once")
    ap.add_argument("--million", action="store_true",
                    help="also the memory rows of scripts/bench_memory.py: peak RSS over five finds of 1M entries")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench: run as root (it mounts filesystems and drops caches)", file=sys.stderr)
        return 2
    size = args.size or ("quick" if args.quick else "full")
    repeat = args.repeat or (2 if size == "quick" else 1 if size == "tiny" else 5)
    cache = Path(args.cache)
    workloads = [w for w in WORKLOADS if not args.only or any(o in w.name for o in args.only)]
    # no stack to build when --only names whole-tool rows alone
    stack = build_stack(cache, size) if workloads else cache / f"stack-{size}"
    p = dict(SIZES[size], stack=stack)
    scratch = cache / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    cold_start = args.cold_start
    if args.tools is None:
        args.tools = size != "tiny"
        if cold_start is None:
            cold_start = args.tools
        # the dpkg row builds a Debian rootfs once: at --size tiny only when --only asks for it
        args.tools = args.tools or bool(args.only and any(o in DPKG_ROW for o in args.only))
    elif cold_start is None:
        cold_start = args.tools
    classes = [Kernel, FuseOverlayfs, Floor, Unionfs]
    if args.fs:
        classes = [c for c in (Kernel, KernelMetacopy, FuseOverlayfs, Floor, Unionfs, UnionfsMetacopy)
                   if c.name in args.fs]
    if FuseOverlayfs in classes and not shutil.which("fuse-overlayfs"):
        classes.remove(FuseOverlayfs)
    systems = [c(stack, scratch) for c in classes]
    if args.baseline:
        systems.append(type("UnionfsBase", (Unionfs,), {"name": "unionfs-base", "program": args.baseline})(
            stack, scratch))
    for v in args.variant:
        label, _, opts = v.partition("=")
        systems.append(type(f"Unionfs_{label}", (Unionfs,), {"name": f"unionfs-{label}", "extra": opts})(
            stack, scratch))
        if args.baseline:   # the same options on the other build: before and after of the variant too
            systems.append(type(f"UnionfsBase_{label}", (Unionfs,), {
                "name": f"unionfs-base-{label}", "extra": opts, "program": args.baseline})(stack, scratch))
    times: dict[str, dict[str, list[float]]] = {w.name: {s.name: [] for s in systems} for w in workloads}
    memory: dict[str, dict] = {}
    for w in workloads:
        for r in range(repeat):
            for s in systems:  # interleaved: noise hits every filesystem alike
                t0 = time.perf_counter()
                m = s.mount()
                if w.kind == "mount":
                    os.stat(m.mnt)   # ready means answering
                    times[w.name][s.name].append(time.perf_counter() - t0)
                try:
                    if w.kind != "run":
                        continue
                    if w.prepare:
                        w.prepare(m.mnt, p)
                    if w.cold:
                        drop_caches()
                    before = rss_kb(m.pid)
                    t0 = time.perf_counter()
                    figure = w.run(m.mnt, p)
                    times[w.name][s.name].append(figure if isinstance(figure, float) else time.perf_counter() - t0)
                    if w.name.startswith("walk cold") and r == 0 and m.pid:
                        entries = walk(m.mnt)
                        after = rss_kb(m.pid)
                        memory[s.name] = {"rss_before_walk_kb": before, "rss_after_walk_kb": after,
                                          "peak_rss_kb": rss_kb(m.pid, "VmHWM"), "entries": entries,
                                          "bytes_per_entry": round((after - before) * 1024 / entries)
                                          if before and after else None}
                finally:
                    t0 = time.perf_counter()
                    s.umount(m)
                    if w.kind == "umount":
                        times[w.name][s.name].append(time.perf_counter() - t0)
            print(f"bench: {w.name}: round {r + 1}/{repeat} done", file=sys.stderr)
    requests = count_requests([s for s in systems if s.fuse], workloads, p, scratch) if args.requests else {}
    # report
    ref = "overlay" if any(s.name == "overlay" for s in systems) else systems[0].name
    names = [s.name for s in systems]
    results = []
    if workloads:   # none with --only naming whole-tool rows alone
        print(f"\nstack: {size} ({p['files']} files from /usr + {p['bigdir']} entry dir + "
              f"{p['blob'] >> 20} MiB file), {repeat} runs, seconds min/median/max; unionfs's median as a ratio "
              f"to each other's median (x{ref}, x fuse-overlayfs, x floor)\n")
        print(f"{'workload':32}" + "".join(f"{n:>26}" for n in names) + "".join(
            f"{'u/' + (n[8:] if n.startswith('unionfs-') else n)[:5]:>9}" for n in names if n != "unionfs"))
    for w in workloads:
        row = f"{w.name:32}"
        meds = {n: statistics.median(times[w.name][n]) for n in names}
        for n in names:
            t = times[w.name][n]
            row += f"{min(t):>8.3f}/{meds[n]:.3f}/{max(t):.3f}"
            results.append({"workload": w.name, "fs": n, "runs": t, "min": min(t), "median": meds[n],
                            "max": max(t), "ratio_to_" + ref: meds[n] / meds[ref] if meds[ref] else None,
                            **{f"ratio_to_{o}": meds[n] / meds[o] for o in names if o != n and meds[o]}})
        if "unionfs" in meds:
            row += "".join(f"{meds['unionfs'] / meds[n] if meds[n] else float('nan'):>8.2f}x"
                           for n in names if n != "unionfs")
        print(row)
    if requests:
        print("\nFUSE requests per run of each workload (libfuse's debug output; the biggest opcodes)")
        for w in workloads:
            if w.name not in requests:
                continue
            print(f"  {w.name}")
            for n, ops in requests[w.name].items():
                top = ", ".join(f"{op} {c}" for op, c in sorted(ops.items(), key=lambda x: -x[1])[:6])
                print(f"    {n:16} {sum(ops.values()):>9}  {top}")
    skipped: dict[str, str] = {}
    tool_requests: dict[str, dict[str, dict[str, int]]] = {}
    tool_rows = run_tool_rows(cache, repeat, p, args.only, skipped, args.baseline,
                                                            tool_requests if args.requests else None) if args.tools else {}
    if tool_rows or skipped:
        print("\nwhole-tool rows (seconds min/median/max; ratio to the row's first)")
        for row_name, by in tool_rows.items():
            first = statistics.median(next(iter(by.values())))
            for n, t in by.items():
                med = statistics.median(t)
                print(f"  {row_name:34} {n:28} {min(t):8.3f}/{med:.3f}/{max(t):.3f} {med / first:6.2f}x")
        for row_name, why in skipped.items():
            print(f"  {row_name:34} skipped: {why}")
    if tool_requests:
        print("\nFUSE requests per run of each whole-tool row (libfuse's debug output; the biggest opcodes)")
        for row_name, by in tool_requests.items():
            print(f"  {row_name}")
            for n, ops in by.items():
                top = ", ".join(f"{op} {c}" for op, c in sorted(ops.items(), key=lambda x: -x[1])[:8])
                print(f"    {n:16} {sum(ops.values()):>9}  {top}")
    if args.million:
        print("\nmemory over five finds of a 1,000,000-entry stack (scripts/bench_memory.py):")
        # Its own process (it imports this script for the mounts, so it is not imported here).
        out = Path(tempfile.mkdtemp(prefix="million-", dir=scratch)) / "rows.json"
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_memory.py")), "--cache", str(cache),
                        "--json", str(out)], check=True)
        memory["million"] = json.loads(out.read_text())
        shutil.rmtree(out.parent, ignore_errors=True)
    cold_rows = {}
    if cold_start:
        import bench_lazy   # scripts/ is on the path: this script's own directory
        work = Path(tempfile.mkdtemp(prefix="cold-", dir=scratch))
        try:
            cold_rows = bench_lazy.cold_start(work, 4.0, 100 if size == "full" else 20, repeat,
                                              lambda m: print(m, file=sys.stderr))
        finally:
            bench_lazy.cleanup(work)
        print("\n" + bench_lazy.report(cold_rows))
    if memory:
        print("\nmemory (daemon, first cold walk):")
        for name, mem in memory.items():
            if name != "million":   # printed as it ran
                print(f"  {name:16} " + ", ".join(f"{k}={v}" for k, v in mem.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"size": size, "repeat": repeat, "params": SIZES[size],
                                               "results": results, "requests": requests,
                                               "tool_rows": tool_rows, "tool_rows_skipped": skipped,
                                               "tool_requests": tool_requests,
                                               "cold_start": cold_rows,
                                               "memory": memory}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
