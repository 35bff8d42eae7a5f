"""A unionfs daemon with faults injected, for tests and scripts/crash-test.

Run as ``python tests/inject.py ARGS...`` (the ``unionfs`` command line, e.g. ``mount -f ...``)
with ``UNIONFS_INJECT`` set to JSON:

``{"faults": [{"target": "unionfs.fs.writable:WritableUnion.write", "exc": "RuntimeError",
"when": "poison"}]}``
    the method raises ``exc`` when one of its arguments (bytes, or an object's ``.name``,
    or ``.node.name``) contains the word ``when`` (default ``poison``); ``"when": "always"``
    raises on every call.

``{"faults": [{"target": "unionfs.fs.sys:open_tmpfile", "returns": null, "when": "always"}]}``
    the function returns that value instead of running (``returns`` instead of ``exc``): what
    cannot run here, e.g. an upper filesystem without O_TMPFILE (open_tmpfile says None).

``{"crash_at": N, "trace": FILE}``
    counts the daemon's changing syscalls on a layer (every mutating function of
    ``unionfs.fs.sys``) from the moment the mount is up, and SIGKILLs itself just before
    the N-th one; ``trace`` gets one line per counted call (so a run without ``crash_at``
    tells how many points an operation has).
"""
from __future__ import annotations

import builtins
import importlib
import json
import os
import signal
import sys

MUTATING = ("mkdir_at", "mknod_at", "symlink_at", "link_at", "unlink_at", "rmdir_at", "rename_at",
            "fchmod", "chmod_at", "chown_at", "utime_at", "setxattr_at", "removexattr_at", "fsetxattr",
            "fchown", "futimens", "ftruncate", "pwrite", "copy_data", "remove_tree_at", "fsync",
            "open_at", "open_tmpfile", "link_tmpfile")


def _poisoned(args, word: bytes = b"poison") -> bool:
    for a in args:
        for v in (a, getattr(a, "name", None), getattr(getattr(a, "node", None), "name", None)):
            if isinstance(v, (bytes, bytearray, memoryview)) and word in bytes(v):
                return True
    return False


def _inject_fault(spec: dict) -> None:
    modname, _, attr = spec["target"].partition(":")
    owner = importlib.import_module(modname)
    path = attr.split(".")
    for p in path[:-1]:
        owner = getattr(owner, p)
    real = getattr(owner, path[-1])
    returns = "returns" in spec
    exc = None if returns else getattr(builtins, spec["exc"])
    when = spec.get("when", "poison")
    always, word = when == "always", when.encode()

    def faulty(*args, **kwargs):
        if always or _poisoned(args, word) or _poisoned(kwargs.values(), word):
            if returns:
                return spec["returns"]
            raise exc(f"injected fault in {spec['target']}")
        return real(*args, **kwargs)

    setattr(owner, path[-1], faulty)


def _inject_crash(crash_at: int | None, trace: str | None) -> None:
    import pyfuse3

    from unionfs.fs import sys as ovl

    state = {"armed": False, "n": 0}
    tracef = open(trace, "a", buffering=1) if trace else None

    real_init = pyfuse3.init

    def init(*args, **kwargs):
        real_init(*args, **kwargs)
        state["armed"] = True

    pyfuse3.init = init

    def wrap(name, real):
        def counted(*args, **kwargs):
            if state["armed"]:
                if name == "open_at" and not (len(args) > 2 and args[2] & os.O_CREAT):
                    return real(*args, **kwargs)
                state["n"] += 1
                if tracef is not None:
                    tracef.write(f"{state['n']} {name} {args[1] if len(args) > 1 else ''!r}\n")
                if crash_at is not None and state["n"] >= crash_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return counted

    for name in MUTATING:
        setattr(ovl, name, wrap(name, getattr(ovl, name)))


class InjectedMount:
    """Like helpers.UnionMount (foreground daemon, log file), with ``UNIONFS_INJECT`` = ``spec``."""

    def __new__(cls, mnt, lower, upper=None, work=None, options=None, log=None, spec=None):
        import subprocess

        import helpers

        class _Injected(helpers.UnionMount):
            def spawn(self, args):
                env = dict(os.environ, UNIONFS_INJECT=json.dumps(spec or {}))
                return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)

        return _Injected(mnt, lower, upper, work, options, log)


def main() -> int:
    spec = json.loads(os.environ.get("UNIONFS_INJECT", "{}"))
    for f in spec.get("faults", ()):
        _inject_fault(f)
    if "crash_at" in spec or "trace" in spec:
        _inject_crash(spec.get("crash_at"), spec.get("trace"))
    from unionfs.cli import main as cli_main
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
