"""What kind of command an argv is, read without argparse: the entry point decides from this
whether a command may run in the warm daemon (:mod:`unionfs.zygote`) before importing anything.

It imports nothing (the command line, :mod:`unionfs.cli`, uses the same answers).
"""
from __future__ import annotations

COMMANDS = {"mount", "umount", "load", "images", "inspect", "history", "tag", "rmi", "create", "ps", "rm", "diff",
            "commit", "save", "convert", "build", "run", "start", "stop", "restart", "kill", "wait", "logs", "exec",
            "volume", "pull", "push", "index", "login", "logout"}


def is_mount_program_argv(argv: list[str]) -> bool:
    """``-o ...`` first (podman), or SOURCE MOUNTPOINT -o ... (mount.fuse3), not a subcommand."""
    if not argv or argv[0] in ("-h", "--help", "--version", "--root") or argv[0].startswith("--root="):
        return False
    if argv[0].startswith("-o") or argv[0] in ("-f", "-d"):
        return True
    return argv[0] not in COMMANDS and "-o" in argv


def _foreground(args: list[str]) -> bool:
    """-f, -d, --foreground (or an argparse abbreviation of it), or either inside a cluster (-wf)."""
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--":
            return False
        if a.startswith("--f"):
            return True
        if a.startswith("-") and not a.startswith("--"):
            flags = a[1:]
            if flags.startswith("o"):   # -o VALUE or -oVALUE
                skip = flags == "o"
                continue
            if "f" in flags or "d" in flags:
                return True
    return False


def warm_kind(argv: list[str]) -> str | None:
    """"mount" for a mount that returns once mounted (the mount program's argv or ``unionfs mount``,
    not in the foreground), "umount" for ``unionfs umount``, else None: the rest runs as it is."""
    if is_mount_program_argv(argv):
        return None if _foreground(argv) else "mount"
    if argv[:1] == ["mount"]:
        return None if _foreground(argv[1:]) else "mount"
    if argv[:1] == ["umount"]:
        return "umount"
    return None
