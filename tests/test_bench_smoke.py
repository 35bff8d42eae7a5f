"""The benchmark must keep running: tiny sizes, one round, every workload on every filesystem,
the floor included, and the request counts of each FUSE daemon.

No time is asserted here (speed lives in scripts/bench); only that each figure exists.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_runs(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts/bench.py"), "--size", "tiny", "--repeat", "1",
                        "--cache", str(tmp_path / "cache"), "--json", str(out), "--requests",
                        "--only", "mount", "--only", "walk", "--only", "ls -l", "--only", "create", "--only", "copy-up"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    fuse = {"floor", "unionfs"} | ({"fuse-overlayfs"} if shutil.which("fuse-overlayfs") else set())
    systems = {"overlay"} | fuse
    seen = {(x["workload"], x["fs"]) for x in data["results"]}
    workloads = {x["workload"] for x in data["results"]}
    assert {"mount to ready", "walk cold (lstat all)", "readers' worst wait in copy-up"} <= workloads
    assert seen == {(w, s) for w in workloads for s in systems}
    assert all(x["min"] > 0 for x in data["results"])
    assert data["memory"]["unionfs"]["entries"] > 1000
    assert "x floor" in r.stdout
    # libfuse's debug output parsed: every FUSE daemon answered the walk's directory reads and the creates
    reqs = data["requests"]
    assert set(reqs["walk cold (lstat all)"]) == fuse
    for name in fuse:
        assert reqs["walk cold (lstat all)"][name].get("READDIRPLUS", 0) + \
            reqs["walk cold (lstat all)"][name].get("READDIR", 0) > 0
        assert reqs["create 4K files"][name].get("CREATE", 0) >= 100


def test_bench_podman_rows_count_requests(tmp_path):
    """The whole-tool podman rows with --baseline (a third mount program) and --requests (each
    program run by podman through the -d wrapper): every row has every program's times and counts."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import unmount_all_below
    from podman_env import UNIONFS, requirements_missing
    missing = requirements_missing()
    if missing:
        import pytest
        pytest.skip(missing)
    out = tmp_path / "bench.json"
    # A short cache path: under pytest's long one, conmon's socket paths get too long and each
    # short-lived container waits out conmon's 20 s timeout.
    cache = Path(tempfile.mkdtemp(prefix="bench-", dir="/var/tmp"))
    try:
        r = subprocess.run([sys.executable, str(REPO / "scripts/bench.py"), "--size", "tiny", "--repeat", "1",
                            "--tools", "--no-cold-start", "--only", "podman run --rm", "--only", "300 files", "--requests",
                            "--baseline", UNIONFS,
                            "--cache", str(cache), "--json", str(out)],
                           capture_output=True, text=True, timeout=280, cwd=REPO)
    finally:
        unmount_all_below(cache)
        shutil.rmtree(cache, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    programs = {"fuse-overlayfs", "unionfs", "unionfs-base"}
    rows = ("podman run --rm IMAGE true", "podman run: 300 files written")
    for row in rows:
        assert set(data["tool_rows"][row]) == programs
        assert all(len(t) == 3 and min(t) > 0 for t in data["tool_rows"][row].values())
        assert set(data["tool_requests"][row]) == programs
        for ops in data["tool_requests"][row].values():
            assert ops.get("INIT") == 1 and ops.get("LOOKUP", 0) > 0   # one mount, its own requests
    for ops in data["tool_requests"][rows[1]].values():
        assert ops.get("SYMLINK", 0) >= 30   # cp -a of busybox's /bin: a symlink per applet
    assert "FUSE requests per run of each whole-tool row" in r.stdout
