"""The ``unionfs`` console script: a mount or umount goes to the warm daemon (:mod:`unionfs.zygote`)
when one runs, before anything heavy is imported; everything else, and a mount no zygote took,
runs :func:`unionfs.cli.main` in this process (and a mount done so starts a zygote for the next).
"""
from __future__ import annotations

import os
import sys

from . import zygote
from .routing import warm_kind


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    kind = warm_kind(argv) if zygote.enabled() else None
    if kind is not None:
        try:
            code = zygote.run(argv)
        except KeyboardInterrupt:
            return 130
        if code is not None:   # done: skip the interpreter's teardown too (a few ms)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    from .cli import main as cli_main
    code = cli_main(argv)
    if kind == "mount" and code == 0:
        zygote.start()
    return code
