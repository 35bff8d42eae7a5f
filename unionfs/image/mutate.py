"""Image mutation: a new config from an old one plus one step, as commit (and a build's steps) make it.

As go-containerregistry's ``mutate``: the base config is copied with its unknown
fields, Dockerfile-style instructions (``--change``) are applied to its
``config``, a layer's diff_id is appended to ``rootfs`` and a history entry is
written that lines up with the layers.  It knows nothing of containers or the
store: callers hash and record the result.
"""
from __future__ import annotations

import json
import posixpath
import shlex

from .model import ImageError
from .store import now_iso

# What ``--change`` takes (``docker commit --change``), and a build's metadata-only steps.
INSTRUCTIONS = ("CMD", "ENTRYPOINT", "ENV", "WORKDIR", "USER", "EXPOSE", "LABEL", "VOLUME")


def _json_or_shell(text: str, what: str) -> list[str]:
    s = text.strip()
    if s.startswith("["):
        try:
            v = json.loads(s)
        except ValueError:
            v = None
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return v
    if not s:
        raise ImageError(f"--change {what}: needs an argument")
    return ["/bin/sh", "-c", s]


def _pairs(text: str, what: str) -> list[tuple[str, str]]:
    """``k=v k2="v 2"`` (or the legacy ``k v`` form for ENV/LABEL)."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ImageError(f"--change {what}: {e}") from None
    if not words:
        raise ImageError(f"--change {what}: needs an argument")
    if "=" not in words[0]:
        k, _, v = text.strip().partition(" ")
        return [(k, v.strip())]
    out = []
    for w in words:
        k, eq, v = w.partition("=")
        if not eq or not k:
            raise ImageError(f"--change {what}: {w!r} is not KEY=VALUE")
        out.append((k, v))
    return out


def apply_change(cfg: dict, line: str) -> None:
    """Apply one Dockerfile instruction (CMD, ENTRYPOINT, ENV, WORKDIR, USER, EXPOSE, LABEL, VOLUME) to ``cfg``."""
    word, _, rest = line.strip().partition(" ")
    op = word.upper()
    rest = rest.strip()
    if op not in INSTRUCTIONS:
        raise ImageError(f"--change {line!r}: unknown instruction {word!r} "
                             f"(supported: {', '.join(INSTRUCTIONS)})")
    if op == "CMD":
        cfg["Cmd"] = _json_or_shell(rest, op)
    elif op == "ENTRYPOINT":
        cfg["Entrypoint"] = _json_or_shell(rest, op)
    elif op == "ENV":
        env = list(cfg.get("Env") or [])
        for k, v in _pairs(rest, op):
            env = [e for e in env if e.partition("=")[0] != k] + [f"{k}={v}"]
        cfg["Env"] = env
    elif op == "LABEL":
        labels = dict(cfg.get("Labels") or {})
        labels.update(_pairs(rest, op))
        cfg["Labels"] = labels
    elif op == "WORKDIR":
        if not rest:
            raise ImageError("--change WORKDIR: needs a path")
        cfg["WorkingDir"] = posixpath.normpath(posixpath.join(cfg.get("WorkingDir") or "/", rest))
    elif op == "USER":
        if not rest:
            raise ImageError("--change USER: needs a user")
        cfg["User"] = rest
    elif op == "EXPOSE":
        ports = dict(cfg.get("ExposedPorts") or {})
        for p in rest.split():
            num, _, proto = p.partition("/")
            if not num.isdigit() or proto not in ("", "tcp", "udp", "sctp"):
                raise ImageError(f"--change EXPOSE: {p!r} is not PORT[/tcp|udp|sctp]")
            ports[f"{int(num)}/{proto or 'tcp'}"] = {}
        if not ports:
            raise ImageError("--change EXPOSE: needs a port")
        cfg["ExposedPorts"] = ports
    elif op == "VOLUME":
        vols = dict(cfg.get("Volumes") or {})
        s = rest.strip()
        paths = json.loads(s) if s.startswith("[") and _is_str_list(s) else s.split()
        if not paths:
            raise ImageError("--change VOLUME: needs a path")
        for p in paths:
            vols[p] = {}
        cfg["Volumes"] = vols


def _is_str_list(s: str) -> bool:
    try:
        v = json.loads(s)
    except ValueError:
        return False
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def new_config(base: dict, diff_id: str | None, created_by: str, message: str = "", author: str | None = None,
               changes_: list[str] = (), created: str | None = None) -> dict:
    """The config of ``base`` plus one step: a layer ``diff_id`` (None: a step without a layer,
    ``empty_layer`` in its history entry), ``changes_`` applied, a history entry, a new ``created``
    (now, or as given: a build's ``SOURCE_DATE_EPOCH``)."""
    cfg = json.loads(json.dumps(base))   # a deep copy; unknown fields are kept
    created = created or now_iso()
    inner = dict(cfg.get("config") or {})
    for line in changes_:
        apply_change(inner, line)
    cfg["config"] = inner
    cfg["created"] = created
    if author:
        cfg["author"] = author
    else:
        cfg.pop("author", None)
    rootfs = dict(cfg.get("rootfs") or {"type": "layers", "diff_ids": []})
    base_ids = list(rootfs.get("diff_ids") or [])
    rootfs["diff_ids"] = base_ids + ([diff_id] if diff_id else [])
    cfg["rootfs"] = rootfs
    history = [h for h in (cfg.get("history") or []) if isinstance(h, dict)]
    if sum(not h.get("empty_layer", False) for h in history) != len(base_ids):
        # No history, or one that does not match the layers: one plain entry per layer, so ours lines up.
        history = [{"created": base.get("created") or created, "created_by": ""} for _ in base_ids]
    entry = {"created": created, "created_by": created_by}
    if author:
        entry["author"] = author
    if message:
        entry["comment"] = message
    if not diff_id:
        entry["empty_layer"] = True
    cfg["history"] = history + [entry]
    for k in ("container", "container_config"):   # Docker's: about the container a base was built in
        cfg.pop(k, None)
    return cfg
