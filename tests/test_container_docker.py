"""run as people run docker: options, a real terminal, volumes and bind mounts, --read-only; through crun."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import signal
import struct
import sys
import termios
import time

import pytest
from container_images import busybox_image, ok, ps_rows, run, store  # noqa: F401
from helpers import unionfs_cmd
from podman_env import HAVE_PODMAN, Podman

pytestmark = pytest.mark.skipif(not os.path.exists("/bin/busybox") or not (shutil.which("crun") or shutil.which("runc")),
                                reason="busybox-static and crun are needed (scripts/setup --test installs them)")


@pytest.fixture
def bb(store, tmp_path):
    busybox_image(tmp_path / "bb.tar", "bb:1", Volumes={"/var/data": {}})
    ok(store, "load", str(tmp_path / "bb.tar"))
    return store


def test_options_seen_inside(bb, tmp_path, monkeypatch):
    envfile = tmp_path / "env"
    envfile.write_text("# a comment\n\nFROM_FILE=f1\nGREETING=from-file\nPASSED\n")
    monkeypatch.setenv("PASSED", "from-host")
    script = ("echo $GREETING $FROM_FILE $PASSED $X $HOME $HOSTNAME; pwd; id; cat /etc/hostname; hostname; "
              "grep -c . /etc/hosts; ls /sys/class/net; grep CapEff /proc/self/status; "
              "grep -E ' /(etc/hosts|var/data) ' /proc/self/mountinfo | wc -l")
    r = run(bb, "run", "--name", "o", "-e", "X=1", "--env-file", str(envfile), "-e", "PASSED", "-w", "/made/here",
            "-u", "app:extra", "--hostname", "box", "--network", "none", "--cap-drop", "ALL", "--entrypoint", "sh",
            "bb:1", "-c", script)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "from-file f1 from-host 1 /home/app box"         # env-file, -e K, -e K=V, HOME, HOSTNAME
    assert out[1] == "/made/here"                                     # -w, created
    assert out[2] == "uid=1000(app) gid=2000(extra)", out[2]
    assert out[3:5] == ["box", "box"] and int(out[5]) >= 3
    assert out[6] == "lo"                                             # --network none: only loopback
    assert out[7].split() == ["CapEff:", "0000000000000000"]          # --cap-drop ALL
    assert out[8] == "2"                                              # /etc/hosts and the VOLUME bind-mounted
    # Nothing of the mount points in the writable layer: only the working directory docker creates too.
    assert ok(bb, "diff", "o") == "A /made\nA /made/here\n"
    r = run(bb, "run", "--rm", "-u", "4242", "bb:1", "sh", "-c", "id -u; id -g; echo $HOME")
    assert r.stdout.split() == ["4242", "0", "/"], r.stderr              # a uid not in /etc/passwd
    r = run(bb, "run", "--rm", "-u", "nobody", "bb:1")
    assert r.returncode == 125 and "unable to find user nobody" in r.stderr
    r = run(bb, "run", "--rm", "--privileged", "--init", "-u", "root", "bb:1", "sh", "-c",
            "grep CapEff /proc/self/status; tr '\\0' ' ' < /proc/1/cmdline")
    assert r.returncode == 0, r.stderr
    with open("/proc/self/status") as fh:
        ours = next(line.split()[1] for line in fh if line.startswith("CapBnd:"))
    assert r.stdout.split()[1] == ours                                   # every capability we have
    assert r.stdout.split()[2:4] == ["/dev/init", "--"]                  # --init: tini is pid 1
    assert ok(bb, "volume", "ls", "-q").count("\n") == 1     # o's anonymous /var/data volume; --rm took the rest


def _read_until(fd: int, buf: bytearray, pattern: bytes, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while pattern not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:
                break
            if not data:
                break
            buf += data
    return pattern in buf


def test_interactive_shell_in_a_terminal(bb):
    """``run -it IMAGE sh`` driven through a real pty: prompt, window size (and a resize), a command and its
    output, Ctrl-C interrupting only the command, Ctrl-D ending the shell, and its exit status."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, unionfs_cmd("--root", str(bb), "run", "--rm", "-it", "bb:1", "sh"))
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        buf = bytearray()
        assert _read_until(fd, buf, b"$ "), bytes(buf)
        os.write(fd, b"stty size; tty; echo T=$TERM\r")
        assert _read_until(fd, buf, b"T=xterm"), bytes(buf)
        assert b"33 101" in buf and b"/dev/pts/0" in buf
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))   # SIGWINCH to our client
        time.sleep(0.3)
        os.write(fd, b"stty size\r")
        assert _read_until(fd, buf, b"40 120"), bytes(buf)
        del buf[:]
        os.write(fd, b"sleep 60; echo not-interrupted\r")
        time.sleep(0.5)
        os.write(fd, b"\x03")                                     # Ctrl-C: the sleep dies, the shell lives
        os.write(fd, b"echo alive $((6*7))\r")
        assert _read_until(fd, buf, b"alive 42"), bytes(buf)
        assert b"\nnot-interrupted" not in buf
        os.write(fd, b"(exit 9)\r")
        os.write(fd, b"\x04")                                     # Ctrl-D: the shell exits with $? (9)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            _read_until(fd, buf, b"\x00", 0.2)
        else:
            raise AssertionError(f"run -it did not end: {bytes(buf)!r}")
        assert os.waitstatus_to_exitcode(status) == 9, bytes(buf)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    assert ok(bb, "ps", "-aq") == "\n"


