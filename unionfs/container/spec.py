"""An OCI runtime spec (``config.json``) from an image config plus ``docker run``'s overrides.

Plain functions over plain records, reusable by anything that runs a process in a
container's rootfs (``run``, ``exec``, a Dockerfile's ``RUN``):

* :class:`RunOptions`: what ``docker run`` lets a user override (env, user, workdir,
  entrypoint, mounts, tmpfs, read-only root, hostname, network, capabilities...);
* :func:`process_spec`: the OCI ``process`` (args, env with PATH/HOSTNAME/HOME/TERM,
  cwd, user resolved in the rootfs's ``/etc/passwd`` and ``/etc/group``, caps);
* :func:`runtime_spec`: the whole spec: /proc, a tmpfs /dev with pts, shm and mqueue,
  read-only /sys, the masked and read-only paths, namespaces, the user's mounts.

Nothing here mounts or runs anything; the rootfs is only read (fd-relative, never
following a symlink out of it).
"""
from __future__ import annotations

import os
import resource
import shlex
import signal
from dataclasses import dataclass, field

from ..fs import sys as ovl
from .model import ContainerError
from . import subids

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Docker's default capability set (moby oci/caps/defaults.go).
DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
                "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
                "CAP_KILL", "CAP_AUDIT_WRITE"]
# Every capability, by number (linux/capability.h).
CAP_NUMBERS = ["CAP_" + n for n in (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE")]
ALL_CAPS = sorted(CAP_NUMBERS)
MASKED = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
          "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap"]
READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
INIT_PATH = "/dev/init"     # where --init's tini goes: on the container's /dev tmpfs, never in its layers
NETWORKS = ("host", "none")


@dataclass
class Mount:
    """A volume, bind mount or tmpfs inside the container (``-v``, ``--mount``, ``--tmpfs``)."""
    type: str                 # bind | volume | tmpfs
    destination: str          # absolute path in the container
    source: str = ""          # host path (bind), volume name ("" = anonymous), unused for tmpfs
    readonly: bool = False
    options: list[str] = field(default_factory=list)   # tmpfs options (size=, mode=)


@dataclass
class RunOptions:
    """What ``docker run`` overrides of an image config.  ``None`` means "the image's"."""
    command: list[str] = field(default_factory=list)
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=list)      # K=V, applied over the image's Env in order
    workdir: str | None = None
    user: str | None = None
    hostname: str | None = None
    mounts: list[Mount] = field(default_factory=list)
    read_only: bool = False
    network: str = "host"
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    privileged: bool = False
    init: bool = False
    tty: bool = False
    interactive: bool = False


# --- parsing the user's words -------------------------------------------------------

def parse_env(items: list[str], environ: dict[str, str] | None = None) -> list[str]:
    """``-e K=V`` as given; ``-e K`` takes K from our environment, and is dropped if unset (as docker does)."""
    environ = os.environ if environ is None else environ
    out = []
    for item in items:
        key, eq, _ = item.partition("=")
        if not key or any(c.isspace() for c in key):
            raise ContainerError(f"invalid environment variable {item!r}: give KEY=VALUE or KEY")
        if eq:
            out.append(item)
        elif key in environ:
            out.append(f"{key}={environ[key]}")
    return out


def read_env_file(path: str) -> list[str]:
    """``--env-file``: one ``K=V`` or ``K`` a line; blank lines and ``#`` comments skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ContainerError(f"--env-file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ContainerError(f"--env-file {path}: not UTF-8 text") from None
    return [line.lstrip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def parse_entrypoint(value: str) -> list[str]:
    """``--entrypoint ""`` clears the image's; otherwise one executable (docker takes no arguments here)."""
    return [value] if value else []


def parse_caps(names: list[str]) -> list[str]:
    out = []
    for n in names:
        n = n.strip().upper()
        if n == "ALL":
            out.append("ALL")
            continue
        cap = n if n.startswith("CAP_") else "CAP_" + n
        if cap not in ALL_CAPS:
            raise ContainerError(f"unknown capability {n!r}")
        out.append(cap)
    return out


def host_caps() -> list[str]:
    """The capabilities we may hand on: our bounding set (less than all when we run in a container)."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("CapBnd:"))
    except (OSError, StopIteration, ValueError):
        return list(DEFAULT_CAPS)
    return sorted(c for i, c in enumerate(CAP_NUMBERS) if mask >> i & 1)


def capabilities(opts: RunOptions) -> list[str]:
    """Docker's default set, with --cap-add/--cap-drop (ALL: every one the host allows); --privileged: all."""
    if opts.privileged:
        return host_caps()
    caps = list(DEFAULT_CAPS)
    if "ALL" in opts.cap_drop:
        caps = []
    caps = [c for c in caps if c not in opts.cap_drop]
    if "ALL" in opts.cap_add:
        caps = host_caps()
    caps += [c for c in opts.cap_add if c != "ALL" and c not in caps]
    return caps


