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
    lower = [store.layer_root(ly.diff_id) for ly in reversed(image.layers)]
    if not any(o.startswith("fsname=") or ",fsname=" in o for o in options):
        options.append(f"fsname={name}")
    if not args.writable:
        return mount(build_config(mountpoint, lower, None, None, options, args.foreground, args.log))
    if not os.path.isdir(mountpoint):
        raise UsageError(f"mount point {mountpoint}: no such directory")
    with store.locked():
        store.resolve(image.id)  # still there now that we hold the lock
        record = store.new_container(image.id, name, os.path.abspath(mountpoint))
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
    return umount(args.mountpoint)


def parser() -> argparse.ArgumentParser:
    root_help = "the image store (default: $UNIONFS_ROOT, /var/lib/unionfs as root, else $XDG_DATA_HOME/unionfs)"
    p = argparse.ArgumentParser(prog="unionfs", description="A union filesystem for container images (FUSE).")
    p.add_argument("--root", metavar="DIR", help=root_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", metavar="DIR", default=argparse.SUPPRESS, help=root_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("mount", help="mount an image or a stack of layers", parents=[common],
                       usage="%(prog)s [options] [IMAGE] MOUNTPOINT",
                       description="Mount an image from the store (repo:tag, id or id prefix), or layer "
                                   "directories (topmost first), as one merged tree.")
    m.add_argument("targets", nargs="+", metavar="[IMAGE] MOUNTPOINT")
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

    u = sub.add_parser("umount", help="unmount (also a mount whose daemon died)")
    u.add_argument("mountpoint", metavar="MOUNTPOINT")
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
