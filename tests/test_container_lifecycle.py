"""Detached containers through crun: run -d, ps, logs -f, exec, stop (the image's StopSignal), wait, start,
kill, rm -f, and a supervisor that dies (the container is left stopped and startable, never wedged)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from container_images import busybox_image, ok, ps_rows, run, store  # noqa: F401
from helpers import is_mounted, unionfs_cmd

pytestmark = pytest.mark.skipif(not os.path.exists("/bin/busybox") or not (shutil.which("crun") or shutil.which("runc")),
                                reason="busybox-static and crun are needed (scripts/setup --test installs them)")

LOOP = ('trap "echo stopping; exit 7" USR1; echo started; echo to-err >&2; i=0; '
        'while true; do i=$((i+1)); echo tick $i; sleep 0.2; done')


def _state(store, cid):
    with open(store / "containers" / cid / "state.json") as fh:
        return json.load(fh)


def _wait_dead(pid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} did not die")


@pytest.fixture
def bb(store, tmp_path):
    busybox_image(tmp_path / "bb.tar", "bb:s", StopSignal="SIGUSR1")
    ok(store, "load", str(tmp_path / "bb.tar"))
    yield store
    # Whatever happened: no container left running, no supervisor left behind.
    for cid in run(store, "ps", "-aq", "--no-trunc").stdout.split():
        run(store, "rm", "-f", cid, timeout=60)
    for d in (store / "containers").glob("*/state.json"):
        sup = json.loads(d.read_text()).get("Supervisor") or {}
        for pid in (sup.get("Pid"), json.loads(d.read_text()).get("Pid")):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (TypeError, ValueError, ProcessLookupError):
                pass


def test_detached_lifecycle(bb):
    cid = ok(bb, "run", "-d", "--name", "d", "bb:s", "sh", "-c", LOOP).strip()
    assert len(cid) == 64
    row = ps_rows(bb)["d"]
    assert row[4].startswith("Up ") and row[5].endswith("/rootfs") and is_mounted(row[5])
    assert ok(bb, "ps", "-q") == cid[:12] + "\n"                    # running: listed without -a
    follow = subprocess.Popen(unionfs_cmd("--root", str(bb), "logs", "-f", "d"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        r = run(bb, "exec", "d", "sh", "-c", "echo $GREETING $(id -u) $(pwd) $HOME; exit 4")
        assert r.returncode == 4 and r.stdout == "hello 1000 /home/app /home/app\n", r.stderr
        r = run(bb, "exec", "-u", "root", "-w", "/tmp", "-e", "Q=2", "d", "sh", "-c", "echo $Q $(id -u) $(pwd) $HOME")
        assert r.stdout == "2 0 /tmp /root\n", r.stderr
        r = run(bb, "exec", "-i", "d", "cat", input="through exec\n")
        assert r.stdout == "through exec\n", r.stderr
        assert run(bb, "exec", "d", "no-such-cmd").returncode == 127
        r = run(bb, "exec", "-t", "d", "sh", "-c", "tty; echo $TERM")         # a terminal of its own
        assert r.returncode == 0 and r.stdout.split() == ["/dev/pts/0", "xterm"], (r.stdout, r.stderr)
        ok(bb, "stop", "-t", "20", "d")                              # SIGUSR1, trapped: exit 7
        out, err = follow.communicate(timeout=60)                    # logs -f ends when the container does
    finally:
        follow.kill()
        follow.wait()
    lines = out.splitlines()
    assert lines[0] == "started" and "tick 1" in lines and lines[-1] == "stopping", out
    assert err == "to-err\n"
    assert ok(bb, "wait", "d") == "7\n"
    row = ps_rows(bb)["d"]
    assert row[4].startswith("Exited (7) ") and row[5] == "-" and not is_mounted(bb / "containers" / cid / "rootfs")
    assert ok(bb, "ps", "-q") == "\n"
    assert ok(bb, "logs", "--tail", "1", "d") == "stopping\n"
    r = run(bb, "exec", "d", "true")
    assert r.returncode == 125 and "not running" in r.stderr

    ok(bb, "start", "d")                                             # again, same writable layer
    assert ps_rows(bb)["d"][4].startswith("Up ")
    r = run(bb, "rm", "d")
    assert r.returncode == 2 and "running" in r.stderr
    ok(bb, "kill", "-s", "KILL", "d")
    assert ok(bb, "wait", "d") == "137\n"
    assert ok(bb, "logs", "d").count("started\n") == 2

    # The supervisor dies while the container runs: it reads as stopped, and start clears what was left.
    ok(bb, "start", "d")
    st = _state(bb, cid)
    os.kill(st["Supervisor"]["Pid"], signal.SIGKILL)
    _wait_dead(st["Supervisor"]["Pid"])
    row = ps_rows(bb)["d"]
    assert row[4].startswith("Exited (255) "), row
    ok(bb, "start", "d")
    st2 = _state(bb, cid)
    assert st2["Status"] == "running" and st2["Pid"] != st["Pid"]
    _wait_dead(st["Pid"], timeout=1)                                # the old init was killed by start
    ok(bb, "restart", "-t", "20", "d")
    assert _state(bb, cid)["Status"] == "running"
    assert ok(bb, "rm", "-f", "d") == "d\n"                          # a running one, killed and unmounted
    assert ok(bb, "ps", "-aq") == "\n"
    with open("/proc/self/mountinfo") as fh:
        assert cid not in fh.read()


def test_detached_failures_and_rm(bb):
    r = run(bb, "run", "-d", "--rm", "bb:s", "/no/such")
    assert r.returncode == 127 and "not found" in r.stderr
    assert ok(bb, "ps", "-aq") == "\n"                               # --rm: gone even so
    cid = ok(bb, "run", "-d", "--rm", "bb:s", "sh", "-c", "echo bye; exit 3").strip()
    r = run(bb, "wait", cid)                                         # may already be gone with --rm
    assert r.returncode in (0, 2)
    assert ok(bb, "ps", "-aq") == "\n"


def test_create_then_start(bb):
    """``create`` + ``start -a``, as ``docker create`` + ``docker start -a``: the image's own command."""
    ok(bb, "create", "bb:s", "--name", "c")
    r = run(bb, "start", "-a", "c")
    assert r.returncode == 0 and r.stdout == "hello from /home/app as 1000:1000 1000 2000\n", r.stderr
    assert ps_rows(bb)["c"][4].startswith("Exited (0) ")
    assert ok(bb, "diff", "c") == ""


