"""unionfs build: real Dockerfiles built by us and by ``podman build --isolation chroot`` (the oracle), compared
tree against tree and config against config; the cache; SOURCE_DATE_EPOCH; bad input and killed builds."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from build_env import PODMAN_ARTIFACTS, Podman, config_fields, make_base, ok, our_config, sh, unionfs
from helpers import diff_snapshots, snapshot, unionfs_cmd, unmount_all_below

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("podman", "umoci", "skopeo", "crun")) or not os.path.exists("/bin/busybox"),
    reason="podman, umoci, skopeo, crun and busybox-static are needed (scripts/setup --test installs them)")

# The features of one build; podman 4.3 (buildah 1.28) has no heredocs, so its Dockerfile says the same without.
DOCKERFILE = r"""# syntax=docker/dockerfile:1
# escape=\
ARG BASE=bb:1
FROM $BASE AS builder
ARG GREETING=hello
RUN mkdir -p /out && echo "$GREETING from the builder" > /out/greeting && ln -s greeting /out/link

FROM busybox-that-is-not-needed AS unused
RUN exit 1

FROM ${BASE}
ARG VERSION=1.0
# a comment between instructions
ENV APP_HOME=/opt/app \
    VERSION=$VERSION
ENV OLD=${APP_HOME:-none} UNSET=${NOPE:-dflt} ALT=${VERSION:+set} KEEP=\$VERSION T=first
ENV T=second SEES=$T
LABEL org.example.version=$VERSION description="a test image"
COPY app/ $APP_HOME/
COPY --chown=app:staff --chmod=0640 notes.txt keep.log /opt/app/docs/
COPY --chown=1000 w*.txt /wild/
COPY link /opt/linked
ADD data.tar.gz /opt/data/
ADD notes.txt /opt/notes-added
COPY --from=builder /out /opt/from-builder
@RUN1@
@COPY1@
WORKDIR /srv/work
RUN touch here && mkdir -p sub && echo $VERSION > sub/v
USER app
EXPOSE 8080 53/udp
VOLUME ["/data"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --retries=3 CMD ["true"]
SHELL ["/bin/sh", "-ec"]
ONBUILD RUN echo onbuild trigger ran
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo $VERSION"]
"""
OURS = {
    "@RUN1@": "RUN <<EOF\nset -e\nrm /bin/mkfifo /bin/cp\nmv /opt/app/conf /opt/app/conf-renamed\n"
              "echo \"$VERSION\" > /opt/app/version\nEOF",
    "@COPY1@": 'COPY <<-CONF /etc/app.conf\n\thome=$APP_HOME\nCONF',
}
THEIRS = {
    "@RUN1@": "RUN set -e; rm /bin/mkfifo /bin/cp; mv /opt/app/conf /opt/app/conf-renamed; "
              "echo \"$VERSION\" > /opt/app/version",
    "@COPY1@": "COPY app.conf /etc/app.conf",
}


def dockerfile(subst: dict) -> str:
    text = DOCKERFILE
    for k, v in subst.items():
        text = text.replace(k, v)
    return text


def make_context(ctx: Path) -> None:
    (ctx / "app/conf").mkdir(parents=True)
    (ctx / "app/main.sh").write_text("#!/bin/sh\necho main\n")
    os.chmod(ctx / "app/main.sh", 0o755)
    os.link(ctx / "app/main.sh", ctx / "app/main-link.sh")
    (ctx / "app/conf/a.conf").write_text("a=1\n")
    os.chmod(ctx / "app/conf", 0o750)
    (ctx / "app/debug.log").write_text("excluded\n")
    (ctx / "app/tmp-cache").write_text("excluded by **\n")
    (ctx / "keep.log").write_text("kept by an exception\n")
    (ctx / "secret").mkdir()
    (ctx / "secret/key").write_text("never sent\n")
    (ctx / "notes.txt").write_text("notes\n")
    os.setxattr(ctx / "notes.txt", "user.note", b"kept")
    (ctx / "w1.txt").write_text("1\n")
    (ctx / "w2.txt").write_text("2\n")
    os.symlink("app/conf/a.conf", ctx / "link")
    (ctx / "app.conf").write_text("home=/opt/app\n")
    (ctx / ".dockerignore").write_text("# comment\n*.log\n**/*.log\n!keep.log\nsecret/\n**/tmp*\n")
    src = ctx / "tarsrc"
    (src / "x/y").mkdir(parents=True)
    (src / "x/y/file").write_text("from the tar\n")
    os.symlink("y/file", src / "x/sym")
    sh("tar", "-czf", str(ctx / "data.tar.gz"), "-C", str(src), "--owner=1000", "--group=50", "x")
    shutil.rmtree(src)


@pytest.fixture
def ctx(tmp_path) -> Path:
    """An empty build context."""
    d = tmp_path / "ctx"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    work = tmp_path_factory.mktemp("build")
    oci = make_base(work)
    store = work / "store"
    ok(store, "load", str(oci), "--tag", "bb:1")
    podman = Podman(work / "podman")
    try:
        podman.load_oci(oci, "bb", "bb:1")
        yield {"work": work, "store": store, "podman": podman}
    finally:
        podman.close()
        unmount_all_below(work)


def test_full_build_matches_podman(env, tmp_path, ctx):
    store, podman = env["store"], env["podman"]
    make_context(ctx)
    (tmp_path / "Dockerfile.ours").write_text(dockerfile(OURS))
    (tmp_path / "Dockerfile.podman").write_text(dockerfile(THEIRS))

    r = unionfs(store, "build", "-t", "t:1", "-t", "t:also", "-f", str(tmp_path / "Dockerfile.ours"),
                "--build-arg", "VERSION=2.5", str(ctx))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "[1/3] STEP 1/29: FROM $BASE AS builder"          # the unused stage is not built
    assert "busybox-that-is-not-needed" not in r.stdout
    assert "hello from the builder" not in r.stdout
    assert any(line.startswith("[3/3] STEP ") and "RUN touch here" in line for line in lines)
    image_id = lines[-1]
    assert len(image_id) == 64 and ok(store, "inspect", "t:also").count(image_id) >= 1
    podman.build(ctx, tmp_path / "Dockerfile.podman", "t:1", "VERSION=2.5")

    # The trees: names, types, modes, owners, sizes, contents, link targets, xattrs.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok(store, "mount", "t:1", str(mnt))
    try:
        pm = podman.mount("t:1")
        ours, theirs = snapshot(mnt), snapshot(pm)
    finally:
        ok(store, "umount", str(mnt))
    for k in list(theirs):
        if k in PODMAN_ARTIFACTS:
            del theirs[k]
    assert diff_snapshots(theirs, ours) == []
    assert ours["opt/app/version"][4] == 4 and ours["opt/app/docs/notes.txt"][1:4] == (0o640, 1000, 50)
    assert ours["opt/app/docs/notes.txt"][7] == {"user.note": b"kept"}
    assert "opt/app/conf" not in ours and "opt/app/conf-renamed/a.conf" in ours and "bin/mkfifo" not in ours
    assert "opt/app/debug.log" not in ours and "secret" not in ours and "opt/app/docs/keep.log" in ours
    assert ours["opt/data/x/y/file"][2:4] == (1000, 50) and ours["opt/data/x/sym"][5] == "y/file"
    assert ["opt/app/main-link.sh", "opt/app/main.sh"] in ours["<hardlinks>"]

    # The config, and a history that lines up with the layers.
    cfg, pcfg = our_config(store, "t:1"), podman.config("t:1")
    assert config_fields(cfg) == config_fields(pcfg)
    inner = cfg["config"]
    assert "OLD=/opt/app" in inner["Env"] and "SEES=first" in inner["Env"] and "KEEP=$VERSION" in inner["Env"]
    assert "UNSET=dflt" in inner["Env"] and "ALT=set" in inner["Env"] and "T=second" in inner["Env"]
    assert inner["Healthcheck"] == {"Test": ["CMD", "true"], "Interval": 30 * 10**9, "Timeout": 5 * 10**9,
                                    "Retries": 3}
    hist = cfg["history"]
    assert sum(not h.get("empty_layer") for h in hist) == len(cfg["rootfs"]["diff_ids"])
    by = [h["created_by"] for h in hist]
    assert "/bin/sh -c #(nop) ENV APP_HOME=/opt/app VERSION=2.5" in by
    theirs_by = [h["created_by"] for h in pcfg["history"]]
    # created_by as podman writes it
    for what in ("touch here", "USER app", "EXPOSE", "ONBUILD", "in /wild/", "in /opt/app/docs/"):
        def norm(b: str) -> str:
            return re.sub(r"(dir|file|multi):[0-9a-f]{64}", r"\1:HASH", b)   # (the hashes are each tool's own)
        assert [norm(b) for b in by if what in b] == [norm(b) for b in theirs_by if what in b], what
    assert [b for b in by if "COPY" in b][0].startswith("/bin/sh -c #(nop) COPY dir:")
    hist_out = ok(store, "history", "t:1")
    assert "<empty>" in hist_out and "USER app" in hist_out

    # What we save, podman loads and runs (and the ONBUILD trigger runs in a child build).
    ok(store, "save", "t:1", "-o", str(tmp_path / "t.tar"))
    assert "Loaded image" in podman("load", "-i", str(tmp_path / "t.tar"))
    saved = json.loads(sh("skopeo", "inspect", "--config", f"docker-archive:{tmp_path / 't.tar'}").stdout)
    assert saved["config"]["Entrypoint"] == ["/bin/sh", "-c"]
    (tmp_path / "child").mkdir()
    (tmp_path / "child/Dockerfile").write_text("FROM t:1\nLABEL child=yes\n")
    r = unionfs(store, "build", "-t", "child:1", str(tmp_path / "child"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "onbuild trigger ran" in r.stdout
    child_cfg = our_config(store, "child:1")
    child = child_cfg["config"]
    assert not child.get("OnBuild") and child["Labels"]["child"] == "yes"
    # The trigger ran through the parent's SHELL, as a RUN of the child's.
    assert "/bin/sh -ec echo onbuild trigger ran" in [h["created_by"] for h in child_cfg["history"]]


CACHED = """FROM bb:1
ARG A=1
COPY first.txt /first.txt
RUN echo ran-run-$A; echo $A > /ran
COPY last.txt /last.txt
ENV X=$A
RUN true
"""


def _build(store: Path, ctx: Path, *args: str, env=None) -> tuple[str, str]:
    r = unionfs(store, "build", *args, str(ctx), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.splitlines()[-1], r.stdout


def ran(out: str) -> str | None:
    """What the RUN printed, if it ran (None when it came from the cache)."""
    return next((line[len("ran-run-"):] for line in out.splitlines() if line.startswith("ran-run-")), None)


def test_cache_rebuilds_only_what_changed(env, tmp_path, ctx):
    store = env["store"]
    (ctx / "Dockerfile").write_text(CACHED)
    (ctx / "first.txt").write_text("first\n")
    (ctx / "last.txt").write_text("last\n")
    first, out = _build(store, ctx, "-t", "c:1")
    assert ran(out) == "1" and "Using cache" not in out
    cfg = our_config(store, "c:1")
    assert len(cfg["rootfs"]["diff_ids"]) == 1 + 3 and cfg["history"][-1]["empty_layer"] is True   # RUN true: no layer

    t0 = time.monotonic()
    again, out = _build(store, ctx, "-t", "c:1")
    cached_seconds = time.monotonic() - t0
    assert again == first and out.count("--> Using cache") == 6 and not ran(out)
    print(f"fully cached rebuild of 7 steps: {cached_seconds:.2f} s")

    os.utime(ctx / "first.txt", (1, 1))               # only the mtime: the same image
    os.utime(ctx / "last.txt", (2, 2))
    assert _build(store, ctx)[0] == first

    (ctx / "last.txt").write_text("changed\n")        # a late file: only the steps from its COPY on
    changed, out = _build(store, ctx, "-t", "c:2")
    assert changed != first and out.count("--> Using cache") == 3 and not ran(out)
    assert our_config(store, "c:2")["rootfs"]["diff_ids"][:3] == cfg["rootfs"]["diff_ids"][:3]

    other, out = _build(store, ctx, "--build-arg", "A=2")   # an ARG counts where it is used
    assert ran(out) == "2" and out.count("--> Using cache") == 2 and other != changed
    assert _build(store, ctx)[0] == changed                # and a hit after that miss
    nocache, out = _build(store, ctx, "--no-cache")
    assert ran(out) == "1" and "Using cache" not in out
    steps = [line.split()[-1] for line in out.splitlines() if line.startswith("--> ")]
    listed, listed_all = ok(store, "images"), ok(store, "images", "-a")
    assert steps[2][:12] not in listed and steps[2][:12] in listed_all   # a build step's image: hidden, as docker
    assert other[:12] in listed and nocache[:12] in listed                # untagged results are listed

    # SOURCE_DATE_EPOCH: every created time, and the layers' mtimes capped: two fresh builds, one image.
    e = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
    a, _ = _build(store, ctx, "--no-cache", "-t", "r:1", env=e)
    time.sleep(1.1)
    b, _ = _build(store, ctx, "--no-cache", "-t", "r:2", env=e)
    assert a == b
    rcfg = our_config(store, "r:1")
    assert rcfg["created"] == "2023-11-14T22:13:20Z"
    assert {h["created"] for h in rcfg["history"][-6:]} == {"2023-11-14T22:13:20Z"}   # ours, not the base's


def test_bad_input_one_line_naming_file_and_line(env, tmp_path, ctx):
    store = env["store"]
    (ctx / "f").write_text("f")
    (tmp_path / "outside").write_text("secret")
    os.symlink("../outside", ctx / "escape")
    cases = [
        ("FROM bb:1\n\nFOO bar\n", "Dockerfile:3: unknown instruction: FOO"),
        ("FROM bb:1\nRUN <<EOF\necho\n", "Dockerfile:2: RUN: unterminated heredoc <<EOF"),
        ("FROM bb:1\nCOPY ../outside /x\n", "Dockerfile:2: COPY: ../outside: outside the build context"),
        ("FROM bb:1\nCOPY escape /x\n", "Dockerfile:2: COPY: escape: outside the build context (through a symlink)"),
        ("FROM bb:1\nCOPY missing /x\n", "Dockerfile:2: COPY: missing: no such file or directory"),
        ("FROM bb:1\nCOPY --from=nostage /f /x\n", "Dockerfile:2: COPY: --from=nostage: no such stage or image"),
        ("FROM missing:1\n", "Dockerfile:1: FROM: missing:1: no such image"),
        ("RUN true\n", "Dockerfile:1: RUN: the first instruction (after ARGs) must be FROM"),
        ("FROM bb:1\nSHELL /bin/sh\n", "Dockerfile:2: SHELL: needs the JSON form"),
        ("FROM bb:1\nUSER nobody\nRUN true\n", "Dockerfile:3: RUN: unable to find user nobody: no matching entries in the image's /etc/passwd"),
    ]
    for text, want in cases:
        (ctx / "Dockerfile").write_text(text)
        r = unionfs(store, "build", str(ctx))
        assert r.returncode == 2, (text, r.stdout, r.stderr)
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1 and want in err, (text, err)
        if "COPY" not in text and "USER" not in text:   # syntax errors: found before any step runs
            assert "STEP" not in r.stdout, (text, r.stdout)
    (ctx / "Dockerfile").write_text("FROM bb:1\nFROM bb:1 AS b\n")
    r = unionfs(store, "build", "--target", "nope", str(ctx))
    assert r.returncode == 2 and "--target nope: no stage of that name" in r.stderr


def test_failing_run_and_killed_build_leave_nothing_half_built(env, tmp_path, ctx):
    store = env["store"]
    (ctx / "Dockerfile").write_text("FROM bb:1\nENV A=1\nRUN echo partial > /p; echo to-stderr >&2; exit 3\n")
    r = unionfs(store, "build", "-t", "fail:1", str(ctx))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "to-stderr" in r.stderr and "Dockerfile:3: RUN" in r.stderr and "status 3" in r.stderr
    assert "fail:1" not in ok(store, "images") and ok(store, "ps", "-aq").strip() == ""

    (ctx / "Dockerfile").write_text("FROM bb:1\nRUN echo started-$((40+2)); sleep 60\n")
    proc = subprocess.Popen(unionfs_cmd("--root", str(store), "build", "-t", "killed:1", str(ctx)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("STEP 1/2")
        deadline = time.monotonic() + 60
        while proc.stdout.readline() != "started-42\n":   # the RUN's own output: its container runs
            assert time.monotonic() < deadline
        proc.kill()                                   # mid-RUN: its container and mount are left behind
        proc.wait(timeout=30)
        assert ok(store, "ps", "-aq").strip() != ""
        (ctx / "Dockerfile").write_text("FROM bb:1\nRUN echo next > /next\n")
        r = unionfs(store, "build", "-t", "next:1", str(ctx), timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert ok(store, "ps", "-aq").strip() == ""    # the killed build's container: stopped, unmounted, removed
        images = ok(store, "images")
        assert "killed" not in images and "next" in images
        with open("/proc/self/mountinfo") as f:
            assert str(store) not in f.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_stdin_target_label_quiet_network_platform(env, tmp_path, ctx):
    store = env["store"]
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d/f").write_text("in a tar\n")
    for opt, name in (("-cf", "plain.tar"), ("-cjf", "b.tar.bz2"), ("-cJf", "x.tar.xz"), ("-czf", "z.txt")):
        sh("tar", opt, str(ctx / name), "-C", str(src), "d")         # told by content, not by name
    (ctx / "fake.tar.gz").write_text("not an archive\n")
    text = ("FROM --platform=$BUILDPLATFORM bb:1 AS one\nMAINTAINER tests <t@example.com>\nARG TARGETARCH\n"
            "LABEL stage=one arch=$TARGETARCH\n"
            "ADD plain.tar b.tar.bz2 x.tar.xz z.txt fake.tar.gz /t/\nCOPY z.txt /copied/z.txt\nCOPY fake.tar.gz /f\n"
            "COPY --from=bb:1 /etc/group /from-image/\n"
            "RUN <<EOF\n#!/bin/sh -e\necho \"$0\" > /script-name\nEOF\n"              # a heredoc with its own #!
            "RUN --network=none sh -c 'cat /proc/net/dev > /net; echo \"$HTTP_PROXY\" > /proxy'\n"
            "FROM bb:1 AS two\nLABEL stage=two\nRUN exit 1\n")
    r = unionfs(store, "build", "-q", "-f", "-", "--target", "one", "--label", "by=test", "-t", "one:1",
                "--build-arg", "HTTP_PROXY=http://proxy.example:3128", str(ctx), input=text)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("sha256:")     # -q: the id alone
    cfg = our_config(store, "one:1")
    assert cfg["config"]["Labels"] == {"stage": "one", "arch": "amd64", "by": "test"}
    assert cfg["author"] == "tests <t@example.com>"                         # MAINTAINER, kept by later steps
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok(store, "mount", "one:1", str(mnt))
    try:
        ifaces = [line.split(":")[0].strip() for line in (mnt / "net").read_text().splitlines()[2:]]
        proxy = (mnt / "proxy").read_text()
        added = sorted(str(p.relative_to(mnt / "t")) for p in (mnt / "t").rglob("*"))
        copied, fake = (mnt / "copied/z.txt").read_bytes(), (mnt / "f").read_text()
        group = (mnt / "from-image/group").read_text()
        script_name, dev = (mnt / "script-name").read_text(), os.listdir(mnt / "dev")
    finally:
        ok(store, "umount", str(mnt))
    assert ifaces == ["lo"]                                                # a network namespace of its own
    assert proxy == "http://proxy.example:3128\n" and "proxy.example" not in json.dumps(cfg["history"])
    assert added == ["d", "d/f", "fake.tar.gz"]                             # four archives extracted, one not
    assert copied[:2] == b"\x1f\x8b" and fake == "not an archive\n"        # COPY never extracts
    assert "staff:x:50:" in group                                          # COPY --from an image of the store
    assert script_name == "/dev/.unionfs-run-script\n" and dev == []       # run as a file, not left behind
    r = unionfs(store, "build", "--platform", "linux/arm64", "-f", "-", str(ctx), input=text)
    assert r.returncode == 2 and "only linux/amd64" in r.stderr


@pytest.mark.skipif(not os.path.exists("/usr/bin/docker-registry"), reason="docker-registry is needed")
def test_built_image_pushes_and_pulls(env, tmp_path, ctx):
    from registry_server import Registry
    store = env["store"]
    (ctx / "f").write_text("pushed\n")
    (ctx / "Dockerfile").write_text("FROM bb:1\nCOPY f /f\nCMD [\"cat\", \"/f\"]\n")
    image_id, _ = _build(store, ctx, "-t", "push:1")
    e = dict(os.environ, UNIONFS_CONFIG_DIR=str(tmp_path / "cfg"), DOCKER_CONFIG=str(tmp_path / "docker"))
    with Registry(tmp_path / "registry") as reg:
        ref = f"{reg.host}/built/push:1"
        ok(store, "push", "push:1", ref, "--insecure", env=e)
        seen = json.loads(sh("skopeo", "inspect", "--tls-verify=false", "--config", f"docker://{ref}").stdout)
        assert seen["config"]["Cmd"] == ["cat", "/f"] and len(seen["rootfs"]["diff_ids"]) == 2
        other = tmp_path / "other"
        ok(other, "pull", ref, "--insecure", env=e)
        assert json.loads(ok(other, "inspect", ref))[0]["Id"] == "sha256:" + image_id


COPY_RULES = """FROM bb:1
COPY d/ /home/app/
COPY top /etc/passwd2
COPY top /root/
COPY top /newdir/newname
COPY dirlink /viadirlink
COPY d /tmp/
COPY --chown=app top d/a /home/app/sub/
RUN ln -s /home/app /linkdir
COPY top /linkdir/
"""


def test_copy_destination_rules_match_podman(env, tmp_path):
    """Existing destination dirs keep their owner and mode, a symlinked destination is followed inside the
    image, a file lands on DEST/ or DEST, a source symlink to a directory copies its contents."""
    store, podman = env["store"], env["podman"]
    ctx = tmp_path / "ctx"
    (ctx / "d/sub").mkdir(parents=True)
    (ctx / "d/a").write_text("a\n")
    (ctx / "d/sub/s").write_text("s\n")
    os.chmod(ctx / "d/sub", 0o700)
    (ctx / "top").write_text("top\n")
    os.symlink("d", ctx / "dirlink")
    (ctx / "Dockerfile").write_text(COPY_RULES)
    _build(store, ctx, "-t", "rules:1")
    podman.build(ctx, ctx / "Dockerfile", "rules:1")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok(store, "mount", "rules:1", str(mnt))
    try:
        ours, theirs = snapshot(mnt), snapshot(podman.mount("rules:1"))
    finally:
        ok(store, "umount", str(mnt))
    for k in PODMAN_ARTIFACTS:
        theirs.pop(k, None)
    assert diff_snapshots(theirs, ours) == []
    assert ours["home/app"][2:4] == (1000, 1000) and ours["home/app/top"][2:4] == (0, 0)
    assert ours["home/app/sub/top"][2:4] == (1000, 1000) and "viadirlink/sub/s" in ours
