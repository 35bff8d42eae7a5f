"""The ``unionfs`` command line: argparse wired to one function per command, and nothing else.

Each ``_cmd_*`` parses nothing of its own and decides nothing: it hands the arguments to the
function of the package the command belongs to (``image``, ``container``, ``build``,
``registry``, ``fuse.daemon``) and prints what that returns.  :func:`main` turns our errors into one
line and an exit status (2 for a mistake, 1 for an OS error).  Also fuse-overlayfs's command line,
for podman's ``mount_program`` and mount.fuse3.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

from .errors import UsageError, one_line
from .routing import COMMANDS as _COMMANDS
from .routing import is_mount_program_argv as _is_mount_program_argv


def _cmd_mount(args: argparse.Namespace) -> int:
    from .container.commands import mount_target
    if len(args.targets) > 2:
        raise UsageError("mount takes [IMAGE] MOUNTPOINT")
    name = args.targets[0] if len(args.targets) == 2 else None
    store = _store(args)
    if name is not None and args.lazy:   # REFERENCE: the image from its registry, content on first read
        from .registry.commands import pull_lazy_cmd
        name = pull_lazy_cmd(args, store, name)
    return mount_target(store, name, args.targets[-1], args.lower or [], args.upper, args.work,
                        args.options or [], args.writable, args.foreground, args.log, not args.no_fill)


# --- images ------------------------------------------------------------------------

def _store(args: argparse.Namespace):
    from .image.store import Store
    return Store(getattr(args, "root", None))


def _cmd_load(args: argparse.Namespace) -> int:
    from .image.load import load
    from .image.model import Reference
    from .image.report import loaded_lines
    tag = Reference.parse(args.tag) if args.tag else None
    for loaded in load(_store(args), args.path, tag):
        for line, to_stderr in loaded_lines(loaded, args.quiet):
            print(line, file=sys.stderr if to_stderr else sys.stdout)
    return 0


def _cmd_images(args: argparse.Namespace) -> int:
    from .build.cache import intermediates
    from .image.report import images_table
    store = _store(args)
    print(images_table(store, args.no_trunc, hide=set() if args.all else intermediates(store)))
    if store.exists():
        from .registry.lazy import lazy_report
        report = lazy_report(store)   # layers of pull --lazy not yet whole
        if report:
            print("\n" + report)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .image.report import inspect
    store = _store(args)
    out = [inspect(store, store.image(store.resolve(n))) for n in args.images]
    from .registry.lazy import lazy_inspect
    for o in out:   # layers of pull --lazy not yet whole: how much is local
        if lazy := lazy_inspect(store, o["RootFS"]["Layers"]):
            o["LazyLayers"] = lazy
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
    from .container.commands import rmi
    return _print_lines(rmi(_store(args), args.images, args.force))


def _cmd_umount(args: argparse.Namespace) -> int:
    if os.path.lexists(args.mountpoint) or "/" in args.mountpoint:   # a path: no store, no container
        from .fuse.daemon import umount
        return umount(args.mountpoint)
    from .container.commands import umount_target
    return umount_target(_store(args), args.mountpoint)


# --- containers --------------------------------------------------------------------

def _cmd_create(args: argparse.Namespace) -> int:
    from .container.commands import create
    store = _store(args)
    image = args.image
    if args.lazy:
        from .registry.commands import pull_lazy_cmd
        image = pull_lazy_cmd(args, store, image)
    print(create(store, image, args.name).id)
    return 0


def _cmd_ps(args: argparse.Namespace) -> int:
    from .container.commands import ps_table
    print(ps_table(_store(args), no_trunc=args.no_trunc, quiet=args.quiet, all_=args.all))
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    from .container.commands import remove
    return _print_lines(remove(_store(args), args.containers, args.force, args.volumes))


def _cmd_diff(args: argparse.Namespace) -> int:
    from .container.commands import diff_lines
    return _print_lines(diff_lines(_store(args), args.container))


def _cmd_commit(args: argparse.Namespace) -> int:
    from .container.commit import commit
    done = commit(_store(args), args.container, args.ref, args.message or "", args.author, args.change or [])
    for line in done.skipped:
        print(f"unionfs: warning: {line}", file=sys.stderr)
    print(done.image_id)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .image.convert import convert_estargz
    from .registry.lazy import make_local
    make_local(_store(args), [args.image], lambda m: print(m, file=sys.stderr))   # a lazy image: its blobs first
    print(convert_estargz(_store(args), args.image, args.new, args.chunk_size))
    return 0


def _cmd_save(args: argparse.Namespace) -> int:
    from .image.save import save
    from .registry.lazy import make_local
    make_local(_store(args), args.images, lambda m: print(m, file=sys.stderr))   # a lazy image: its blobs first
    save(_store(args), args.images, args.output, args.format)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .container.lifecycle import docker_status
    from .container.run import options, run

    def go() -> int:
        a = args
        opts = options(a.command, env=a.env or [], env_files=a.env_file or [], volumes_=a.volume or [],
                       mounts=a.mount or [], tmpfs=a.tmpfs or [], entrypoint=a.entrypoint, workdir=a.workdir,
                       user=a.user, hostname=a.hostname, network=a.network, read_only=a.read_only,
                       cap_add=a.cap_add or [], cap_drop=a.cap_drop or [], privileged=a.privileged, init=a.init,
                       tty=a.tty, interactive=a.interactive)
        store, image = _store(a), a.image
        if a.lazy:
            from .registry.commands import pull_lazy_cmd
            image = pull_lazy_cmd(a, store, image)
        return run(store, image, opts, a.name, a.rm, a.detach, a.runtime, a.record_prefetch)
    return docker_status(go)


def _cmd_exec(args: argparse.Namespace) -> int:
    from .container.lifecycle import docker_status, exec_in
    from .container.spec import parse_env
    return docker_status(lambda: exec_in(_store(args), args.container, args.command, parse_env(args.env or []),
                                         args.user, args.workdir, args.tty, args.interactive))


def _cmd_start(args: argparse.Namespace) -> int:
    from .container.run import start
    code = 0
    for name in args.containers:
        code = start(_store(args), name, args.attach, args.interactive)
        if not args.attach:
            print(name)
    return code


def _each_container(args: argparse.Namespace, act) -> int:
    """stop, restart, kill: ``act(store, name)`` on each container in turn, its name printed once done."""
    for name in args.containers:
        act(_store(args), name)
        print(name)
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    from .container.lifecycle import restart, stop
    verb = restart if args.verb == "restart" else stop
    return _each_container(args, lambda store, name: verb(store, name, args.time))


def _cmd_kill(args: argparse.Namespace) -> int:
    from .container.lifecycle import kill
    from .container.spec import parse_signal
    sig = parse_signal(args.signal)
    return _each_container(args, lambda store, name: kill(store, name, sig))


def _cmd_wait(args: argparse.Namespace) -> int:
    from .container.lifecycle import wait
    for name in args.containers:
        print(wait(_store(args), name), flush=True)
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    from .container.lifecycle import logs
    logs(_store(args), args.container, args.follow, args.tail)
    return 0


def _print_lines(lines) -> int:
    for line in lines:
        print(line)
    return 0


def _cmd_volume_create(args: argparse.Namespace) -> int:
    from .container import volumes
    store = _store(args)
    with store.locked():
        print(volumes.create(store, args.names[0] if args.names else None)[0].name)
    return 0


def _cmd_volume_ls(args: argparse.Namespace) -> int:
    from .container import volumes
    print(volumes.ls_table(_store(args), args.quiet))
    return 0


def _cmd_volume_inspect(args: argparse.Namespace) -> int:
    from .container import volumes
    store = _store(args)
    print(json.dumps([volumes.resolve(store, n).inspect() for n in args.names], indent=4))
    return 0


def _cmd_volume_rm(args: argparse.Namespace) -> int:
    from .container import volumes
    return _print_lines(volumes.remove(_store(args), args.names, args.force))


def _cmd_volume_prune(args: argparse.Namespace) -> int:
    from .container import volumes
    return _print_lines(volumes.prune(_store(args), args.all))


def _tail(value: str) -> int | None:
    """``--tail N`` (None: all of it)."""
    if value == "all":
        return None
    if not value.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError("a number of lines, or all")
    return int(value)


def _cmd_build(args: argparse.Namespace) -> int:
    from .build.builder import BuildError, Options, build, key_values
    opts = Options(tags=args.tag or [], dockerfile=args.file, build_args=key_values(args.build_arg, "--build-arg"),
                   target=args.target, no_cache=args.no_cache, labels=key_values(args.label, "--label"),
                   platform=args.platform, quiet=args.quiet, runtime=args.runtime)
    try:
        build(_store(args), args.context, opts)
    except BuildError as e:
        print("unionfs: " + one_line(e), file=sys.stderr)
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


def _lazy_options(p) -> None:
    p.add_argument("--lazy", action="store_true",
                   help="IMAGE is a registry REFERENCE of an eStargz image: fetch only its TOCs now, "
                        "file content on first read (as pull --lazy)")
    p.add_argument("--whole-below", type=int, metavar="BYTES",
                   help="with --lazy: pull layers smaller than BYTES whole (default 2 MiB; 0: none)")
    p.add_argument("--insecure", action="store_true", help="with --lazy: allow plain HTTP / unverified TLS")
    p.add_argument("--ca-file", metavar="FILE", help="with --lazy: trust this CA (PEM) for the registry")


def _container_parsers(sub, common) -> None:
    c = sub.add_parser("create", help="make a container: an image plus a writable layer of its own", parents=[common])
    c.add_argument("image", metavar="IMAGE")
    c.add_argument("--name", metavar="NAME", help="name it (default: a generated name)")
    _lazy_options(c)
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

    cv = sub.add_parser("convert", help="a copy of an image with eStargz layers (lazily pullable)", parents=[common])
    cv.add_argument("--estargz", action="store_true", required=True, help="the layer format (the only one yet)")
    cv.add_argument("--chunk-size", type=int, default=4 << 20, metavar="BYTES",
                    help="files bigger than this are split into chunks fetched separately (default 4 MiB)")
    cv.add_argument("image", metavar="IMAGE")
    cv.add_argument("new", metavar="NEW", help="the converted image's name")
    cv.set_defaults(func=_cmd_convert)

    rn = sub.add_parser("run", help="run a command in a new container of an image (with crun or runc)",
                        parents=[common], usage="%(prog)s [options] IMAGE [COMMAND [ARG...]]",
                        description="Create a container of IMAGE, mount it, and run COMMAND (default: the image's "
                                    "Entrypoint and Cmd) in it with an OCI runtime; exits with its status.")
    rn.add_argument("--name", metavar="NAME", help="name the container")
    _lazy_options(rn)
    rn.add_argument("--record-prefetch", action="store_true",
                    help="note the files the run reads, in order, as the image's prefetch list: a lazy mount "
                         "fetches them first, and convert/push --estargz writes them first, then the landmark")
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
    vc.set_defaults(func=_cmd_volume_create)
    vl = vsub.add_parser("ls", help="list volumes", parents=[common])
    vl.add_argument("--quiet", "-q", action="store_true", help="only names")
    vl.set_defaults(func=_cmd_volume_ls)
    vi = vsub.add_parser("inspect", help="volumes as JSON", parents=[common])
    vi.add_argument("names", nargs="+", metavar="NAME")
    vi.set_defaults(func=_cmd_volume_inspect)
    vr = vsub.add_parser("rm", help="remove volumes no container uses", parents=[common])
    vr.add_argument("names", nargs="+", metavar="NAME")
    vr.add_argument("--force", "-f", action="store_true", help="no error for a missing volume")
    vr.set_defaults(func=_cmd_volume_rm)
    vp = vsub.add_parser("prune", help="remove unused anonymous volumes", parents=[common])
    vp.add_argument("--all", "-a", action="store_true", help="unused named volumes too")
    vp.set_defaults(func=_cmd_volume_prune)


@functools.cache   # built once per process: the warm daemon's forks find it built (argparse's
def parser() -> argparse.ArgumentParser:   # gettext look-ups alone cost a mount 4 ms)
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
    _lazy_options(m)
    m.add_argument("--no-fill", action="store_true",
                   help="an image with lazy layers: fetch only what is read (no background fill)")
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


@functools.cache
def mount_program_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unionfs", usage="%(prog)s -o lowerdir=...[,upperdir=...,workdir=...] "
                                "[SOURCE] MOUNTPOINT")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")
    p.add_argument("-f", dest="foreground", action="store_true")
    p.add_argument("-d", dest="debug", action="store_true", help="foreground and debug log")
    p.add_argument("targets", nargs="+", metavar="[SOURCE] MOUNTPOINT")
    return p


def _mount_program(argv: list[str]) -> int:
    """fuse-overlayfs's command line, for podman's ``mount_program`` and for mount.fuse3
    (``mount -t fuse.unionfs``, /etc/fstab): ``unionfs [-f] [-d] -o OPTS [SOURCE] MOUNTPOINT``.
    Returns once mounted (in front with -f); SOURCE, if given, names the mount (fsname)."""
    from .fuse.daemon import build_config, mount, with_fsname
    args = mount_program_parser().parse_intermixed_args(argv)
    if len(args.targets) > 2:
        raise UsageError("give [SOURCE] MOUNTPOINT")
    options = list(args.options)
    if len(args.targets) == 2:
        options = with_fsname(options, args.targets[0].replace(",", "_"))
    if args.debug:
        options.append("debug")
    return mount(build_config(args.targets[-1], [], None, None, options, args.foreground or args.debug))


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
            print("unionfs: " + one_line(e), file=sys.stderr)
            return 2
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print("unionfs: " + one_line(e), file=sys.stderr)
        return 2
    except OSError as e:   # a path the user gave, a damaged store, a full disk: one line, exit status 1
        where = f"{os.fsdecode(e.filename)}: " if e.filename else ""
        print(f"unionfs: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
