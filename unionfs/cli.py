"""The ``unionfs`` command line."""
from __future__ import annotations

import argparse
import sys

from .fs.daemon import UsageError, build_config, mount, umount


def _cmd_mount(args: argparse.Namespace) -> int:
    lower = []
    for value in args.lower or []:
        from .fs.daemon import split_lowerdir
        lower += split_lowerdir(value)
    cfg = build_config(args.mountpoint, lower, args.upper, args.work, args.options or [],
                       args.foreground, args.log)
    return mount(cfg)


def _cmd_umount(args: argparse.Namespace) -> int:
    return umount(args.mountpoint)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unionfs", description="A union filesystem for container images (FUSE).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("mount", help="mount a stack of layers",
                       description="Mount layer directories (topmost first) as one merged tree.")
    m.add_argument("mountpoint", metavar="MOUNTPOINT")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"unionfs: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
