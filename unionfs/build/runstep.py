"""A RUN step: a container of the stage so far, mounted writable by unionfs, its command run by crun.

The one module of the build that knows how containers run: a step is
:func:`unionfs.container.run.run_container` (``docker run``'s setup: the user
resolved in the image, /etc/hosts and friends bind-mounted, the supervisor, crun
in the foreground) with the stage's config (Env with the build args, User,
WorkingDir) as its options; the builder commits the container's changes afterwards.

Build containers are named ``unionfs-build-<builder pid>-<random>``: a build that
was killed leaves its container (maybe still mounted, maybe still running); the
next build stops it with the runtime, unmounts and removes it, and leaves alone
the containers of builds still running.
"""
from __future__ import annotations

import ctypes
import os
import sys
import uuid
from contextlib import contextmanager
from typing import Iterator, TextIO

from ..container import model as cmodel
from ..container.lifecycle import unmount_rootfs
from ..container.model import Container
from ..container.run import run_container
from ..container.runtime import Runtime, find_runtime
from ..container.spec import Mount, RunOptions
from ..errors import UsageError
from ..image.store import Store

PREFIX = "unionfs-build-"
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Be the parent of the mount daemons we start (they double-fork), so each is reaped the moment it exits:
    ``umount`` waits for the daemon to be gone, and where init reaps orphans late (seconds, on this VM) the
    zombie made every RUN step wait for it (1.7 s a step before, 0.2-0.4 s after)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@contextmanager
def step_container(store: Store, image_id: str) -> Iterator[Container]:
    """A new container of ``image_id`` for one step; removed afterwards, whatever happens."""
    with store.locked():
        c = cmodel.create(store, image_id, f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        yield c
    finally:
        with store.locked():
            if cmodel.mounted_at(c) is None:
                cmodel.remove(store, c)


SCRIPT = "/dev/.unionfs-run-script"   # on the container's /dev tmpfs: never in the rootfs, never in a layer


def run(store: Store, c: Container, config: dict, args: list[str], network: str, runtime_path: str,
        quiet: bool, out: TextIO, script: str | None = None) -> int:
    """Run ``args`` in ``c`` as ``docker run`` would with the stage's ``config`` (Env with the build
    args, User, WorkingDir) given explicitly; the command's exit status.  ``script``: a heredoc with a
    ``#!`` line, bound read-only at :data:`SCRIPT` for ``args`` to run."""
    mounts = []
    if script is not None:
        path = c.file("build-script")
        with open(path, "w") as f:
            f.write(script)
        os.chmod(path, 0o755)
        mounts.append(Mount("bind", SCRIPT, path, readonly=True))
    opts = RunOptions(command=list(args), entrypoint=[], env=list(config.get("Env") or []),
                      user=str(config.get("User") or ""), workdir=str(config.get("WorkingDir") or "/"),
                      network="none" if network == "none" else "host", mounts=mounts)
    out.flush()
    sys.stdout.flush()
    saved = None
    if quiet or out is not sys.stdout:   # the step's output is the container's stdout (none with -q)
        saved = os.dup(1)
        target = os.open(os.devnull, os.O_WRONLY) if quiet else out.fileno()
        os.dup2(target, 1)
        if quiet:
            os.close(target)
    try:
        return run_container(store, c, opts, runtime=runtime_path)
    finally:
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


# --- after a killed build ------------------------------------------------------------

def _builder_alive(name: str) -> bool:
    """Is the build that made container ``unionfs-build-PID-...`` still running?"""
    pid = name[len(PREFIX):].partition("-")[0]
    if not pid.isdigit():
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"build" in argv and any(b"unionfs" in a for a in argv)


def _stop(c: Container, runtime_name: str | None) -> None:
    """A killed build's RUN may still run: its processes are killed with the runtime (or it is gone)."""
    try:
        Runtime(find_runtime(runtime_name)).delete(c.runtime_id)
    except UsageError:
        return


def sweep(store: Store, runtime_name: str | None) -> None:
    """The containers of killed builds: stopped, unmounted and removed."""
    if not store.exists():
        return
    for c in cmodel.containers(store):
        if not c.name.startswith(PREFIX) or _builder_alive(c.name):
            continue
        if cmodel.mounted_at(c) is not None:
            _stop(c, runtime_name)
            try:
                unmount_rootfs(c)
            except UsageError:
                continue
        with store.locked():
            if cmodel.mounted_at(c) is None:
                cmodel.remove(store, c)
