"""run: containers of a tiny busybox image (and one with dpkg) executed by crun through our FUSE mount."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from container_images import build_deb, busybox_image, mkdirs, ok, ps_rows, run, store  # noqa: F401
from helpers import unionfs_cmd

pytestmark = pytest.mark.skipif(not os.path.exists("/bin/busybox") or not (shutil.which("crun") or shutil.which("runc")),
                                reason="busybox-static and crun are needed (scripts/setup --test installs them)")


@pytest.fixture
def bb(store, tmp_path):
    busybox_image(tmp_path / "bb.tar", "bb:1")
    ok(store, "load", str(tmp_path / "bb.tar"))
    return store


def test_default_command_env_workdir_user(bb):
    r = run(bb, "run", "--rm", "bb:1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello from /home/app as 1000:1000 1000 2000\n"    # Env, WorkingDir, User + its groups
    assert ok(bb, "ps", "-aq") == "\n"                                    # --rm


def test_exit_status_output_and_the_container_left(bb, tmp_path):
    r = run(bb, "run", "--name", "x", "bb:1", "sh", "-c",
            "echo hi; echo oops >&2; echo data > /tmp/x; echo $$; hostname; "
            "grep ' / ' /proc/self/mountinfo; exit 3")
    assert r.returncode == 3, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "hi" and r.stderr == "oops\n"
    assert out[1] == "1"                                                 # a pid namespace of its own
    row = ps_rows(bb)["x"]
    assert out[2] == row[0][:12] and row[5] == "-"                       # hostname; unmounted afterwards
    assert row[4].startswith("Exited (3) ") and row[2].startswith("sh -c ")
    root = out[3].split()
    assert "fuse.unionfs" in root and "nosuid" not in root[5] and "nodev" not in root[5], root
    assert ok(bb, "diff", "x") == "C /tmp\nA /tmp/x\n"
    (m,) = mkdirs(tmp_path, "m")
    ok(bb, "mount", "x", str(m))
    assert (m / "tmp/x").read_text() == "data\n"
    assert os.stat(m / "tmp/x").st_uid == 1000
    ok(bb, "rm", "--force", "x")


def test_stdin_passes_through_and_as_root(bb):
    r = run(bb, "run", "--rm", "bb:1", "cat", input="not read\n")       # without -i, stdin is not the container's
    assert r.returncode == 0 and r.stdout == "", r.stderr
    r = run(bb, "run", "--rm", "-i", "bb:1", "cat", input="piped\nlines\n")
    assert r.returncode == 0 and r.stdout == "piped\nlines\n", r.stderr
    ok(bb, "create", "bb:1", "--name", "base")   # a container of the image is not touched by runs
    ok(bb, "commit", "base", "bb:root", "-c", "USER root", "-c", "WORKDIR /tmp", "-c", "ENV GREETING=hi")
    assert ok(bb, "run", "--rm", "bb:root").strip() == "hi from /tmp as 0:0 0"


def test_missing_runtime_and_bad_command(bb, tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))   # no crun, no runc
    r = subprocess.run(unionfs_cmd("--root", str(bb), "run", "--rm", "bb:1"), capture_output=True, text=True,
                       timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 125 and "apt-get install crun" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run(bb, "run", "--runtime", "no-such-runtime", "bb:1")
    assert r.returncode == 125 and "not found" in r.stderr                # docker's 125: unionfs failed
    r = run(bb, "run", "nope:1")
    assert r.returncode == 125 and "no such image" in r.stderr
    r = run(bb, "run", "-v", "rel:x", "bb:1")
    assert r.returncode == 125 and "not an absolute path" in r.stderr
    assert ok(bb, "ps", "-aq") == "\n"           # nothing created by any of them
    r = run(bb, "run", "--rm", "bb:1", "/no/such/program")
    assert r.returncode == 127 and "not found" in r.stderr and ok(bb, "ps", "-aq") == "\n"
    r = run(bb, "run", "--rm", "bb:1", "/etc/passwd")                     # not executable
    assert r.returncode == 126, r.stderr
    r = run(bb, "run", "--rm", "bb:1", "sh", "-c", "exit 42")
    assert r.returncode == 42


@pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="dpkg-deb is needed")
def test_dpkg_installs_a_package_inside_a_container(store, tmp_path):
    """A package manager's workload through the mount: dpkg unpacks to .dpkg-new names and renames them over
    the image's files, hard-links its database backups, fsyncs, runs a maintainer script."""
    busybox_image(tmp_path / "dp.tar", "dp:1", dpkg=True, User="root")
    ok(store, "load", str(tmp_path / "dp.tar"))
    deb = build_deb(tmp_path)
    ok(store, "create", "dp:1", "--name", "prep")
    (m,) = mkdirs(tmp_path, "m")
    ok(store, "mount", "prep", str(m))
    shutil.copy(deb, m / "tmp/hello.deb")
    ok(store, "umount", str(m))
    ok(store, "commit", "prep", "dp:2")
    r = run(store, "run", "--name", "inst", "dp:2", "/usr/bin/dpkg", "-i", "/tmp/hello.deb")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Setting up hello-unionfs (1.0)" in r.stdout
    changes = ok(store, "diff", "inst").splitlines()
    for line in ("A /usr/bin/hello", "C /usr/share/hello/old", "A /usr/share/hello/data-link", "A /etc/hello.conf",
                 "C /var/lib/dpkg/status", "A /var/lib/dpkg/info/hello-unionfs.list", "A /var/lib/hello-postinst"):
        assert line in changes, (line, changes)
    ok(store, "commit", "inst", "dp:3")
    r = run(store, "run", "--rm", "dp:3", "sh", "-c",
            "/usr/bin/hello; cat /usr/share/hello/old /var/lib/hello-postinst; "
            "grep -A1 '^Package: hello-unionfs' /var/lib/dpkg/status; stat -c %i /usr/share/hello/data "
            "/usr/share/hello/data-link")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[:5] == ["hello from the package", "from the package", "postinst ran", "Package: hello-unionfs",
                       "Status: install ok installed"]
    assert out[5] == out[6]                       # the package's hard link, through commit and run