def test_volumes_and_bind_mounts_outlive_containers(bb, tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    (host / "given").write_text("from the host\n")
    r = run(bb, "run", "--name", "w", "-u", "root", "-v", f"{host}:/data", "-v", "vol1:/etc", "--mount",
            f"type=bind,source={host},target=/ro,readonly", "--tmpfs", "/scratch", "bb:1", "sh", "-c",
            "cat /data/given; echo written > /data/new; ls /etc; echo kept > /etc/in-volume; "
            "echo x > /ro/x 2>/dev/null || echo ro-refused; echo s > /scratch/s && echo tmpfs-ok; "
            "echo v > /var/data/anon")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["from the host", "group", "hostname", "hosts", "passwd", "resolv.conf",
                                     "ro-refused", "tmpfs-ok"]           # vol1 was filled with the image's /etc
    assert (host / "new").read_text() == "written\n"
    vols = ok(bb, "volume", "ls", "-q").split()
    assert "vol1" in vols and len(vols) == 2                              # and one anonymous, for VOLUME /var/data
    info = json.loads(ok(bb, "volume", "inspect", "vol1"))[0]
    assert open(os.path.join(info["Mountpoint"], "in-volume")).read() == "kept\n"
    assert os.path.exists(os.path.join(info["Mountpoint"], "passwd"))
    # diff and commit never include what lies in a volume or a bind mount (nor their mount points).
    assert ok(bb, "diff", "w") == ""
    ok(bb, "commit", "w", "bb:w")
    r = run(bb, "run", "--rm", "--read-only", "-u", "0", "-v", "vol1:/etc", "--tmpfs", "/tmp", "bb:w", "sh", "-c",
            "cat /etc/in-volume; ls /data /scratch 2>&1 | wc -l; touch /root-file 2>/dev/null || echo refused; "
            "echo t > /tmp/t && echo tmp-ok; echo e >> /etc/in-volume && echo vol-ok; ls /var/data")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["kept", "2", "refused", "tmp-ok", "vol-ok"], r.stdout   # new anon: empty
    r = run(bb, "volume", "rm", "vol1")
    assert r.returncode == 2 and "in use" in r.stderr                     # container w still has it
    ok(bb, "rm", "-v", "w")
    assert ok(bb, "volume", "ls", "-q").split() == ["vol1"]             # rm -v: w's anonymous volume went
    ok(bb, "volume", "create", "spare")
    assert ok(bb, "volume", "prune").split() == []                        # named volumes are not pruned...
    assert sorted(ok(bb, "volume", "prune", "-a").split()) == ["spare", "vol1"]   # ...unless -a
    assert ok(bb, "volume", "ls", "-q") == "\n"


@pytest.fixture
def podman(tmp_path):
    """podman as root with a private vfs store (tests/podman_env.py); removed with the test."""
    if not HAVE_PODMAN:
        pytest.skip("podman is needed (scripts/setup --test installs it)")
    pm = Podman(tmp_path / "podman")
    try:
        yield lambda *args: pm(*args, check=False)
    finally:
        pm.close()


def test_same_as_podman(bb, tmp_path, podman):
    """The same image and the same flags through podman run and unionfs run: what a user sees inside."""
    archive = tmp_path / "bb-save.tar"
    ok(bb, "save", "bb:1", "-o", str(archive))                        # podman loads what unionfs save wrote
    r = podman("load", "-i", str(archive))
    assert r.returncode == 0, r.stderr
    host = tmp_path / "shared"
    host.mkdir()
    os.chown(host, 1000, 1000)
    envfile = tmp_path / "env"
    envfile.write_text("FROM_FILE=1\nGREETING=over\n")
    script = ("env | grep -v -e ^container= -e ^TERM= | sort; id -un; id -g; pwd; echo $(cat /etc/hostname); "
              "grep -E ' /(etc/hosts|etc/hostname|etc/resolv.conf|var/data|data|scratch) ' /proc/self/mountinfo "
              "| cut -d' ' -f5 | sort; ls -a /var/data; echo rw > /data/by-$0")
    flags = ["--hostname", "box", "-e", "X=1", "--env-file", str(envfile), "-w", "/tmp", "-v", f"{host}:/data",
             "--tmpfs", "/scratch", "-u", "app"]
    theirs = podman("run", "--rm", *flags, "localhost/bb:1", "sh", "-c", script, "podman")
    ours = run(bb, "run", "--rm", *flags, "bb:1", "sh", "-c", script, "unionfs")
    assert theirs.returncode == 0 and ours.returncode == 0, (theirs.stderr, ours.stderr)
    assert ours.stdout == theirs.stdout, (ours.stdout, theirs.stdout)
    assert sorted(os.listdir(host)) == ["by-podman", "by-unionfs"]
    # Exit codes: the command's own; 127 not found; 126 not executable; 125 an image that is not there.
    for args, code in ((["bb:1", "sh", "-c", "exit 3"], 3), (["bb:1", "/no/such"], 127), (["bb:1", "/etc/passwd"], 126),
                       (["nope:1"], 125)):
        image, rest = args[0], args[1:]
        theirs = podman("run", "--rm", ("localhost/" + image) if image == "bb:1" else "localhost/" + image, *rest)
        ours = run(bb, "run", "--rm", image, *rest)
        assert ours.returncode == theirs.returncode == code, (args, ours.stderr, theirs.stderr)