def stop_signal(image_config: dict) -> int:
    """The image's ``StopSignal`` (a name like SIGQUIT or QUIT, or a number); SIGTERM by default."""
    return parse_signal(str(image_config.get("StopSignal") or "SIGTERM"))


def parse_signal(value: str) -> int:
    v = value.strip().upper()
    if v.isdigit():
        n = int(v)
        if 0 < n < signal.NSIG:
            return n
    else:
        name = v if v.startswith("SIG") else "SIG" + v
        try:
            return int(signal.Signals[name])
        except KeyError:
            pass
    raise ContainerError(f"invalid signal {value!r}")


# --- the process -------------------------------------------------------------------

def _read_db(root_fd: int, rel: bytes) -> list[list[str]]:
    """``/etc/passwd``-style lines of the rootfs, read without following a symlink out of it."""
    try:
        fd = ovl.open_beneath(root_fd, rel, os.O_RDONLY)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        text = f.read(4 << 20).decode("utf-8", "replace")
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


@dataclass
class User:
    uid: int
    gid: int
    additional_gids: list[int]
    home: str

    def oci(self) -> dict:
        out: dict = {"uid": self.uid, "gid": self.gid}
        if self.additional_gids:
            out["additionalGids"] = self.additional_gids
        return out


def resolve_user(root_fd: int, user: str) -> User:
    """``NAME|UID[:GROUP|GID]`` resolved in the rootfs's /etc/passwd and /etc/group, as docker does:
    a uid not in /etc/passwd is fine (gid 0, HOME /), a name not there is an error."""
    user = (user or "").strip()
    name, _, group = user.partition(":")
    passwd = _read_db(root_fd, b"etc/passwd")
    groups = _read_db(root_fd, b"etc/group")
    uid, gid, login, home = 0, 0, "root", "/root"
    if name:
        if name.isdigit():
            uid = int(name)
            entry = next((p for p in passwd if len(p) > 3 and p[2] == name), None)
        else:
            entry = next((p for p in passwd if len(p) > 3 and p[0] == name), None)
            if entry is None:
                raise ContainerError(f"unable to find user {name}: no matching entries in the image's /etc/passwd")
            uid = int(entry[2])
        if entry is not None:
            gid, login = int(entry[3]), entry[0]
            home = entry[5] if len(entry) > 5 and entry[5] else "/"
        else:
            gid, login, home = 0, "", "/"
    elif passwd:
        entry = next((p for p in passwd if len(p) > 5 and p[2] == "0"), None)
        if entry is not None and entry[5]:
            home = entry[5]
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            g = next((g for g in groups if len(g) > 2 and g[0] == group), None)
            if g is None:
                raise ContainerError(f"unable to find group {group}: no matching entries in the image's /etc/group")
            gid = int(g[2])
    extra = sorted({int(g[2]) for g in groups if len(g) > 3 and login and login in g[3].split(",")
                    and g[2].isdigit() and int(g[2]) != gid})
    if os.geteuid() != 0:
        # Rootless, the container's user namespace maps the user as root and, where the host has what
        # that needs (subids), the user's subordinate ids as 1..N; else the user alone (and setgroups
        # is denied there): no other user, no supplementary groups.
        sub = subids.usable(os.geteuid())
        if sub is None:
            if uid != 0 or gid != 0:
                why = subids.missing_for_other_users(os.geteuid())
                raise ContainerError(f"user {user}: a rootless container runs as root only here: {why}; "
                                     "or give --user 0")
            extra = []
        elif max(uid, gid, *extra) > sub.count:
            raise ContainerError(f"user {user}: ids beyond the {sub.count} subordinate ids of "
                                 f"{subids.user_name(os.geteuid())} cannot be mapped")
    return User(uid, gid, extra, home)


def process_args(image_config: dict, opts: RunOptions) -> list[str]:
    """Entrypoint (or --entrypoint) + COMMAND (or the image's Cmd, dropped when --entrypoint is given)."""
    if opts.entrypoint is not None:
        entry = list(opts.entrypoint)
        cmd = list(opts.command)
    else:
        entry = list(image_config.get("Entrypoint") or [])
        cmd = list(opts.command) if opts.command else list(image_config.get("Cmd") or [])
    args = entry + cmd
    if not args:
        raise ContainerError("no command: the image has no Entrypoint or Cmd; give a COMMAND")
    if opts.init:
        args = [INIT_PATH, "--"] + args
    return args


