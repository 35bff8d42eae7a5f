"""A RUN step: a container of the stage so far, mounted writable by unionfs, its command run by crun.

The one module of the build that knows the container runtime code
(:mod:`unionfs.container.runtime`: user resolution, the OCI bundle, running it in
the foreground); the builder gives it the stage's config (Env with the build args,
User, WorkingDir) and the argv, and commits the container's changes afterwards.

Build containers are named ``unionfs-build-<builder pid>-<random>``: a build that
was killed leaves its container (maybe still mounted, maybe still running); the
next build stops it with the runtime, unmounts and removes it, and leaves alone
the containers of builds still running.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
import uuid
from contextlib import contextmanager
from typing import Iterator, TextIO

from ..container import model as cmodel
from ..container import runtime
from ..container.commands import mount_container
from ..container.model import Container
from ..errors import UsageError
from ..image.store import Store

PREFIX = "unionfs-build-"
PR_SET_CHILD_SUBREAPER = 36


def find_runtime(name: str | None) -> str:
    return runtime.find_runtime(name)


def become_subreaper() -> None:
    """Be the parent of the mount daemons we start (they double-fork), so each is reaped the moment it exits:
    ``umount`` waits for the daemon to be gone, and where init reaps orphans late (seconds, on this VM) the
    zombie made every RUN step wait for it (1.7 s a step before, 0.2-0.4 s after)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap(c: Container) -> None:
    """Reap the container's mount daemon when it exits (it is our child, as subreaper)."""
    state = cmodel.mounted_at(c)
    if state is None:
        return

    def wait() -> None:
        try:
            os.waitpid(state.pid, 0)
        except ChildProcessError:   # not ours after all (no subreaper): init reaps it
            pass
    threading.Thread(target=wait, name="reap-unionfs-daemon", daemon=True).start()


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
    """Mount ``c``, run ``args`` in it with the stage's ``config``, unmount; the command's exit status.
    ``script``: a heredoc with a ``#!`` line, bound read-only at :data:`SCRIPT` for ``args`` to run."""
    os.makedirs(c.rootfs, mode=0o755, exist_ok=True)
    mount_container(store, c, c.rootfs, ["suid,dev,allow_other"])
    _reap(c)
    try:
        root_fd = os.open(c.rootfs, os.O_RDONLY | os.O_DIRECTORY)
        try:
            user = runtime.resolve_user(root_fd, str(config.get("User") or ""))
        finally:
            os.close(root_fd)
        spec = runtime.bundle_config(config, c.rootfs, args, user, c.short_id, False)
        if network == "none":   # a network namespace of its own: loopback only
            spec["linux"]["namespaces"].append({"type": "network"})
        os.makedirs(c.bundle, mode=0o700, exist_ok=True)
        if script is not None:
            path = os.path.join(c.bundle, "script")
            with open(path, "w") as f:
                f.write(script)
            os.chmod(path, 0o755)
            spec["mounts"].append({"destination": SCRIPT, "type": "bind", "source": path,
                                   "options": ["bind", "ro"]})
        with open(os.path.join(c.bundle, "config.json"), "w") as f:
            json.dump(spec, f, indent=1)
        return _run_bundle(c, runtime_path, quiet, out)
    finally:
        runtime._unmount(c.rootfs)


def _run_bundle(c: Container, runtime_path: str, quiet: bool, out: TextIO) -> int:
    """The runtime in the foreground; its stdout is the step's output (none with -q), its stderr ours."""
    out.flush()
    sys.stdout.flush()
    saved = None
    if quiet or out is not sys.stdout:
        saved = os.dup(1)
        target = os.open(os.devnull, os.O_WRONLY) if quiet else out.fileno()
        os.dup2(target, 1)
        if quiet:
            os.close(target)
    try:
        return runtime.run_bundle(runtime_path, c.bundle, f"unionfs-{c.short_id}")
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
        path = runtime.find_runtime(runtime_name)
    except UsageError:
        return
    argv, hide = runtime.runtime_command(path, c.bundle, f"unionfs-{c.short_id}", runtime.cgroup_layout())
    delete = argv[:-4] + ["delete", "--force", f"unionfs-{c.short_id}"]
    subprocess.run(delete, capture_output=True, timeout=60,
                   preexec_fn=runtime._private_cgroup_view if hide else None)


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
                runtime._unmount(c.rootfs)
            except UsageError:
                continue
        with store.locked():
            if cmodel.mounted_at(c) is None:
                cmodel.remove(store, c)
