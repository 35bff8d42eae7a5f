"""The benchmark must keep running: tiny sizes, one round, every workload on every filesystem.

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
                        "--cache", str(tmp_path / "cache"), "--json", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    systems = {"overlay", "unionfs"} | ({"fuse-overlayfs"} if shutil.which("fuse-overlayfs") else set())
    seen = {(x["workload"], x["fs"]) for x in data["results"]}
    workloads = {x["workload"] for x in data["results"]}
    assert len(workloads) >= 14
    assert seen == {(w, s) for w in workloads for s in systems}
    assert all(x["min"] > 0 for x in data["results"])
    assert data["memory"]["unionfs"]["entries"] > 1000
    assert "ratio = median / overlay median" in r.stdout
