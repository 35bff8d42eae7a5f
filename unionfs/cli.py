"""The ``unionfs`` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import UsageError
from .fuse.daemon import build_config, mount, umount


def _cmd_mount(args: argparse.Namespace) -> int:
    if len(args.targets) > 2:
        raise UsageError("mount takes [IMAGE] MOUNTPOINT")
    name = args.targets[0] if len(args.targets) == 2 else None
    mountpoint = args.targets[-1]
    options = args.options or []
    if name is None:
        if args.writable:
            raise UsageError("--writable needs an IMAGE (for layer directories, give --upper and --work)")
        from .fuse.daemon import split_lowerdir
        lower = [d for value in args.lower or [] for d in split_lowerdir(value)]
        return mount(build_config(mountpoint, lower, args.upper, args.work, options, args.foreground, args.log))
    from .container import commands as cc, model as cm
    from .image.commands import mount_image
    if args.lower or any(o.startswith("lowerdir=") or ",lowerdir=" in o for o in options):
        raise UsageError("give an IMAGE or CONTAINER, or lower layers (--lower, -o lowerdir=), not both")
    store = _store(args)
    if not args.writable:
        c = cm.find(store, name) if store.exists() else None
        if c is not None:   # a container's name or id first, then an image's
            if args.upper or args.work:
                raise UsageError("a container's layers come from the store: no --upper/--work")
            return cc.mount_container(store, c, mountpoint, options, args.foreground, args.log)
    if args.upper or args.work:
        raise UsageError("an image's writable layer comes from the store: use --writable, not --upper/--work")
    if args.writable:
        return cc.create_and_mount(store, name, mountpoint, options, args.foreground, args.log)
    return mount_image(store, name, mountpoint, options, args.foreground, args.log)


# --- images ------------------------------------------------------------------------

def _store(args: argparse.Namespace):
    from .image.store import Store
    return Store(getattr(args, "root", None))


def _cmd_load(args: argparse.Namespace) -> int:
    from .image.load import load
    from .image.model import Reference
    tag = Reference.parse(args.tag) if args.tag else None
    for loaded in load(_store(args), args.path, tag):
        for t in loaded.tags:
            print(f"Loaded image: {t}")
        if not loaded.tags:
            print(f"Loaded image ID: {loaded.image_id}")
            if loaded.ref_names:
                print(f"unionfs: note: the OCI ref name(s) {', '.join(loaded.ref_names)} name no repository; "
                      "name the image with --tag REPO:TAG", file=sys.stderr)
        if not args.quiet:
            print(f"layers: {loaded.new_layers} extracted, {loaded.reused_layers} already in the store",
                  file=sys.stderr)
    return 0


def _cmd_images(args: argparse.Namespace) -> int:
    from .build.cache import intermediates
    from .image.report import images_table
    store = _store(args)
    print(images_table(store, args.no_trunc, hide=set() if args.all else intermediates(store)))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .image.report import inspect
    store = _store(args)
    out = [inspect(store, store.image(store.resolve(n))) for n in args.images]
    print(json.dumps(out, indent=4))
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    from .image.report import history_table
    store = _store(args)
    print(history_table(store.image(store.resolve(args.image)), args.no_trunc))
    return 0


def _cmd_tag(args: argparse.Namespace) -> int:
    from .image.commands import tag
    tag(_store(args), args.source, args.target)
    return 0


def _cmd_rmi(args: argparse.Namespace) -> int:
    from .container.model import using
    from .image.commands import rmi
    store = _store(args)
    with store.locked():
        for name in args.images:
            removed = rmi(store, name, args.force, lambda image_id: [c.short_id for c in using(store, image_id)])
            for t in removed.untagged:
                print(f"Untagged: {t}")
            if removed.deleted:
                print(f"Deleted: {removed.deleted}")
    return 0


def _cmd_umount(args: argparse.Namespace) -> int:
    store = _store(args)
    if not os.path.lexists(args.mountpoint) and "/" not in args.mountpoint and store.exists():
        from .container.commands import umount_container   # a container's name or id
        return umount_container(store, args.mountpoint)
    return umount(args.mountpoint)


# --- containers --------------------------------------------------------------------

def _cmd_create(args: argparse.Namespace) -> int:
    from .container.commands import create
    print(create(_store(args), args.image, args.name).id)
    return 0


def _cmd_ps(args: argparse.Namespace) -> int:
    from .container.commands import ps_table
    print(ps_table(_store(args), no_trunc=args.no_trunc, quiet=args.quiet, all_=args.all))
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    from .container.commands import remove
    for name in remove(_store(args), args.containers, args.force, args.volumes):
        print(name)
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from .container.commands import diff_lines
    for line in diff_lines(_store(args), args.container):
        print(line)
    return 0


def _cmd_commit(args: argparse.Namespace) -> int:
    from .container.commit import commit
    done = commit(_store(args), args.container, args.ref, args.message or "", args.author, args.change or [])
    for line in done.skipped:
        print(f"unionfs: warning: {line}", file=sys.stderr)
    print(done.image_id)
    return 0


def _cmd_save(args: argparse.Namespace) -> int:
    from .image.save import save
    save(_store(args), args.images, args.output, args.format)
    return 0


def _docker_status(fn, args: argparse.Namespace) -> int:
    """run and exec exit as docker's: the command's status, 125 when unionfs failed, 126/127 from the runtime."""
    from .container.lifecycle import RunFailed
    try:
        return fn(args)
    except RunFailed as e:
        print("unionfs: " + "; ".join(str(e).splitlines()), file=sys.stderr)
        return e.code
    except UsageError as e:
        print("unionfs: " + "; ".join(str(e).splitlines()), file=sys.stderr)
        return 125


def _cmd_run(args: argparse.Namespace) -> int:
    from .container.run import options, run

    def go(a: argparse.Namespace) -> int:
        opts = options(a.command, env=a.env or [], env_files=a.env_file or [], volumes_=a.volume or [],
                       mounts=a.mount or [], tmpfs=a.tmpfs or [], entrypoint=a.entrypoint, workdir=a.workdir,
                       user=a.user, hostname=a.hostname, network=a.network, read_only=a.read_only,
                       cap_add=a.cap_add or [], cap_drop=a.cap_drop or [], privileged=a.privileged, init=a.init,
                       tty=a.tty, interactive=a.interactive)
        return run(_store(a), a.image, opts, a.name, a.rm, a.detach, a.runtime)
    return _docker_status(go, args)


def _cmd_exec(args: argparse.Namespace) -> int:
    from .container.lifecycle import exec_in
    from .container.spec import parse_env
    return _docker_status(lambda a: exec_in(_store(a), a.container, a.command, parse_env(a.env or []), a.user,
                                            a.workdir, a.tty, a.interactive), args)


def _cmd_start(args: argparse.Namespace) -> int:
    from .container.run import start
    code = 0
    for name in args.containers:
        code = start(_store(args), name, args.attach, args.interactive)
        if not args.attach:
            print(name)
    return code


def _cmd_stop(args: argparse.Namespace) -> int:
    from .container.lifecycle import restart, stop
    for name in args.containers:
        (restart if args.verb == "restart" else stop)(_store(args), name, args.time)
        print(name)
    return 0


def _cmd_kill(args: argparse.Namespace) -> int:
    from .container.lifecycle import kill
    from .container.spec import parse_signal
    for name in args.containers:
        kill(_store(args), name, parse_signal(args.signal))
        print(name)
    return 0


def _cmd_wait(args: argparse.Namespace) -> int:
    from .container.lifecycle import wait
    for name in args.containers:
        print(wait(_store(args), name), flush=True)
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from .container.lifecycle import logs
    tail = None if args.tail in (None, "all") else int(args.tail)
    logs(_store(args), args.container, args.follow, tail)
    return 0


def _cmd_volume(args: argparse.Namespace) -> int:
    from .container import volumes
    store = _store(args)
    if args.action == "create":
        with store.locked():
            print(volumes.create(store, args.names[0] if args.names else None)[0].name)
    elif args.action == "ls":
        print(volumes.ls_table(store, args.quiet))
    elif args.action == "inspect":
        print(json.dumps([volumes.resolve(store, n).inspect() for n in args.names], indent=4))
    elif args.action == "rm":
        for n in volumes.remove(store, args.names, args.force):
            print(n)
    elif args.action == "prune":
        for n in volumes.prune(store, args.all):
            print(n)
    return 0


def _tail(value: str) -> str:
    if value != "all" and not value.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError("a number of lines, or all")
    return value


def _key_values(values: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for kv in values or []:
        k, eq, v = kv.partition("=")
        if not k:
            raise UsageError(f"{what} {kv!r}: give KEY=VALUE")
        out[k] = v if eq else os.environ.get(k, "")
    return out


def _cmd_build(args: argparse.Namespace) -> int:
    from .build.builder import BuildError, Options, build
    opts = Options(tags=args.tag or [], dockerfile=args.file, build_args=_key_values(args.build_arg, "--build-arg"),
                   target=args.target, no_cache=args.no_cache, labels=_key_values(args.label, "--label"),
                   platform=args.platform, quiet=args.quiet, runtime=args.runtime)
    try:
        build(_store(args), args.context, opts)
    except BuildError as e:
        print("unionfs: " + "; ".join(str(e).splitlines()), file=sys.stderr)
        return e.status
    return 0


def _build_parser(sub, common) -> None:
    b = sub.add_parser("build", help="build an image from a Dockerfile", parents=[common],
                       description="Build an image from CONTEXT/Dockerfile (or -f FILE; -f - reads stdin): each RUN "
                                   "runs in a container on a writable union mount, each step is cached.")
    b.add_argument("context", metavar="CONTEXT")
    b.add_argument("--tag", "-t", action="append", metavar="NAME[:TAG]", help="name the image (repeatable)")
    b.add_argument("--file", "-f", metavar="DOCKERFILE", help="default CONTEXT/Dockerfile; - for stdin")
    b.add_argument("--build-arg", action="append", metavar="KEY=VALUE", help="set a build-time variable (ARG)")
    b.add_argument("--target", metavar="STAGE", help="build up to this stage")
    b.add_argument("--no-cache", action="store_true", help="run every step again")
    b.add_argument("--label", action="append", metavar="KEY=VALUE", help="add a label to the image")
    b.add_argument("--platform", metavar="OS/ARCH", help="only linux/amd64, this host's")
    b.add_argument("--quiet", "-q", action="store_true", help="print only the image id")
    b.add_argument("--runtime", metavar="RUNTIME", help="crun or runc, or a path (default: crun, else runc)")
    b.set_defaults(func=_cmd_build)


def _container_parsers(sub, common) -> None:
    c = sub.add_parser("create", help="make a container: an image plus a writable layer of its own", parents=[common])
    c.add_argument("image", metavar="IMAGE")
    c.add_argument("--name", metavar="NAME", help="name it (default: a generated name)")
    c.set_defaults(func=_cmd_create)

    ps = sub.add_parser("ps", help="list containers", parents=[common])
    ps.add_argument("--no-trunc", action="store_true", help="show full container ids")
    ps.add_argument("--quiet", "-q", action="store_true", help="only ids")
    ps.add_argument("--all", "-a", action="store_true", help="all containers (default: the running ones)")
    ps.set_defaults(func=_cmd_ps)

    rm = sub.add_parser("rm", help="remove containers (and their writable layers)", parents=[common])
    rm.add_argument("containers", nargs="+", metavar="CONTAINER")
    rm.add_argument("--force", "-f", action="store_true", help="kill a running, unmount a mounted container first")
    rm.add_argument("--volumes", "-v", action="store_true", help="also remove its anonymous volumes")
    rm.set_defaults(func=_cmd_rm)

    df = sub.add_parser("diff", help="changes of a container's writable layer (A added, C changed, D deleted)",
                        parents=[common])
    df.add_argument("container", metavar="CONTAINER")
    df.set_defaults(func=_cmd_diff)

    cm = sub.add_parser("commit", help="a new image from a container's changes", parents=[common])
    cm.add_argument("container", metavar="CONTAINER")
    cm.add_argument("ref", nargs="?", metavar="REPO[:TAG]")
    cm.add_argument("--message", "-m", metavar="MESSAGE", help="the history entry's comment")
    cm.add_argument("--author", "-a", metavar="AUTHOR", help='e.g. "Jane Doe <jane@example.com>"')
    cm.add_argument("--change", "-c", action="append", metavar="INSTRUCTION",
                    help="apply a Dockerfile instruction: CMD, ENTRYPOINT, ENV, WORKDIR, USER, EXPOSE, LABEL, VOLUME")
    cm.set_defaults(func=_cmd_commit)

    sv = sub.add_parser("save", help="write images to a docker save archive or an OCI layout", parents=[common])
    sv.add_argument("images", nargs="+", metavar="IMAGE")
    sv.add_argument("--output", "-o", required=True, metavar="FILE",
                    help="the archive (an OCI layout is a directory unless FILE ends in .tar)")
    sv.add_argument("--format", choices=("docker", "oci"), default="docker", help="docker (default) or oci")
    sv.set_defaults(func=_cmd_save)

    rn = sub.add_parser("run", help="run a command in a new container of an image (with crun or runc)",
                        parents=[common], usage="%(prog)s [options] IMAGE [COMMAND [ARG...]]",
                        description="Create a container of IMAGE, mount it, and run COMMAND (default: the image's "
                                    "Entrypoint and Cmd) in it with an OCI runtime; exits with its status.")
    rn.add_argument("--name", metavar="NAME", help="name the container")
    rn.add_argument("--rm", action="store_true", help="remove the container (and its anonymous volumes) when it exits")
    rn.add_argument("--runtime", metavar="RUNTIME", help="crun or runc, or a path (default: crun, else runc)")
    rn.add_argument("-i", "--interactive", action="store_true", help="keep stdin open to the container")
    rn.add_argument("-t", "--tty", action="store_true", help="give the container a terminal")
    rn.add_argument("-d", "--detach", action="store_true", help="run in the background; print the container id")
    rn.add_argument("-e", "--env", action="append", metavar="K=V|K", help="set an environment variable")
    rn.add_argument("--env-file", action="append", metavar="FILE", help="K=V lines (# comments)")
    rn.add_argument("-w", "--workdir", metavar="DIR", help="the working directory (created if missing)")
    rn.add_argument("-u", "--user", metavar="NAME|UID[:GROUP|GID]", help="the user, from the image's /etc/passwd")
    rn.add_argument("--entrypoint", metavar="CMD", help="replace the image's Entrypoint (\"\" clears it)")
    rn.add_argument("-v", "--volume", action="append", metavar="SRC:DST[:ro|rw]",
                    help="a host path (bind mount) or a named volume; -v DST: an anonymous volume")
    rn.add_argument("--mount", action="append", metavar="type=bind|volume|tmpfs,...",
                    help="source=,target=,readonly,tmpfs-size=,tmpfs-mode=")
    rn.add_argument("--tmpfs", action="append", metavar="DST[:OPTS]", help="a tmpfs at DST")
    rn.add_argument("--read-only", action="store_true", help="the container's root read-only")
    rn.add_argument("--hostname", metavar="NAME", help="the container's hostname (default: its short id)")
    rn.add_argument("--network", "--net", default="host", metavar="host|none",
                    help="host (default: the host's network) or none (only loopback)")
    rn.add_argument("--cap-add", action="append", metavar="CAP", help="add a capability (or ALL)")
    rn.add_argument("--cap-drop", action="append", metavar="CAP", help="drop a capability (or ALL)")
    rn.add_argument("--privileged", action="store_true", help="every capability, /sys writable, nothing masked")
    rn.add_argument("--init", action="store_true", help="run tini as the container's pid 1 (reaps zombies)")
    rn.add_argument("image", metavar="IMAGE")
    rn.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")
    rn.set_defaults(func=_cmd_run)

    ex = sub.add_parser("exec", help="run a command in a running container", parents=[common],
                        usage="%(prog)s [options] CONTAINER COMMAND [ARG...]")
    ex.add_argument("-i", "--interactive", action="store_true", help="keep stdin open")
    ex.add_argument("-t", "--tty", action="store_true", help="a terminal")
    ex.add_argument("-e", "--env", action="append", metavar="K=V|K")
    ex.add_argument("-u", "--user", metavar="NAME|UID[:GROUP|GID]")
    ex.add_argument("-w", "--workdir", metavar="DIR")
    ex.add_argument("container", metavar="CONTAINER")
    ex.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")
    ex.set_defaults(func=_cmd_exec)

    st = sub.add_parser("start", help="start stopped containers (in the background unless -a)", parents=[common])
    st.add_argument("-a", "--attach", action="store_true", help="in the foreground: its output, its exit status")
    st.add_argument("-i", "--interactive", action="store_true", help="with -a: our stdin to it")
    st.add_argument("containers", nargs="+", metavar="CONTAINER")
    st.set_defaults(func=_cmd_start)

    for verb, text in (("stop", "stop containers: the image's StopSignal, then SIGKILL"),
                       ("restart", "stop, then start containers")):
        sp = sub.add_parser(verb, help=text, parents=[common])
        sp.add_argument("-t", "--time", type=float, default=None, metavar="SECS",
                        help="seconds before SIGKILL (default 10)")
        sp.add_argument("containers", nargs="+", metavar="CONTAINER")
        sp.set_defaults(func=_cmd_stop, verb=verb)

    kl = sub.add_parser("kill", help="send a signal to running containers", parents=[common])
    kl.add_argument("-s", "--signal", default="KILL", metavar="SIG", help="default KILL")
    kl.add_argument("containers", nargs="+", metavar="CONTAINER")
    kl.set_defaults(func=_cmd_kill)

    wt = sub.add_parser("wait", help="wait for containers to stop; print their exit codes", parents=[common])
    wt.add_argument("containers", nargs="+", metavar="CONTAINER")
    wt.set_defaults(func=_cmd_wait)

    lg = sub.add_parser("logs", help="a detached container's output", parents=[common])
    lg.add_argument("-f", "--follow", action="store_true", help="keep following while it runs")
    lg.add_argument("--tail", type=_tail, default=None, metavar="N", help="only the last N lines")
    lg.add_argument("container", metavar="CONTAINER")
    lg.set_defaults(func=_cmd_logs)

    vo = sub.add_parser("volume", help="named volumes: create, ls, inspect, rm, prune", parents=[common])
    vsub = vo.add_subparsers(dest="action", required=True, metavar="ACTION")
    vc = vsub.add_parser("create", help="a new volume (a generated name if none)", parents=[common])
    vc.add_argument("names", nargs="?", action="append", metavar="NAME")
    vl = vsub.add_parser("ls", help="list volumes", parents=[common])
    vl.add_argument("--quiet", "-q", action="store_true", help="only names")
    vi = vsub.add_parser("inspect", help="volumes as JSON", parents=[common])
    vi.add_argument("names", nargs="+", metavar="NAME")
    vr = vsub.add_parser("rm", help="remove volumes no container uses", parents=[common])
    vr.add_argument("names", nargs="+", metavar="NAME")
    vr.add_argument("--force", "-f", action="store_true", help="no error for a missing volume")
    vp = vsub.add_parser("prune", help="remove unused anonymous volumes", parents=[common])
    vp.add_argument("--all", "-a", action="store_true", help="unused named volumes too")
    vo.set_defaults(func=_cmd_volume)


def parser() -> argparse.ArgumentParser:
    root_help = "the image store (default: $UNIONFS_ROOT, /var/lib/unionfs as root, else $XDG_DATA_HOME/unionfs)"
    p = argparse.ArgumentParser(prog="unionfs", description="A union filesystem for container images (FUSE).")
    p.add_argument("--root", metavar="DIR", help=root_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", metavar="DIR", default=argparse.SUPPRESS, help=root_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("mount", help="mount a container, an image or a stack of layers", parents=[common],
                       usage="%(prog)s [options] [CONTAINER|IMAGE] MOUNTPOINT",
                       description="Mount a container (name or id: its image and its writable layer), an image "
                                   "from the store (repo:tag, id or id prefix), or layer directories (topmost "
                                   "first), as one merged tree.")
    m.add_argument("targets", nargs="+", metavar="[CONTAINER|IMAGE] MOUNTPOINT")
    m.add_argument("--writable", "-w", action="store_true",
                   help="with IMAGE: add a fresh writable layer (a container) from the store")
    m.add_argument("--lower", "-l", action="append", metavar="TOP:...:BOTTOM",
                   help="read-only layers, topmost first (as overlayfs's lowerdir)")
    m.add_argument("--upper", metavar="DIR", help="writable layer")
    m.add_argument("--work", metavar="DIR", help="work dir, on the same filesystem as --upper")
    m.add_argument("-o", dest="options", action="append", metavar="OPTS",
                   help="lowerdir=,upperdir=,workdir= and FUSE options (allow_other, default_permissions, "
                        "ro, fsname=, debug, suid, dev, ...)")
    m.add_argument("-f", "--foreground", action="store_true", help="serve in the foreground, log to stderr")
    m.add_argument("--log", metavar="FILE", help="write the daemon's log to FILE")
    m.set_defaults(func=_cmd_mount)

    u = sub.add_parser("umount", help="unmount (also a mount whose daemon died)", parents=[common])
    u.add_argument("mountpoint", metavar="MOUNTPOINT|CONTAINER")
    u.set_defaults(func=_cmd_umount)

    ld = sub.add_parser("load", help="load images from a docker save archive or an OCI layout", parents=[common],
                        description="Load a docker save archive (tar) or an OCI image layout (directory or tar) "
                                    "into the store; layers are verified and extracted once.")
    ld.add_argument("path", metavar="PATH")
    ld.add_argument("--tag", "-t", metavar="REPO[:TAG]", help="also name the (single) loaded image")
    ld.add_argument("--quiet", "-q", action="store_true", help="print only the names loaded")
    ld.set_defaults(func=_cmd_load)

    im = sub.add_parser("images", help="list images", parents=[common])
    im.add_argument("--no-trunc", action="store_true", help="show full image ids")
    im.add_argument("--all", "-a", action="store_true", help="also the untagged images of build steps")
    im.set_defaults(func=_cmd_images)

    ins = sub.add_parser("inspect", help="an image's details as JSON (as docker image inspect)", parents=[common])
    ins.add_argument("images", nargs="+", metavar="IMAGE")
    ins.set_defaults(func=_cmd_inspect)

    hi = sub.add_parser("history", help="an image's history, newest first", parents=[common])
    hi.add_argument("image", metavar="IMAGE")
    hi.add_argument("--no-trunc", action="store_true", help="show full commands and layer ids")
    hi.set_defaults(func=_cmd_history)

    tg = sub.add_parser("tag", help="name an image", parents=[common])
    tg.add_argument("source", metavar="IMAGE")
    tg.add_argument("target", metavar="REPO[:TAG]")
    tg.set_defaults(func=_cmd_tag)

    rm = sub.add_parser("rmi", help="remove images (and layers no image uses)", parents=[common])
    rm.add_argument("images", nargs="+", metavar="IMAGE")
    rm.add_argument("--force", "-f", action="store_true", help="remove an image with several tags by id")
    rm.set_defaults(func=_cmd_rmi)
    _container_parsers(sub, common)
    _build_parser(sub, common)

    from .registry.commands import add_parsers as add_registry_parsers   # pull, push, login, logout
    add_registry_parsers(sub, common)
    return p


def _mount_program(argv: list[str]) -> int:
    """fuse-overlayfs's command line, for podman's ``mount_program`` and for mount.fuse3
    (``mount -t fuse.unionfs``, /etc/fstab): ``unionfs [-f] [-d] -o OPTS [SOURCE] MOUNTPOINT``.
    Returns once mounted (in front with -f); SOURCE, if given, names the mount (fsname)."""
    p = argparse.ArgumentParser(prog="unionfs", usage="%(prog)s -o lowerdir=...[,upperdir=...,workdir=...] "
                                "[SOURCE] MOUNTPOINT")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")
    p.add_argument("-f", dest="foreground", action="store_true")
    p.add_argument("-d", dest="debug", action="store_true", help="foreground and debug log")
    p.add_argument("targets", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    args = p.parse_intermixed_args(argv)
    if len(args.targets) > 2:
        raise UsageError("give [SOURCE] MOUNTPOINT")
    options = list(args.options)
    if len(args.targets) == 2 and not any(o.startswith("fsname=") or ",fsname=" in o for o in options):
        options.append("fsname=" + args.targets[0].replace(",", "_"))
    if args.debug:
        options.append("debug")
    return mount(build_config(args.targets[-1], [], None, None, options, args.foreground or args.debug))


def _is_mount_program_argv(argv: list[str]) -> bool:
    """``-o ...`` first (podman), or SOURCE MOUNTPOINT -o ... (mount.fuse3), not a subcommand."""
    if not argv or argv[0] in ("-h", "--help", "--version", "--root") or argv[0].startswith("--root="):
        return False
    if argv[0].startswith("-o") or argv[0] in ("-f", "-d"):
        return True
    return argv[0] not in _COMMANDS and "-o" in argv


_COMMANDS = {"mount", "umount", "load", "images", "inspect", "history", "tag", "rmi", "create", "ps", "rm", "diff",
             "commit", "save", "build", "run", "start", "stop", "restart", "kill", "wait", "logs", "exec", "volume",
             "pull", "push", "login", "logout"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"] or argv == ["-V"]:
        from . import __version__
        print(f"unionfs version {__version__}")
        return 0
    if _is_mount_program_argv(argv):
        try:
            return _mount_program(argv)
        except UsageError as e:
            print("unionfs: " + "; ".join(str(e).splitlines()), file=sys.stderr)
            return 2
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print("unionfs: " + "; ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    except OSError as e:   # a path the user gave, a damaged store, a full disk: one line, exit status 1
        where = f"{os.fsdecode(e.filename)}: " if e.filename else ""
        print(f"unionfs: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
