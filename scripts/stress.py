"""Concurrency stress through a real mount: several processes read, write, append, truncate, rename,
unlink, mkdir/rmdir and create in the same directories at once, each logging what it did.

At the end, with everything quiet: every process's own files (which start in a lower layer) hold
exactly what it wrote; each shared directory lists exactly the names the logs imply (names are
unique, so a name exists iff it was created — by create, mkdir or as a rename target — and not
removed since; lower names count as created); no listing has duplicates and every listed name can
be stat'ed; fsync'd data is in the upper dir after unmount; the view is the same after a remount;
the daemon logged no error; no operation failed with an errno its race does not explain.

    scripts/stress [--procs N] [--seconds S] [--seed S] [--copyup-probe]
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import UnionMount, snapshot, unmount_all_below  # noqa: E402

SHARED = 3
OWN = 4
LOWER_SHARED = 20
RACY = {errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST}   # what a lost race may answer


def build(lower: Path) -> None:
    for j in range(SHARED):
        (lower / f"s{j}").mkdir(parents=True)
        for k in range(LOWER_SHARED):
            (lower / f"s{j}/l{k}").write_bytes(b"lower %d %d\n" % (j, k) * 50)


def build_own(lower: Path, procs: int) -> None:
    for i in range(procs):
        d = lower / f"own/p{i}"
        d.mkdir(parents=True)
        for k in range(OWN):
            (d / f"f{k}").write_bytes(b"p%d f%d\n" % (i, k) * 100)


def worker(i: int, mnt: Path, logdir: Path, seconds: float, seed: int) -> None:
    rng = random.Random(seed * 1000 + i)
    log = open(logdir / f"p{i}.log", "w")
    own = {f"f{k}": bytearray(b"p%d f%d\n" % (i, k) * 100) for k in range(OWN)}
    odir = mnt / f"own/p{i}"
    seq = 0
    errors = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seq += 1
        op = rng.choice(["write", "append", "truncate", "rename-own", "recreate-own", "create", "rename", "unlink",
                         "mkdir", "rmdir", "read", "list", "create", "unlink"])
        rec = {"op": op}
        try:
            if op in ("write", "append", "truncate", "rename-own", "recreate-own"):
                name = rng.choice(sorted(own))
                p = odir / name
                if op == "write":
                    off, data = rng.randrange(len(own[name]) + 10), rng.randbytes(rng.randrange(1, 3000))
                    with open(p, "r+b") as f:
                        f.seek(off)
                        f.write(data)
                    buf = own[name]
                    if off > len(buf):
                        buf.extend(bytes(off - len(buf)))
                    buf[off:off + len(data)] = data
                elif op == "append":
                    data = b"append %d %d\n" % (i, seq)
                    with open(p, "ab") as f:
                        f.write(data)
                    own[name].extend(data)
                elif op == "truncate":
                    n = rng.randrange(len(own[name]) + 100)
                    os.truncate(p, n)
                    del own[name][n:]
                    own[name].extend(bytes(n - len(own[name])))
                elif op == "rename-own":
                    new = ("g" if name.startswith("f") else "f") + name[1:]
                    os.rename(p, odir / new)
                    own[new] = own.pop(name)
                else:
                    os.unlink(p)
                    data = b"recreated %d\n" % seq
                    (odir / name).write_bytes(data)
                    own[name] = bytearray(data)
                rec["ok"] = True
            else:
                d = mnt / f"s{rng.randrange(SHARED)}"
                rec["dir"] = d.name
                if op == "create":
                    rec["name"] = f"p{i}-{seq}"
                    with open(d / rec["name"], "xb") as f:
                        f.write(b"%d %d\n" % (i, seq))
                elif op == "mkdir":
                    rec["name"] = f"d{i}-{seq}"
                    os.mkdir(d / rec["name"])
                else:
                    names = os.listdir(d)
                    if op == "list":
                        if len(names) != len(set(names)):
                            raise AssertionError(f"duplicate names in {d}")
                        rec["ok"] = True
                        continue
                    if not names:
                        continue
                    victim = rng.choice(names)
                    rec["name"] = victim
                    if op == "rename":
                        to = mnt / f"s{rng.randrange(SHARED)}"
                        rec["to_dir"], rec["to"] = to.name, ("d" if victim.startswith("d") else "") + f"r{i}-{seq}"
                        os.rename(d / victim, to / rec["to"])
                    elif op == "unlink":
                        if victim.startswith("d"):
                            continue
                        os.unlink(d / victim)
                    elif op == "rmdir":
                        if not victim.startswith("d"):
                            continue
                        os.rmdir(d / victim)
                    elif op == "read":
                        try:
                            (d / victim).read_bytes()
                        except IsADirectoryError:
                            pass
                rec["ok"] = True
        except OSError as e:
            rec["ok"] = False
            rec["errno"] = e.errno
            if e.errno not in RACY:
                errors += 1
        except AssertionError as e:
            rec["ok"] = False
            rec["error"] = str(e)
            errors += 1
        log.write(json.dumps(rec) + "\n")
    # fsync'd data: must be in the upper dir after unmount
    synced = b"synced by %d after %d ops\n" % (i, seq)
    fd = os.open(odir / "synced", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, synced)
    os.fsync(fd)
    os.close(fd)
    log.write(json.dumps({"final": {k: v.hex() for k, v in own.items()}, "synced": synced.hex(), "ops": seq,
                          "errors": errors}) + "\n")
    log.close()


def implied_shared(logdir: Path, procs: int) -> dict[str, set[str]]:
    """The names each shared dir must hold."""
    alive: dict[str, set[str]] = {f"s{j}": {f"l{k}" for k in range(LOWER_SHARED)} for j in range(SHARED)}
    created, removed = [], []
    for i in range(procs):
        for line in (logdir / f"p{i}.log").read_text().splitlines():
            rec = json.loads(line)
            if not rec.get("ok") or "dir" not in rec or rec["op"] in ("read", "list"):
                continue
            if rec["op"] in ("create", "mkdir"):
                created.append((rec["dir"], rec["name"]))
            elif rec["op"] == "rename":
                removed.append((rec["dir"], rec["name"]))
                created.append((rec["to_dir"], rec["to"]))
            elif rec["op"] in ("unlink", "rmdir"):
                removed.append((rec["dir"], rec["name"]))
    for d, n in created:
        alive[d].add(n)
    for d, n in removed:
        alive[d].discard(n)
    return alive


def run(base: Path, procs: int, seconds: float, seed: int, log=print) -> dict:
    lower, upper, work, mnt, logdir = (base / n for n in ("lower", "upper", "work", "mnt", "logs"))
    for d in (lower, upper, work, mnt, logdir):
        d.mkdir(parents=True)
    build(lower)
    build_own(lower, procs)
    m = UnionMount(mnt, [lower], upper, work, log=base / "unionfs.log").start()
    problems: list[str] = []
    figures: dict = {"procs": procs, "seconds": seconds, "seed": seed}
    try:
        pids = []
        for i in range(procs):
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    worker(i, mnt, logdir, seconds, seed)
                except BaseException as e:  # noqa: BLE001
                    print(f"worker {i}: {e!r}", file=sys.stderr)
                    code = 1
                os._exit(code)
            pids.append(pid)
        deadline = time.monotonic() + seconds + 120
        for pid in pids:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    if os.waitstatus_to_exitcode(status) != 0:
                        problems.append(f"worker {pid} failed")
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    problems.append(f"worker {pid} hung")
                time.sleep(0.05)
        finals = {}
        ops = errs = failed = 0
        for i in range(procs):
            lines = (logdir / f"p{i}.log").read_text().splitlines()
            last = json.loads(lines[-1])
            finals[i] = last
            ops += last["ops"]
            errs += last["errors"]
            failed += sum(1 for line in lines[:-1] if not json.loads(line).get("ok", True))
            for line in lines[:-1]:
                rec = json.loads(line)
                if not rec.get("ok", True) and rec.get("errno") not in RACY:
                    problems.append(f"p{i}: {rec}")
        figures.update(ops=ops, racy_failures=failed - errs, unexpected_errors=errs)
        # own files, through the mount
        for i, last in finals.items():
            d = mnt / f"own/p{i}"
            names = sorted(os.listdir(d))
            want = sorted(list(last["final"]) + ["synced"])
            if names != want:
                problems.append(f"p{i}: own dir lists {names}, expected {want}")
            for name, hexdata in last["final"].items():
                if (d / name).read_bytes() != bytes.fromhex(hexdata):
                    problems.append(f"p{i}: {name} differs from what it wrote")
        # shared dirs
        alive = implied_shared(logdir, procs)
        entries = 0
        for dname, want in alive.items():
            names = os.listdir(mnt / dname)
            entries += len(names)
            if len(names) != len(set(names)):
                problems.append(f"{dname}: duplicate names")
            for n in names:
                try:
                    os.lstat(mnt / dname / n)
                except OSError as e:
                    problems.append(f"{dname}/{n}: listed but {e}")
            if set(names) != want:
                problems.append(f"{dname}: {sorted(set(names) - want)[:5]} not implied by the logs, "
                                f"{sorted(want - set(names))[:5]} missing")
        figures["shared_entries"] = entries
        before = snapshot(mnt)
    finally:
        m.stop()
    for i, last in finals.items():
        if (upper / f"own/p{i}/synced").read_bytes() != bytes.fromhex(last["synced"]):
            problems.append(f"p{i}: fsync'd data not in the upper dir")
    m = UnionMount(mnt, [lower], upper, work, log=base / "unionfs.log").start()
    try:
        if snapshot(mnt) != before:
            problems.append("the view changed across a remount")
    finally:
        m.stop()
    daemon_errors = m.log_errors()
    problems += [f"daemon: {e}" for e in daemon_errors[:10]]
    figures["problems"] = problems
    return figures


def copyup_probe(base: Path, size_mib: int = 512, log=print) -> dict:
    """Two readers stat and read small files in a loop while a big file is copied up: the trio loop is
    one thread, so how long do they wait?"""
    lower, upper, work, mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir(parents=True)
    (lower / "small").write_bytes(b"small")
    with open(lower / "big", "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(size_mib):
            f.write(chunk)
    m = UnionMount(mnt, [lower], upper, work, log=base / "unionfs.log").start()
    lat: list[float] = []
    stop = threading.Event()
    bad = []

    def reader(k):
        while not stop.is_set():
            t = time.monotonic()
            os.stat(mnt / "small")
            if (mnt / "small").read_bytes() != b"small":
                bad.append(k)
            lat.append(time.monotonic() - t)
    try:
        rs = [threading.Thread(target=reader, args=(k,)) for k in range(2)]
        for r in rs:
            r.start()
        time.sleep(0.2)
        t = time.monotonic()
        with open(mnt / "big", "ab") as f:
            f.write(b"!")
        copy = time.monotonic() - t
        time.sleep(0.2)
        stop.set()
        for r in rs:
            r.join(timeout=60)
    finally:
        m.stop()
    return {"copy_up_s": round(copy, 2), "reads": len(lat), "max_read_latency_s": round(max(lat), 3),
            "bad_reads": len(bad), "errors": m.log_errors()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--copyup-probe", action="store_true", help="also measure readers during a 512 MiB copy-up")
    a = ap.parse_args()
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    base = Path(tempfile.mkdtemp(prefix="unionfs-stress-"))
    status = 0
    try:
        t0 = time.monotonic()
        print(f"stress: {a.procs} processes for {a.seconds:.0f}s, seed {seed}", flush=True)
        fig = run(base / "stress", a.procs, a.seconds, seed)
        for p in fig["problems"]:
            print("PROBLEM:", p)
        print(f"{fig['ops']} ops ({fig['ops'] / (time.monotonic() - t0):.0f}/s), "
              f"{fig['racy_failures']} lost races (ENOENT/EEXIST/ENOTEMPTY), {fig['unexpected_errors']} unexpected "
              f"errors, {fig['shared_entries']} shared entries at the end, {len(fig['problems'])} problems")
        status = 1 if fig["problems"] else 0
        if a.copyup_probe:
            print("copy-up probe:", copyup_probe(base / "probe"))
    finally:
        unmount_all_below(base)
        subprocess.run(["rm", "-rf", str(base)])
    return status


if __name__ == "__main__":
    sys.exit(main())
