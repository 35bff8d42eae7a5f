"""``unionfs run``: a container of an image, mounted, run by a real OCI runtime (crun or runc).

1. A new container is created and mounted on ``containers/<id>/rootfs`` with the
   FUSE options a rootfs needs: ``suid,dev`` (libfuse mounts ``nosuid,nodev``
   otherwise, which breaks setuid binaries and device nodes) and ``allow_other``
   (processes of the container run as other users).
2. An OCI bundle (runtime-spec ``config.json``) is generated from the image config
   in ``containers/<id>/bundle``: ``process.args`` = Entrypoint + (COMMAND or Cmd),
   ``env`` = Env (PATH added if missing, HOSTNAME, TERM on a terminal), ``cwd`` =
   WorkingDir, ``user`` = User resolved against the rootfs's ``/etc/passwd`` and
   ``/etc/group`` (``name``, ``uid``, ``name:group``, ``uid:gid``; supplementary
   groups from ``/etc/group``), ``terminal`` only when our stdin is a terminal.
   The rest is what runtimes generate by default (``runc spec``/``crun spec``):
   /proc, a tmpfs /dev with /dev/pts, /dev/shm and /dev/mqueue, a read-only /sys,
   the masked and read-only /proc paths, and pid, ipc, uts and mount namespaces;
   capabilities are Docker's default set (a package manager needs chown, setuid,
   mknod...).  There is **no network namespace**: the container shares the host's
   network, as ``docker run --network host`` (nothing to set up; loopback-only
   isolation would also cut a package manager off its mirror).
3. The runtime runs it in the foreground (``RUNTIME run --bundle B ID``): stdin,
   stdout and stderr are ours, its exit status becomes ours.
4. Whatever happens, the container is unmounted; ``--rm`` removes it.

Cgroups: crun refuses a host with the hybrid cgroup layout (cgroup v1 controllers
plus a cgroup2 ``unified`` mount: "cgroups in hybrid mode not supported").  There
we run crun in a private mount namespace where a tmpfs hides
``/sys/fs/cgroup/unified``, with ``--cgroup-manager=disabled`` (no resource limits
are applied to the container; runc copes with hybrid hosts by itself).
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from ..fs import sys as ovl
from ..errors import UsageError
from ..fs.daemon import is_mountpoint, umount
from ..image.store import Store
from . import model
from .commands import mount_container
from .model import Container, ContainerError

RUNTIMES = ("crun", "runc")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Docker's default capability set (moby oci/caps/defaults.go).
DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
                "CAP_KILL", "CAP_AUDIT_WRITE"]
MASKED = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap"]
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
UNIFIED = "/sys/fs/cgroup/unified"


class RuntimeMissing(UsageError):
    pass


def find_runtime(name: str | None) -> str:
    """The runtime binary: ``name`` (a name on PATH or a path), else crun, else runc."""
    if name:
        path = shutil.which(name)
        if path is None:
            raise RuntimeMissing(f"OCI runtime {name!r} not found: apt-get install crun (or runc), "
                                 "or give --runtime PATH")
        return path
    for n in RUNTIMES:
        path = shutil.which(n)
        if path:
            return path
    raise RuntimeMissing("no OCI runtime found (crun or runc): apt-get install crun")


def cgroup_layout() -> str:
    """``unified`` (cgroup v2 only), ``hybrid`` (v1 controllers plus a v2 ``unified`` mount) or ``legacy``."""
    fstypes = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstypes[fields[4]] = fields[sep + 1]
    if fstypes.get("/sys/fs/cgroup") == "cgroup2":
        return "unified"
    if fstypes.get(UNIFIED) == "cgroup2":
        return "hybrid"
    return "legacy"


# --- the process -----------------------------------------------------------------

def _read_db(root_fd: int, rel: bytes) -> list[list[str]]:
    """``/etc/passwd``-style lines of the rootfs, read without following a symlink out of it."""
    try:
        fd = ovl.open_beneath(root_fd, rel, os.O_RDONLY)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        text = f.read(4 << 20).decode("utf-8", "replace")
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def resolve_user(root_fd: int, user: str) -> dict:
    """The OCI ``process.user`` for an image config's ``User`` (resolved in the rootfs, as runtimes expect)."""
    user = (user or "").strip()
    name, _, group = user.partition(":")
    passwd = _read_db(root_fd, b"etc/passwd")
    groups = _read_db(root_fd, b"etc/group")
    uid, gid, login = 0, 0, "root"
    if name:
        if name.isdigit():
            uid = int(name)
            entry = next((p for p in passwd if len(p) > 3 and p[2] == name), None)
        else:
            entry = next((p for p in passwd if len(p) > 3 and p[0] == name), None)
            if entry is None:
                raise ContainerError(f"user {name!r}: not found in the image's /etc/passwd")
            uid = int(entry[2])
        if entry is not None:
            gid, login = int(entry[3]), entry[0]
        else:
            gid, login = (uid if not group else 0), ""
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = next((g for g in groups if len(g) > 2 and g[0] == group), None)
            if g is None:
                raise ContainerError(f"group {group!r}: not found in the image's /etc/group")
            gid = int(g[2])
    extra = sorted({int(g[2]) for g in groups if len(g) > 3 and login and login in g[3].split(",")
                    and g[2].isdigit() and int(g[2]) != gid})
    out = {"uid": uid, "gid": gid}
    if extra:
        out["additionalGids"] = extra
    return out


