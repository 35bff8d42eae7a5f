"""The benchmark must keep running: tiny sizes, one round, every workload on every filesystem,
the floor included, and the request counts of each FUSE daemon.

No time is asserted here (speed lives in scripts/bench); only that each figure exists.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
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
