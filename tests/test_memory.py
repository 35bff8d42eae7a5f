"""Bounded memory: the inode table honours FORGET, and over its budget it has the kernel forget
old lower-only directories, while the view stays what kernel overlayfs shows.

The daemon reports its table (nodes at the end, the most it held, names given back) in its
log at unmount; the kernel decides when FORGET comes, so these figures move only if the
kernel really dropped its entries.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from helpers import UnionMount, diff_snapshots, overlay_mount, snapshot

DIRS, FILES = 40, 60   # per layer: 2 x 40 x 60 files, merged in the same 40 directories


def _layers(tmp_path: Path) -> list[Path]:
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    for k, layer in enumerate((top, bottom)):
        for d in range(DIRS):
            path = layer / "tree" / f"d{d:02d}"
            path.mkdir(parents=True)
            subprocess.run(["touch"] + [f"f{k}-{i:03d}" for i in range(FILES)], cwd=path, check=True)
    (bottom / "tree" / "d00" / "data").write_bytes(b"bottom data\n" * 100)
    os.link(bottom / "tree" / "d00" / "data", bottom / "tree" / "d01" / "hardlink")
    os.symlink("../d00/data", bottom / "tree" / "d02" / "link")
    os.mknod(top / "tree" / "d03" / "f1-000", 0o20000 | 0o600, os.makedev(0, 0))   # a whiteout
    os.setxattr(top / "tree" / "d04", "trusted.overlay.opaque", b"y")
    return [top, bottom]


def _table(m: UnionMount) -> tuple[int, int, int]:
    found = re.findall(r"inode table: (\d+) nodes at the end, (\d+) at most; (\d+) names given back",
                       m.log.read_text())
    assert found, "the daemon logged no inode table figures"
    end, most, given = found[-1]
    return int(end), int(most), int(given)


def test_over_budget_the_view_stays_and_the_table_stays_bounded(tmp_path, union_mount):
    lower = _layers(tmp_path)
    expected_dir = tmp_path / "ovl"
    expected_dir.mkdir()
    with overlay_mount(expected_dir, lower):
        expected = snapshot(expected_dir)
    up, work = tmp_path / "upper", tmp_path / "work"
    up.mkdir()
    work.mkdir()
    m = union_mount(lower, up, work, options=["max_inodes=500"])
    held = open(m.mnt / "tree" / "d00" / "data", "rb")   # open across the shedding
    try:
        for _ in range(3):
            assert not diff_snapshots(expected, snapshot(m.mnt))
        assert held.read() == b"bottom data\n" * 100
        # A directory shed from the table takes a change through the mount as any other.
        (m.mnt / "tree" / "d01" / "new").write_bytes(b"new\n")
        os.chmod(m.mnt / "tree" / "d05" / "f0-001", 0o600)
        assert (up / "tree" / "d01" / "new").read_bytes() == b"new\n"
        assert os.stat(m.mnt / "tree" / "d05" / "f0-001").st_mode & 0o777 == 0o600
        assert os.stat(m.mnt / "tree" / "d00" / "data").st_ino == os.stat(m.mnt / "tree" / "d01" / "hardlink").st_ino
    finally:
        held.close()
    m.stop()
    end, most, given = _table(m)
    total = 2 * DIRS * FILES
    assert given > 0, "nothing was given back to the kernel"
    assert most < total // 2, f"the table held {most} nodes of {total}: the kernel forgot nothing"


def test_forget_empties_the_table(tmp_path, union_mount):
    """When the kernel drops its caches it forgets every unused inode: the table follows."""
    lower = _layers(tmp_path)
    m = union_mount(lower)
    seen = sum(1 for _ in (m.mnt / "tree").rglob("*"))
    assert seen > DIRS * FILES
    Path("/proc/sys/vm/drop_caches").write_text("2\n")
    m.stop()
    end, most, given = _table(m)
    assert most >= seen
    assert end < 50, f"{end} nodes left after the kernel forgot its inodes"
    assert given == 0   # under the budget nothing is shed


def test_bench_memory_runs(tmp_path):
    """scripts/bench_memory.py keeps running (small: 8,000 entries, two walks); no figure is judged."""
    import json
    import shutil
    import sys
    out = tmp_path / "memory.json"
    repo = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(repo / "scripts/bench_memory.py"), "--entries", "8000", "--walks", "2",
                        "--cache", str(tmp_path / "cache"), "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=repo)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert set(rows) == {"unionfs"} | ({"fuse-overlayfs"} if shutil.which("fuse-overlayfs") else set())
    for row in rows.values():
        assert row["entries"] > 8000 and len(row["rss_after_walk_kb"]) == 2 and row["peak_rss_kb"] > 0
