"""Authentication and TLS against a real registry on loopback: htpasswd basic auth, bearer tokens from a
token server, credentials from ``unionfs login`` and from Docker's config.json, a self-signed certificate."""
from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from image_archives import layer_tar, f
from registry_server import Registry, TokenServer, have_registry
from test_registry_pull_push import env_for, local_image, ok, one_line_error, run

pytestmark = pytest.mark.skipif(not have_registry(), reason="docker-registry, openssl and htpasswd are needed "
                                "(scripts/setup --test installs them)")

USERS = {"alice": "s3cret pass"}
LAYER = layer_tar([f("hello", b"auth test\n")])


def login(tmp_path, host, user, password, *extra, env=None):
    import subprocess
    from helpers import unionfs_cmd
    return subprocess.run(unionfs_cmd("login", host, "--username", user, "--password-stdin", *extra),
                          input=password + "\n", capture_output=True, text=True, timeout=60, env=env or env_for(tmp_path))


def test_basic_auth_login_logout_and_docker_config(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    local_image(tmp_path, a, (LAYER,))
    with Registry(tmp_path / "reg", users=USERS) as reg:
        ref = f"{reg.host}/private/app:1"
        err = one_line_error(run(tmp_path, "--root", str(a), "push", "app:1", ref, "--insecure"), "unauthorized")
        assert f"unionfs login {reg.host}" in err

        one_line_error(login(tmp_path, reg.host, "alice", "wrong", "--insecure"), "unauthorized", "refused")
        assert not (tmp_path / "cfg/config.json").exists()
        r = ok(login(tmp_path, reg.host, "alice", USERS["alice"], "--insecure"))
        assert "Login Succeeded" in r.stdout
        cfg = tmp_path / "cfg/config.json"
        assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
        entry = json.loads(cfg.read_text())["auths"][reg.host]["auth"]
        assert base64.b64decode(entry).decode() == "alice:" + USERS["alice"]

        ok(run(tmp_path, "--root", str(a), "push", "app:1", ref, "--insecure"))
        ok(run(tmp_path, "--root", str(b), "pull", ref, "--insecure"))
        assert (b / "layers").exists() and os.listdir(b / "images")

        assert "Removing login credentials" in ok(run(tmp_path, "logout", reg.host)).stdout
        c = tmp_path / "c"
        one_line_error(run(tmp_path, "--root", str(c), "pull", ref, "--insecure"), "unauthorized")

        # Docker's config.json (auths.<host>.auth = base64 user:password)
        docker = tmp_path / "docker"
        docker.mkdir()
        (docker / "config.json").write_text(json.dumps({"auths": {f"http://{reg.host}/v2/": {
            "auth": base64.b64encode(b"alice:wrong").decode()}}}))
        err = one_line_error(run(tmp_path, "--root", str(c), "pull", ref, "--insecure"), "unauthorized")
        assert str(docker / "config.json") in err   # says whose credentials were refused
        (docker / "config.json").write_text(json.dumps({"auths": {reg.host: {
            "auth": base64.b64encode(("alice:" + USERS["alice"]).encode()).decode()}}}))
        ok(run(tmp_path, "--root", str(c), "pull", ref, "--insecure"))


def test_bearer_token_flow(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    local_image(tmp_path, a, (LAYER,))
    with TokenServer(tmp_path, users=USERS) as ts, Registry(tmp_path / "reg", token=ts) as reg:
        ref = f"{reg.host}/tok/app:1"
        one_line_error(run(tmp_path, "--root", str(a), "push", "app:1", ref, "--insecure"), "token server", "login first")
        one_line_error(login(tmp_path, reg.host, "alice", "nope", "--insecure"), "bad credentials")
        ok(login(tmp_path, reg.host, "alice", USERS["alice"], "--insecure"))
        ts.requests.clear()
        ok(run(tmp_path, "--root", str(a), "push", "app:1", ref, "--insecure"))
        assert ts.requests and all(r["user"] == "alice" for r in ts.requests)
        assert ["repository:tok/app:pull,push"] in [r["scope"] for r in ts.requests]
        assert ts.requests[0]["service"] == ["unionfs-test-registry"]
        ts.requests.clear()
        ok(run(tmp_path, "--root", str(b), "pull", ref, "--insecure"))
        assert [r["scope"] for r in ts.requests] == [["repository:tok/app:pull"]]   # one token for the whole pull


def test_tls_with_a_self_signed_certificate(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    local_image(tmp_path, a, (LAYER,))
    with Registry(tmp_path / "reg", tls=True) as reg:
        ref = f"{reg.host}/tls/app:1"
        one_line_error(run(tmp_path, "--root", str(a), "push", "app:1", ref), "TLS", "certificate verify failed",
                       "--ca-file")
        ok(run(tmp_path, "--root", str(a), "push", "app:1", ref, "--ca-file", str(reg.cert)))
        ok(run(tmp_path, "--root", str(b), "pull", ref, "--ca-file", str(reg.cert)))
        env = dict(env_for(tmp_path), SSL_CERT_FILE=str(reg.cert))
        ok(run(tmp_path, "--root", str(tmp_path / "c"), "pull", ref, env=env))
        ok(run(tmp_path, "--root", str(tmp_path / "d"), "pull", ref, "--insecure"))   # unverified TLS
        one_line_error(run(tmp_path, "--root", str(tmp_path / "e"), "pull", ref, "--ca-file", str(tmp_path / "none")),
                       "--ca-file")
        # a per-registry setting in the config file does what --ca-file does
        (tmp_path / "cfg").mkdir(exist_ok=True)
        (tmp_path / "cfg/config.json").write_text(json.dumps({"registries": {reg.host: {"ca_file": str(reg.cert)}}}))
        ok(run(tmp_path, "--root", str(tmp_path / "f"), "pull", ref))
