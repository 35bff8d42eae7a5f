"""Crash test, the long version: kill -9 the daemon at every changing syscall of each scenario
(tests/crashlib.py), then at random moments (random delays, no injection) during a large copy-up,
and ``unionfs commit`` killed before each rename and after random delays. Prints figures.

    scripts/crash-test [--minutes M] [--seed S] [--dir DIR]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import crashlib  # noqa: E402
from helpers import UnionMount, unmount_all_below  # noqa: E402


def every_point(base: Path) -> tuple[int, int, list[str]]:
    crashes, failures = 0, []
    for sc in crashlib.SCENARIOS:
        r = crashlib.Runner(sc, base / sc.name)
        r.kernel_check = True  # kernel overlayfs (index=on) must show each crashed state as we do
        r.reference()
        t0, bad = time.monotonic(), 0
        for n in range(1, r.points + 1):
            try:
                r.crash_at(n)
            except crashlib.Failure as e:
                bad += 1
                failures.append(str(e).splitlines()[0])
            crashes += 1
        print(f"  {sc.name:14} {r.points:3} crash points, {bad} half states, {time.monotonic() - t0:.1f}s", flush=True)
    return crashes, len(failures), failures


def random_kills(base: Path, deadline: float, rng: random.Random) -> tuple[int, int, dict]:
    """Random delays while a big file is copied up, a lower dir renamed, entries whited out."""
    lower, upper, work, mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, mnt):
        d.mkdir(parents=True, exist_ok=True)
    crashlib._big(lower, 96 << 20)
    for i in range(50):
        crashlib._w(lower / f"many/f{i}", b"%d" % i)
    big = (lower / "big").read_bytes()
    runs, bad, seen = 0, 0, {"old": 0, "new": 0}
    while time.monotonic() < deadline:
        crashlib._clean(upper, work)
        m = UnionMount(mnt, [lower], upper, work, log=base / "log").start()

        def workload():
            try:
                with open(mnt / "big", "ab") as f:
                    f.write(b"!")
                os.rename(mnt / "d", mnt / "e")
                for i in range(50):
                    os.unlink(mnt / f"many/f{i}")
            except OSError:
                pass
        t = threading.Thread(target=workload)
        t.start()
        time.sleep(rng.uniform(0, 0.6))
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(timeout=30)
        t.join(timeout=60)
        crashlib._unmount_dead(mnt)
        m.proc = None
        m = UnionMount(mnt, [lower], upper, work, log=base / "log").start()
        try:
            ok = not os.listdir(work / "work")
            data = (mnt / "big").read_bytes()
            ok &= data in (big, big + b"!")
            seen["new" if data != big else "old"] += 1
            ok &= sorted(os.listdir(mnt)) in (sorted(["d", "many", "big", "f", "g", "o", "empty", "h1", "h2"]),
                                              sorted(["e", "many", "big", "f", "g", "o", "empty", "h1", "h2"]))
            left = os.listdir(mnt / "many")
            ok &= all(f"f{i}" in left for i in range(50 - len(left), 50))   # unlinked in order: a prefix
            (mnt / "after").write_bytes(b"ok")
        finally:
            m.stop()
        ok &= not m.log_errors()
        runs += 1
        bad += not ok
    return runs, bad, seen


def commit_kills(base: Path, deadline: float, rng: random.Random) -> tuple[int, int, dict]:
    from container_images import APP, BASE, change_everything
    from image_archives import Img, docker_save_legacy
    base.mkdir(parents=True, exist_ok=True)
    root = base / "store"

    def ok(store, *args):
        r = subprocess.run([sys.executable, "-m", "unionfs", "--root", str(store), *args],
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        if r.returncode:
            raise crashlib.Failure(f"{args}: {r.stderr}")
        return r.stdout
    docker_save_legacy(base / "app.tar", [Img([BASE, APP], ["app:1"])])
    ok(root, "load", str(base / "app.tar"))
    ok(root, "create", "app:1", "--name", "c")
    (base / "m").mkdir()
    ok(root, "mount", "c", str(base / "m"))
    try:
        change_everything(base / "m")
    finally:
        ok(root, "umount", str(base / "m"))
    before = crashlib.store_state(root)
    runs, bad, seen = 0, 0, {"killed-before": 0, "killed-after": 0, "completed": 0}
    n = 1
    while time.monotonic() < deadline:
        copy = base / "copy"
        if copy.exists():
            shutil.rmtree(copy)
        subprocess.run(["cp", "-a", str(root), str(copy)], check=True)
        if n is not None:
            what = crashlib.commit_crash(copy, "c", "committed:1", n)
            n = n + 1 if what == "killed" else None     # every rename point once, then random delays
        else:
            what = crashlib.commit_crash(copy, "c", "committed:1", None, delay=rng.uniform(0.05, 0.8))
        try:
            happened = crashlib.check_store_after(copy, before, "committed:1", lambda *a: ok(copy, *a))
            seen["completed" if what == "completed" else "killed-after" if happened else "killed-before"] += 1
        except crashlib.Failure as e:
            print("   ", e, flush=True)
            bad += 1
        runs += 1
    return runs, bad, seen


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=5.0, help="time for the random phases (after every point)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--phases", default="123", help="which phases to run (1: every point, 2: random, 3: commit)")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    base = Path(tempfile.mkdtemp(prefix="unionfs-crash-", dir=a.dir))
    print(f"crash-test seed {seed} in {base}", flush=True)
    t0 = time.monotonic()
    status = 0
    try:
        nbad = bad = cbad = 0
        half = a.minutes * 60 / (("2" in a.phases) + ("3" in a.phases) or 1)
        if "1" in a.phases:
            print("1. kill before every changing syscall of each scenario", flush=True)
            crashes, nbad, failures = every_point(base / "points")
            for f in failures:
                print("   HALF STATE:", f)
            print(f"   {crashes} crashes, {nbad} half states", flush=True)
        if "2" in a.phases:
            print(f"2. random kills during a 96 MiB copy-up, a dir rename, 50 whiteouts ({half:.0f}s)", flush=True)
            runs, bad, seen = random_kills(base / "random", time.monotonic() + half, rng)
            print(f"   {runs} kills, {bad} bad outcomes; big file seen {seen}", flush=True)
        if "3" in a.phases:
            print(f"3. unionfs commit killed before each rename, then at random moments ({half:.0f}s)", flush=True)
            cruns, cbad, cseen = commit_kills(base / "commit", time.monotonic() + half, rng)
            print(f"   {cruns} commits, {cbad} bad outcomes; {cseen}", flush=True)
        status = 1 if (nbad or bad or cbad) else 0
    finally:
        unmount_all_below(base)
        subprocess.run(["rm", "-rf", str(base)])
    print(f"total {time.monotonic() - t0:.0f}s, {'FAILED' if status else 'ok'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
