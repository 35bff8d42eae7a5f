"""The ``unionfs`` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .fs.daemon import UsageError, build_config, mount, umount


def _cmd_mount(args: argparse.Namespace) -> int:
    if len(args.targets) > 2:
        raise UsageError("mount takes [IMAGE] MOUNTPOINT")
    image = args.targets[0] if len(args.targets) == 2 else None
    mountpoint = args.targets[-1]
    if image is not None and not args.writable:
        from .container import commands as cc, model as cm
        c = cm.find(_store(args), image) if _store(args).exists() else None
        if c is not None:   # a container's name or id first, then an image's
            if args.lower or args.upper or args.work:
                raise UsageError("a container's layers come from the store: no --lower/--upper/--work")
            return cc.mount_container(_store(args), c, mountpoint, args.options or [], args.foreground, args.log)
    if image is not None:
        return _mount_image(args, image, mountpoint)
    if args.writable:
        raise UsageError("--writable needs an IMAGE (for layer directories, give --upper and --work)")
    lower = []
    for value in args.lower or []:
        from .fs.daemon import split_lowerdir
        lower += split_lowerdir(value)
    cfg = build_config(mountpoint, lower, args.upper, args.work, args.options or [],
                       args.foreground, args.log)
    return mount(cfg)


# --- images ------------------------------------------------------------------------

def _store(args: argparse.Namespace):
    from .image.store import Store
    return Store(getattr(args, "root", None))


def _mount_image(args: argparse.Namespace, name: str, mountpoint: str) -> int:
    """Mount an image by name: its layers (topmost first) as the lower stack, maybe a fresh writable layer."""
    from .image.store import Store
    options = list(args.options or [])
    if args.lower or any(o.startswith("lowerdir=") or ",lowerdir=" in o for o in options):
        raise UsageError("give an IMAGE or lower layers (--lower, -o lowerdir=), not both")
    if args.upper or args.work:
        raise UsageError("an image's writable layer comes from the store: use --writable, not --upper/--work")
    store: Store = _store(args)
    image = store.image(store.resolve(name))
    if not image.layers:
        raise UsageError(f"{name}: the image has no layers to mount")
    lower = store.lower_dirs([ly.diff_id for ly in image.layers])
    if not any(o.startswith("fsname=") or ",fsname=" in o for o in options):
        options.append(f"fsname={name}")
    if not args.writable:
        return mount(build_config(mountpoint, lower, None, None, options, args.foreground, args.log))
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mount point {mountpoint}: no such directory")
    from .container import model as cm
    with store.locked():
        store.resolve(image.id)  # still there now that we hold the lock
        record = cm.create(store, name, None, os.path.abspath(mountpoint)).to_record()
    try:
        cfg = build_config(mountpoint, lower, record["Upper"], record["Work"], options, args.foreground, args.log)
        print(f"container {record['Id']}", flush=True)
        return mount(cfg)
    except BaseException:
        with store.locked():
            store.remove_container(record["Id"])
        raise


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
    from .image.report import images_table
    print(images_table(_store(args), args.no_trunc))
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
    from .image.model import Reference
    store = _store(args)
    dst = Reference.parse(args.target)
    with store.locked():
        image_id = store.resolve(args.source)
        tags = store.tags()
        tags[str(dst)] = image_id
        store.set_tags(tags)
    return 0


def _cmd_rmi(args: argparse.Namespace) -> int:
    from .image.model import Reference
    from .image.store import in_use_by_mounts
    store = _store(args)
    with store.locked():
        for name in args.images:
            image_id = store.resolve(name)
            tags = store.tags()
            mine = sorted(t for t, i in tags.items() if i == image_id)
            by_tag = None
            try:
                ref = str(Reference.parse(name))
                by_tag = ref if tags.get(ref) == image_id else None
            except UsageError:
                pass
            if by_tag and len(mine) > 1:   # only a name goes; the image keeps its others
                del tags[by_tag]
                store.set_tags(tags)
                print(f"Untagged: {by_tag}")
                continue
            if not by_tag and len(mine) > 1 and not args.force:
                raise UsageError(f"{name}: image is tagged {', '.join(mine)}; remove the tags, or use -f")
            users = [c["Id"][:12] for c in store.containers() if c.get("Image") == image_id]
            if users:
                raise UsageError(f"{name}: in use by container(s) {', '.join(users)}")
            others = set()
            for other in store.image_ids():
                if other != image_id:
                    others.update(ly.diff_id for ly in store.image(other).layers)
            doomed = [store.layer_dir(ly.diff_id) for ly in store.image(image_id).layers if ly.diff_id not in others]
            busy = in_use_by_mounts(doomed)
            if busy:
                raise UsageError(f"{name}: mounted (unionfs daemon pid {sorted(set(busy.values()))[0]}); unmount first")
            store.remove_image(image_id)
            store.gc()
            for t in mine:
                print(f"Untagged: {t}")
            print(f"Deleted: {image_id}")
    return 0


def _cmd_umount(args: argparse.Namespace) -> int:
    if not os.path.lexists(args.mountpoint) and "/" not in args.mountpoint and _store(args).exists():
        from .container.commands import umount_container   # a container's name or id
        return umount_container(_store(args), args.mountpoint)
    return umount(args.mountpoint)


# --- containers --------------------------------------------------------------------

def _oneline(func):
    """An OSError of a container command (a path the user gave, a damaged store) is one line, exit status 1."""
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except OSError as e:
            where = f"{os.fsdecode(e.filename)}: " if e.filename else ""
            print(f"unionfs: {where}{e.strerror or e}", file=sys.stderr)
            return 1
    return run


def _cmd_create(args: argparse.Namespace) -> int:
    from .container.commands import create
    print(create(_store(args), args.image, args.name).id)
    return 0


def _cmd_ps(args: argparse.Namespace) -> int:
    from .container.commands import ps_table
    print(ps_table(_store(args), no_trunc=args.no_trunc, quiet=args.quiet))
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    from .container.commands import remove
    for name in remove(_store(args), args.containers, args.force):
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


def _cmd_run(args: argparse.Namespace) -> int:
    from .container.runtime import run
    return run(_store(args), args.image, args.command, args.name, args.rm, args.runtime)


def _container_parsers(sub, common) -> None:
    c = sub.add_parser("create", help="make a container: an image plus a writable layer of its own", parents=[common])
    c.add_argument("image", metavar="IMAGE")
    c.add_argument("--name", metavar="NAME", help="name it (default: a generated name)")
    c.set_defaults(func=_oneline(_cmd_create))

    ps = sub.add_parser("ps", help="list containers", parents=[common])
    ps.add_argument("--no-trunc", action="store_true", help="show full container ids")
    ps.add_argument("--quiet", "-q", action="store_true", help="only ids")
    ps.set_defaults(func=_oneline(_cmd_ps))

    rm = sub.add_parser("rm", help="remove containers (and their writable layers)", parents=[common])
    rm.add_argument("containers", nargs="+", metavar="CONTAINER")
    rm.add_argument("--force", "-f", action="store_true", help="unmount a mounted container first")
    rm.set_defaults(func=_oneline(_cmd_rm))

    df = sub.add_parser("diff", help="changes of a container's writable layer (A added, C changed, D deleted)",
                        parents=[common])
    df.add_argument("container", metavar="CONTAINER")
    df.set_defaults(func=_oneline(_cmd_diff))

    cm = sub.add_parser("commit", help="a new image from a container's changes", parents=[common])
    cm.add_argument("container", metavar="CONTAINER")
    cm.add_argument("ref", nargs="?", metavar="REPO[:TAG]")
    cm.add_argument("--message", "-m", metavar="MESSAGE", help="the history entry's comment")
    cm.add_argument("--author", "-a", metavar="AUTHOR", help='e.g. "Jane Doe <jane@example.com>"')
    cm.add_argument("--change", "-c", action="append", metavar="INSTRUCTION",
                    help="apply a Dockerfile instruction: CMD, ENTRYPOINT, ENV, WORKDIR, USER, EXPOSE, LABEL, VOLUME")
    cm.set_defaults(func=_oneline(_cmd_commit))

    sv = sub.add_parser("save", help="write images to a docker save archive or an OCI layout", parents=[common])
    sv.add_argument("images", nargs="+", metavar="IMAGE")
    sv.add_argument("--output", "-o", required=True, metavar="FILE",
                    help="the archive (an OCI layout is a directory unless FILE ends in .tar)")
    sv.add_argument("--format", choices=("docker", "oci"), default="docker", help="docker (default) or oci")
    sv.set_defaults(func=_oneline(_cmd_save))

    rn = sub.add_parser("run", help="run a command in a new container of an image (with crun or runc)",
                        parents=[common], usage="%(prog)s [options] IMAGE [COMMAND [ARG...]]",
                        description="Create a container of IMAGE, mount it, and run COMMAND (default: the image's "
                                    "Entrypoint and Cmd) in it with an OCI runtime; exits with its status.")
    rn.add_argument("--name", metavar="NAME", help="name the container")
    rn.add_argument("--rm", action="store_true", help="remove the container when it exits")
    rn.add_argument("--runtime", metavar="RUNTIME", help="crun or runc, or a path (default: crun, else runc)")
    rn.add_argument("image", metavar="IMAGE")
    rn.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")
    rn.set_defaults(func=_oneline(_cmd_run))


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

    from .registry.commands import add_parsers as add_registry_parsers   # pull, push, login, logout
    add_registry_parsers(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print("unionfs: " + "; ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    except OSError as e:
        if args.command not in ("load", "images", "inspect", "history", "tag", "rmi", "pull", "push", "login",
                                "logout") and not \
                (args.command == "mount" and len(args.targets) == 2):
            raise
        where = f"{os.fsdecode(e.filename)}: " if e.filename else ""
        print(f"unionfs: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