def process_args(config: dict, command: list[str]) -> list[str]:
    entry = list(config.get("Entrypoint") or [])
    args = entry + (list(command) if command else list(config.get("Cmd") or []))
    if not args:
        raise ContainerError("no command: the image has no Entrypoint or Cmd; give a COMMAND")
    return args


def bundle_config(image_config: dict, rootfs: str, args: list[str], user: dict, hostname: str,
                  terminal: bool) -> dict:
    env = list(image_config.get("Env") or [])
    keys = {e.partition("=")[0] for e in env}
    if "PATH" not in keys:
        env.insert(0, f"PATH={DEFAULT_PATH}")
    if "HOSTNAME" not in keys:
        env.append(f"HOSTNAME={hostname}")
    if terminal and "TERM" not in keys:
        env.append("TERM=xterm")
    caps = list(DEFAULT_CAPS)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal, "user": user, "args": args, "env": env,
            "cwd": image_config.get("WorkingDir") or "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": False,
        },
        "root": {"path": rootfs, "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "maskedPaths": MASKED,
            "readonlyPaths": READONLY,
        },
    }


# --- running ------------------------------------------------------------------

def _private_cgroup_view() -> None:
    """In the runtime's child, before exec: a mount namespace of its own where the cgroup2
    ``unified`` mount of a hybrid host is hidden (crun then sees a plain cgroup v1 host)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for what, rc in (("unshare(CLONE_NEWNS)", lambda: libc.unshare(CLONE_NEWNS)),
                     ("mount --make-rprivate /", lambda: libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)),
                     (f"mount tmpfs on {UNIFIED}", lambda: libc.mount(b"tmpfs", UNIFIED.encode(), b"tmpfs", 0,
                                                                       b"mode=755"))):
        if rc() != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")


def runtime_command(runtime: str, bundle: str, cid: str, layout: str) -> tuple[list[str], bool]:
    """(argv, whether to hide the unified cgroup mount first)."""
    name = os.path.basename(runtime)
    if name.startswith("crun") and layout == "hybrid":
        return [runtime, "--cgroup-manager=disabled", "run", "--bundle", bundle, cid], True
    return [runtime, "run", "--bundle", bundle, cid], False


def run_bundle(runtime: str, bundle: str, cid: str) -> int:
    argv, hide = runtime_command(runtime, bundle, cid, cgroup_layout())

    def child() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if hide:
            _private_cgroup_view()

    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)   # the runtime handles ^C; we must still clean up
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        try:
            proc = subprocess.Popen(argv, preexec_fn=child)
        except subprocess.SubprocessError as e:
            raise ContainerError(f"cannot start {os.path.basename(runtime)}: {e}; a private mount namespace "
                                 "is needed on this cgroup-hybrid host (run as root)") from None
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    return 128 - code if code < 0 else code


def _unmount(mp: str) -> None:
    for attempt in range(50):
        if not is_mountpoint(mp):
            return
        try:
            umount(mp)
            return
        except UsageError as e:
            if "busy" not in str(e) or attempt == 49:
                raise
            time.sleep(0.1)


def _reap_daemon(c: Container) -> None:
    """The mount's daemon was forked by this process: reap it when it exits (``umount`` waits for it to go,
    and an unreaped child would linger as a zombie until we exit)."""
    state = model.mounted_at(c)
    if state is None:
        return

    def wait() -> None:
        try:
            os.waitpid(state.pid, 0)
        except ChildProcessError:
            pass
    threading.Thread(target=wait, name="reap-unionfs-daemon", daemon=True).start()


def run(store: Store, image: str, command: list[str], name: str | None = None, remove: bool = False,
        runtime: str | None = None) -> int:
    runtime_path = find_runtime(runtime)            # before anything is created
    from .commands import create
    c: Container = create(store, image, name)
    try:
        os.makedirs(c.rootfs, mode=0o755, exist_ok=True)
        mount_container(store, c, c.rootfs, ["suid,dev,allow_other"])
        _reap_daemon(c)
        try:
            config = (json.loads(store.blob(c.image)).get("config") or {})
            root_fd = os.open(c.rootfs, ovl.O_DIR & ~os.O_NOFOLLOW)
            try:
                user = resolve_user(root_fd, str(config.get("User") or ""))
            finally:
                os.close(root_fd)
            args = process_args(config, command)
            spec = bundle_config(config, c.rootfs, args, user, c.short_id, sys.stdin.isatty())
            os.makedirs(c.bundle, mode=0o700, exist_ok=True)
            with open(os.path.join(c.bundle, "config.json"), "w") as f:
                json.dump(spec, f, indent=1)
            return run_bundle(runtime_path, c.bundle, f"unionfs-{c.short_id}")
        finally:
            _unmount(c.rootfs)
    finally:
        if remove:
            with store.locked():
                if model.mounted_at(c) is None:
                    model.remove(store, c)
