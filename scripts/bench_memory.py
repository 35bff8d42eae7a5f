"""The benchmark's memory rows: a daemon's peak RSS while ``find`` walks a 1,000,000-entry stack.

Builds once (under the bench cache) a stack of four lower layers that share directories, made
cheaply of empty files: every directory merges all four layers, so each name is resolved
across the stack as in a real image.  Then, for each FUSE filesystem, it mounts the stack, runs
``find`` over it five times and reports the daemon's RSS before, after the first walk and
after the fifth, and its peak (VmHWM): a daemon that holds only what the kernel holds must not
grow from the first walk to the fifth.  Nothing here asserts: it prints figures.

    bench_memory.py [--entries N] [--walks N] [--fs unionfs --fs fuse-overlayfs] [--cache DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the mounts and RSS helpers of the main benchmark)

LAYERS = 4
PER_DIR = 1000   # files per directory per layer


def build_million(cache: Path, entries: int) -> Path:
    """LAYERS layers; directory dNNNN exists in all of them, each adding PER_DIR empty files."""
    root = cache / f"million-{entries}"
    if (root / ".complete").exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    dirs = max(1, entries // (LAYERS * PER_DIR))
    print(f"bench_memory: building {dirs * LAYERS * PER_DIR} files in {root} (once)", file=sys.stderr)
    for k in range(LAYERS):
        layer = root / f"l{k}"
        layer.mkdir(parents=True)
        for d in range(dirs):
            path = layer / f"d{d // 100:03d}" / f"d{d:05d}"
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for i in range(PER_DIR):
                    os.close(os.open(f"f{k}-{i:04d}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
            finally:
                os.close(fd)
    (root / ".complete").touch()
    return root


class _Stack(bench.FS):
    """Any of bench's filesystems over the million stack instead of the usual one."""

    def __init__(self, cls: type, stack: Path, scratch: Path) -> None:
        self.inner = cls(stack, scratch)
        self.inner.lowers = [stack / f"l{k}" for k in range(LAYERS)]
        self.name = cls.name

    def mount(self, debug_log=None):
        return self.inner.mount()

    def umount(self, m) -> None:
        self.inner.umount(m)


def find(mnt: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    out = subprocess.run(["find", ".", "-printf", "x"], cwd=mnt, capture_output=True, check=True).stdout
    return len(out), time.perf_counter() - t0


def measure(fs: bench.FS, walks: int) -> dict:
    m = fs.mount()
    try:
        row: dict = {"rss_start_kb": bench.rss_kb(m.pid), "walks_s": [], "rss_after_walk_kb": []}
        for _ in range(walks):
            n, secs = find(m.mnt)
            row["entries"] = n
            row["walks_s"].append(round(secs, 2))
            row["rss_after_walk_kb"].append(bench.rss_kb(m.pid))
        row["peak_rss_kb"] = bench.rss_kb(m.pid, "VmHWM")
        first, last = row["rss_after_walk_kb"][0], row["rss_after_walk_kb"][-1]
        if first and row["rss_start_kb"]:
            row["bytes_per_entry"] = round((first - row["rss_start_kb"]) * 1024 / row["entries"])
        if first and last:
            row["growth_kb"] = last - first
        return row
    finally:
        fs.umount(m)


def run(cache: Path, entries: int, walks: int, names: list[str]) -> dict[str, dict]:
    """{daemon: row} for each of ``names`` that is installed, one after the other."""
    stack = build_million(cache, entries)
    scratch = cache / "scratch-memory"
    scratch.mkdir(parents=True, exist_ok=True)
    classes = {c.name: c for c in (bench.FuseOverlayfs, bench.Floor, bench.Unionfs)}
    rows = {}
    for name in names:
        if name == "fuse-overlayfs" and not shutil.which("fuse-overlayfs"):
            continue
        rows[name] = r = measure(_Stack(classes[name], stack, scratch), walks)
        print(f"{name:16} entries={r['entries']} peak_rss={r['peak_rss_kb'] / 1024:.1f} MiB "
              f"start={r['rss_start_kb'] / 1024:.1f} MiB after walks (MiB)="
              f"{[round(x / 1024, 1) for x in r['rss_after_walk_kb']]} "
              f"B/entry={r.get('bytes_per_entry')} walk s={r['walks_s']}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--walks", type=int, default=5)
    ap.add_argument("--fs", action="append", choices=["fuse-overlayfs", "floor", "unionfs"])
    ap.add_argument("--cache", default="/var/tmp/unionfs-bench")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_memory: run as root (it mounts filesystems)", file=sys.stderr)
        return 2
    rows = run(Path(args.cache), args.entries, args.walks, args.fs or ["unionfs", "fuse-overlayfs"])
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
