"""Starting a process of ours in the background, the way a daemon starts.

Double-forked (the intermediate child exits at once, so the process is never its
starter's zombie), a session of its own, stdio on ``/dev/null`` (a pipe reader of
the starter's output must never wait for us), only the fds it needs; it tells its
starter one line when it is ready, or why it cannot be.  The FUSE daemon
(:mod:`unionfs.fuse.daemon`) and a detached container's supervisor
(:mod:`unionfs.container.lifecycle`) both start this way.  It imports nothing of
unionfs and knows nothing of what the process does.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable


_detached = False
_in_place: tuple[Callable[[str], None], frozenset[int]] | None = None


def detached() -> None:
    """Say that this process is detached already (in a session without a terminal, not its leader, in a
    process group of its own) and exits once its command is done: the warm daemon's worker.  A process
    it spawns then needs one fork, not two: the second is there so that the process is nobody's zombie
    and no session leader, and here it is neither; a fork of a big process costs 2 ms."""
    global _detached
    _detached = True


def in_place(settle: Callable[[str], None], keep: frozenset[int] = frozenset()) -> None:
    """Let the next :func:`spawn` run its body in this very process, not in a fork: the warm daemon's
    worker, whose command ends with that spawn, becomes the background process itself (a fork of a
    big process costs 2 ms).  Instead of being returned, the line the body tells (or "" if it ends
    first) goes to ``settle``, which reports the command's outcome to whoever waits for it; ``keep``:
    the fds it needs for that (closed by it).  The spawn then never returns: the process ends with
    the body, as a spawned one does."""
    global _in_place
    _in_place = (settle, frozenset(keep))


def _become(body: Callable[[Callable[[str], None]], None], keep: set[int], chdir: str | None) -> None:
    """:func:`spawn`'s body, run in this process (see :func:`in_place`)."""
    global _in_place
    assert _in_place is not None
    settle, theirs = _in_place
    _in_place = None
    told: list[bool] = []

    def tell(line: str) -> None:
        if not told:
            told.append(True)
            settle(line)
    code = 0
    try:
        if chdir is not None:
            os.chdir(chdir)
        for stream in (sys.stdout, sys.stderr):   # what the command printed goes to its caller
            stream.flush()
        close_fds_but(keep | theirs)
        devnull = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(devnull, std)
        os.close(devnull)
        body(tell)
    except BaseException:
        code = 1
    finally:
        try:
            tell("")
        finally:
            os._exit(code)


def close_fds_but(keep: set[int]) -> None:
    """Close every fd above stderr but ``keep``: none of the starter's locks, sockets or pipes stay."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def spawn(body: Callable[[Callable[[str], None]], None], keep: set[int] | frozenset[int] = frozenset(),
          chdir: str | None = None) -> str:
    """Run ``body(tell)`` in a new background process; return the line it told ("" if it ended first).

    ``tell(line)`` reaches the starter once (later calls do nothing).  What escapes ``body`` ends the
    process with status 1: ``body`` reports its own failures, through ``tell`` or its log.
    """
    if _in_place is not None:
        _become(body, set(keep), chdir)
    r, w = os.pipe()
    once = _detached
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            if not once:
                os.setsid()
                if os.fork() != 0:
                    os._exit(0)
            if chdir is not None:
                os.chdir(chdir)
            close_fds_but(set(keep) | {w})
            devnull = os.open(os.devnull, os.O_RDWR)
            for std in (0, 1, 2):
                os.dup2(devnull, std)
            os.close(devnull)
            told: list[bool] = []

            def tell(line: str) -> None:
                if not told:
                    told.append(True)
                    os.write(w, line.encode() + b"\n")
                    os.close(w)
            body(tell)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    if not once:
        os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        return f.read().decode(errors="replace").strip()
