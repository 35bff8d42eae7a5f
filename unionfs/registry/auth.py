"""Who we are to a registry: credentials, and the challenges registries answer with.

Credentials come from ``unionfs login`` (our own config file, ``0600``) or from
Docker's ``~/.docker/config.json`` (``auths.<registry>.auth``, base64 ``user:password``).
A registry says how to authenticate in ``WWW-Authenticate`` on a 401:

* ``Basic realm=...``: send the credentials with every request;
* ``Bearer realm=...,service=...,scope=...``: ask the token server at ``realm`` for a
  token covering the scopes we need (with the credentials as basic auth, or anonymously),
  then send ``Authorization: Bearer <token>`` (the Docker token protocol).

Per-registry settings live in the same file: ``{"registries": {"HOST[:PORT]":
{"insecure": true, "ca_file": "..."}}}``.
"""
from __future__ import annotations

import base64
import json
import os
import re
import tempfile
from dataclasses import dataclass

from ..image.model import MAX_JSON, ImageError, parse_json

ENV_CONFIG_DIR = "UNIONFS_CONFIG_DIR"
HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str   # where they came from, for error messages

    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def config_path() -> str:
    base = os.environ.get(ENV_CONFIG_DIR)
    if not base:
        xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        base = os.path.join(xdg, "unionfs")
    return os.path.join(base, "config.json")


def docker_config_path() -> str:
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


def _read(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = parse_json(f.read(MAX_JSON + 1), path)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ImageError(f"{path}: unreadable ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ImageError(f"{path}: not a JSON object")
    return data


def _key(name: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``http://h:5000/`` -> ``h:5000``."""
    name = re.sub(r"^[a-z]+://", "", name.strip()).split("/", 1)[0].lower()
    return "docker.io" if name in HUB_ALIASES else name


def load_config() -> dict:
    return _read(config_path())


def save_config(cfg: dict) -> None:
    """Write the config file atomically, readable by its owner only (it holds passwords)."""
    path = config_path()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", dir=os.path.dirname(path))
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(cfg, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def registry_settings(registry: str) -> dict:
    """``registries.<host>`` of our config: ``insecure`` (true/false) and ``ca_file`` (a path), type-checked."""
    regs = load_config().get("registries") or {}
    if not isinstance(regs, dict):
        raise ImageError(f"{config_path()}: registries is not an object")
    found = next((v for k, v in regs.items() if _key(k) == _key(registry) and isinstance(v, dict)), {})
    if not isinstance(found.get("insecure", False), bool) or not isinstance(found.get("ca_file", ""), str):
        raise ImageError(f"{config_path()}: registries.{registry}: insecure must be true or false, "
                         "ca_file a path")
    return found


def _from_auths(auths: object, registry: str, source: str) -> Credentials | None:
    if not isinstance(auths, dict):
        return None
    for k, v in auths.items():
        if _key(k) != _key(registry) or not isinstance(v, dict):
            continue
        if isinstance(v.get("auth"), str) and v["auth"]:
            try:
                user, sep, password = base64.b64decode(v["auth"], validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise ImageError(f"{source}: the auth entry for {k} is not base64 of user:password") from None
            if sep:
                return Credentials(user, password, source)
        if isinstance(v.get("username"), str) and isinstance(v.get("password"), str):
            return Credentials(v["username"], v["password"], source)
    return None


def find_credentials(registry: str) -> Credentials | None:
    """Ours (``unionfs login``) first, then Docker's ``config.json`` ``auths``."""
    own = config_path()
    found = _from_auths(load_config().get("auths"), registry, own)
    if found is None:
        docker = docker_config_path()
        found = _from_auths(_read(docker).get("auths"), registry, docker)
    return found


def _own_auths(cfg: dict) -> dict:
    auths = cfg.get("auths") or {}
    if not isinstance(auths, dict):
        raise ImageError(f"{config_path()}: auths is not an object")
    return auths


def store_credentials(registry: str, creds: Credentials) -> str:
    cfg = load_config()
    auths = {k: v for k, v in _own_auths(cfg).items() if _key(k) != _key(registry)}
    auths[_key(registry)] = {"auth": base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()}
    cfg["auths"] = auths
    save_config(cfg)
    return config_path()


def remove_credentials(registry: str) -> bool:
    cfg = load_config()
    auths = _own_auths(cfg)
    kept = {k: v for k, v in auths.items() if _key(k) != _key(registry)}
    if len(kept) == len(auths):
        return False
    cfg["auths"] = kept
    save_config(cfg)
    return True


# --- challenges ------------------------------------------------------------------------

_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


@dataclass(frozen=True)
class Challenge:
    scheme: str            # "basic" or "bearer", lower-case
    params: dict[str, str]


def parse_challenge(header: str | None) -> Challenge | None:
    """``Bearer realm="https://auth",service="registry",scope="repository:x:pull"`` -> Challenge."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", m.group(2)) if m.group(2) is not None else m.group(3)
        pos = m.end()
    return Challenge(scheme.lower(), params)