def merge_env(base: list[str], overrides: list[str]) -> list[str]:
    """``base`` with each ``K=V`` of ``overrides`` replacing K (or appended), order kept."""
    out = list(base)
    index = {e.partition("=")[0]: i for i, e in enumerate(out)}
    for e in overrides:
        k = e.partition("=")[0]
        if k in index:
            out[index[k]] = e
        else:
            index[k] = len(out)
            out.append(e)
    return out


def process_env(image_config: dict, opts: RunOptions, hostname: str, home: str) -> list[str]:
    """The image's Env, then PATH, HOSTNAME, HOME and (with -t) TERM where not set, then -e/--env-file."""
    env = list(image_config.get("Env") or [])
    keys = {e.partition("=")[0] for e in env}
    defaults = [("PATH", DEFAULT_PATH), ("HOSTNAME", hostname), ("HOME", home)]
    if opts.tty:
        defaults.append(("TERM", "xterm"))
    for k, v in defaults:
        if k not in keys:
            env.insert(0, f"{k}={v}") if k == "PATH" else env.append(f"{k}={v}")
    return merge_env(env, opts.env)


def process_spec(image_config: dict, root_fd: int, opts: RunOptions, hostname: str) -> dict:
    """The OCI ``process`` of a container of ``image_config`` with ``opts`` (the rootfs open at ``root_fd``)."""
    user = resolve_user(root_fd, opts.user if opts.user is not None else str(image_config.get("User") or ""))
    caps = capabilities(opts)
    nofile = min(1048576, resource.getrlimit(resource.RLIMIT_NOFILE)[1])   # docker's, where the host allows it
    cwd = opts.workdir if opts.workdir is not None else (image_config.get("WorkingDir") or "/")
    if not cwd.startswith("/"):
        raise ContainerError(f"the working directory {cwd!r} is not an absolute path")
    return {
        "terminal": opts.tty, "user": user.oci(), "args": process_args(image_config, opts),
        "env": process_env(image_config, opts, hostname, user.home), "cwd": os.path.normpath(cwd),
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
        "noNewPrivileges": False,
    }


def exec_process(base: dict, root_fd: int, args: list[str], env: list[str], user: str | None,
                 workdir: str | None, tty: bool) -> dict:
    """``exec``'s process: the container's own (env, user, cwd, caps) with exec's overrides."""
    proc = dict(base)
    proc["args"] = list(args)
    proc["terminal"] = tty
    e = list(base.get("env") or [])
    if user is not None:
        u = resolve_user(root_fd, user)
        proc["user"] = u.oci()
        e = merge_env(e, [f"HOME={u.home}"])
    if tty and not any(x.startswith("TERM=") for x in e):
        e.append("TERM=xterm")
    proc["env"] = merge_env(e, env)
    if workdir is not None:
        if not workdir.startswith("/"):
            raise ContainerError(f"the working directory {workdir!r} is not an absolute path")
        proc["cwd"] = workdir
    proc.pop("consoleSize", None)
    return proc


# --- the whole spec -----------------------------------------------------------------

def bind(source: str, destination: str, readonly: bool = False) -> dict:
    return {"destination": destination, "type": "bind", "source": source,
            "options": ["rbind", "ro" if readonly else "rw", "rprivate"]}


def base_mounts(privileged: bool) -> list[dict]:
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         # Rootless with the user's group alone (as 0) mapped, there is no tty group 5.
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
         + (["gid=5"] if os.geteuid() == 0 or subids.usable(os.geteuid()) else [])},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "rw" if privileged else "ro"]},
    ]


def tmpfs_mount(destination: str, options: list[str], readonly: bool = False) -> dict:
    opts = ["nosuid", "nodev", "noexec" if "exec" not in options else "exec"]
    opts += [o for o in options if o not in ("exec", "noexec")]
    if not any(o.startswith("mode=") for o in opts):
        opts.append("mode=1777")
    if readonly:
        opts.append("ro")
    return {"destination": destination, "type": "tmpfs", "source": "tmpfs", "options": opts}


def runtime_spec(process: dict, rootfs: str, hostname: str, opts: RunOptions, mounts: list[dict]) -> dict:
    """The runtime-spec ``config.json``: ``process``, the base mounts and then ``mounts`` (already resolved:
    volumes and binds as host paths, /etc/hosts and friends), the namespaces and the masked paths."""
    namespaces = ["pid", "ipc", "uts", "mount"]
    if opts.network == "none":
        namespaces.append("network")
    return {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": rootfs, "readonly": opts.read_only},
        "hostname": hostname,
        "mounts": base_mounts(opts.privileged) + mounts,
        "linux": {
            "namespaces": [{"type": t} for t in namespaces],
            "maskedPaths": [] if opts.privileged else MASKED,
            "readonlyPaths": [] if opts.privileged else READONLY,
        },
    }


def describe(args: list[str]) -> str:
    """A command as ``ps`` shows it."""
    return shlex.join(args)