def test_daemon_crash_and_reboot_leave_it_startable(bb):
    """The FUSE daemon killed under a running container: stop still works, the dead mount goes, start mounts
    anew.  A state written before a reboot (another boot id) reads as stopped and starts again."""
    from unionfs.container import model
    from unionfs.image.store import Store
    cid = ok(bb, "run", "-d", "--name", "k", "bb:s", "sh", "-c", LOOP).strip()
    c = model.resolve(Store(str(bb)), cid)
    daemon = model.mounted_at(c).pid
    os.kill(daemon, signal.SIGKILL)
    _wait_dead(daemon)
    ok(bb, "stop", "-t", "3", "k")
    assert ps_rows(bb)["k"][4].startswith("Exited (")
    assert not is_mounted(bb / "containers" / cid / "rootfs")
    ok(bb, "start", "k")
    assert ps_rows(bb)["k"][4].startswith("Up ") and model.mounted_at(c).pid != daemon
    ok(bb, "kill", "k")
    assert ok(bb, "wait", "k") == "137\n"
    path = bb / "containers" / cid / "state.json"
    st = json.loads(path.read_text())
    st.update(Status="running", Supervisor={"Pid": os.getpid(), "StartTime": 0, "BootId": "another-boot"})
    path.write_text(json.dumps(st))
    assert ps_rows(bb)["k"][4].startswith("Exited (255) ")
    ok(bb, "start", "k")
    assert ps_rows(bb)["k"][4].startswith("Up ")
    ok(bb, "rm", "-f", "k")
