"""Cold start from a registry: ``run --lazy`` of an eStargz image against ``pull`` + ``run``, and podman's pull,
all through one rate-limited loopback proxy (a link of --rate MB/s shared by every connection) in front of
Debian's docker-registry.  Prints seconds and bytes over the link for each.  Measures; asserts nothing.

The image: a busybox layer (the shell) and a layer of --mib MiB of real files from the host's
/usr/lib/x86_64-linux-gnu, as a Debian userland is; the workload starts ``sh`` and prints one line.
Every run starts from an empty store; seconds min/median/max over --repeat runs.  scripts/bench
prints this table too (its whole-tool rows; ``--no-cold-start`` leaves it out).
"""
from __future__ import annotations

import argparse
import gzip
import http.client
import http.server
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from container_images import busybox_layer  # noqa: E402
from image_archives import Img, config, docker_save_legacy, sha  # noqa: E402
from registry_server import Registry  # noqa: E402

UNIONFS = [sys.executable, "-m", "unionfs"]


class Link:
    """A token bucket: every byte through the proxy waits its turn at ``rate`` bytes per second."""

    def __init__(self, rate: float) -> None:
        self.rate, self.lock, self.next_free, self.sent = rate, threading.Lock(), time.monotonic(), 0

    def take(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + n / self.rate
            self.sent += n
            wait = self.next_free - now
        if wait > 0:
            time.sleep(wait)


class ThrottledProxy:
    def __init__(self, upstream_port: int, link: Link) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                up = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers: dict[str, str] = {}
                for k, v in self.headers.items():   # repeated headers (Accept) joined, as HTTP allows
                    if k.lower() not in ("host", "connection"):
                        headers[k] = f"{headers[k]}, {v}" if k in headers else v
                up.request(self.command, self.path, body=body, headers=headers)
                resp = up.getresponse()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "keep-alive", "location"):
                        self.send_header(k, v)
                    elif k.lower() == "location":
                        self.send_header(k, v.replace(f"127.0.0.1:{upstream_port}", outer.host))
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    while self.command != "HEAD" and (piece := resp.read(16384)):
                        link.take(len(piece))
                        self.wfile.write(piece)
                except (BrokenPipeError, ConnectionResetError):
                    pass   # the client went (a daemon unmounted mid-fill)
                self.close_connection = True
                up.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _forward

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def host_files_layer(mib: int) -> bytes:
    buf = io.BytesIO()
    budget = mib << 20
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        if os.path.isfile("/etc/os-release"):   # what `--cmd 'cat /etc/os-release'` reads
            tf.add(os.path.realpath("/etc/os-release"), arcname="etc/os-release")
        for dirpath, dirnames, filenames in os.walk("/usr/lib/x86_64-linux-gnu"):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                if os.path.islink(p) or not os.path.isfile(p) or budget <= 0:
                    continue
                ti = tf.gettarinfo(p, arcname=p.lstrip("/"))
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                with open(p, "rb") as f:
                    tf.addfile(ti, f)
                budget -= ti.size
    return buf.getvalue()


def u(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*UNIONFS, "--root", str(root), *args], capture_output=True, text=True, timeout=1800)
    if check and r.returncode != 0:
        raise SystemExit(f"unionfs {' '.join(args)}: {r.stderr}")
    return r


def _time_cmd(cmd: list[str], env: dict | None = None, wait_exit: bool = True) -> tuple[float, float | None, str]:
    """(seconds to the first line of output, seconds to exit or None, the line)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    t1 = time.monotonic()
    try:
        _, err = p.communicate(timeout=1800 if wait_exit else 60)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
    if wait_exit and p.returncode != 0 or not line:
        raise SystemExit(f"{' '.join(cmd)}: {err}")
    return t1 - t0, (time.monotonic() - t0) if wait_exit else None, line.strip()


WORKLOAD = ["sh", "-c", "echo started; ls / > /dev/null"]


def cold_start(work: Path, rate: float, mib: int, repeat: int, say=lambda m: None,
               cmd: str = WORKLOAD[-1]) -> dict[str, dict[str, list]]:
    """Each row's figures over ``repeat`` runs of ``sh -c CMD``, every run from an empty store
    (``first_output_s``, ``total_s``, ``bytes`` over the link): run --lazy of the eStargz image and of the
    gzip image through its index, pull + run of the gzip and the eStargz image, and podman run (which
    pulls) of the gzip image, interleaved so noise hits all alike."""
    workload = ["sh", "-c", cmd]
    layers = [busybox_layer(), host_files_layer(mib)]
    cfg = config([sha(x) for x in layers], Cmd=["sh"], Env=["PATH=/usr/bin:/bin"])
    docker_save_legacy(work / "img.tar", [Img([gzip.compress(x, 6) for x in layers], ["bench/app:1"], config=cfg)])
    src = work / "src"
    u(src, "load", str(work / "img.tar"))
    u(src, "convert", "--estargz", "bench/app:1", "bench/app:esgz")
    rows: dict[str, dict[str, list]] = {}

    def add(name: str, first: float, total: float | None, sent: int) -> None:
        r = rows.setdefault(name, {"first_output_s": [], "total_s": [], "bytes": []})
        r["first_output_s"].append(first)
        r["total_s"].append(total)
        r["bytes"].append(sent)
    with Registry(work / "reg") as reg:
        u(src, "push", "bench/app:1", f"{reg.host}/bench/app:gz", "--insecure")
        u(src, "push", "bench/app:esgz", f"{reg.host}/bench/app:esgz", "--insecure")
        u(src, "index", "--push", f"{reg.host}/bench/app:gz", "--insecure")   # once, by the publisher
        link = Link(rate * 1e6)
        proxy = ThrottledProxy(reg.port, link)
        try:
            for i in range(repeat):
                for name, tag in (("run --lazy eStargz", "esgz"), ("run --lazy gzip+index", "gz")):
                    store = work / f"s-lazy-{tag}-{i}"
                    sent = link.sent
                    first, total, _ = _time_cmd([*UNIONFS, "--root", str(store), "run", "--rm", "--user", "0",
                                                 "--lazy", "--insecure", f"{proxy.host}/bench/app:{tag}", *workload])
                    add(name, first, total, link.sent - sent)
                    shutil.rmtree(store, ignore_errors=True)
                for name, tag in (("pull+run gzip", "gz"), ("pull+run eStargz", "esgz")):
                    store = work / f"s-{tag}-{i}"
                    sent, t0 = link.sent, time.monotonic()
                    u(store, "pull", f"{proxy.host}/bench/app:{tag}", "--insecure")
                    t_pull = time.monotonic() - t0
                    first, total, _ = _time_cmd([*UNIONFS, "--root", str(store), "run", "--rm", "--user", "0",
                                                 f"{proxy.host}/bench/app:{tag}", *workload])
                    add(name, t_pull + first, t_pull + total, link.sent - sent)
                    shutil.rmtree(store, ignore_errors=True)
                if shutil.which("podman"):
                    from podman_env import Podman
                    pm = Podman(work / f"podman-{i}")
                    try:
                        sent = link.sent
                        argv = ["podman", "--runtime", pm.runtime, "run", "--rm", "--network", "host",
                                "--tls-verify=false", f"{proxy.host}/bench/app:gz", *workload]
                        # podman waits for conmon after a short-lived container: time to first output only
                        first, _, _ = _time_cmd(argv, env=pm.env, wait_exit=False)
                        add("podman run (pulls) gzip", first, None, link.sent - sent)
                    except SystemExit as e:
                        say(f"podman run failed: {str(e)[-300:]}")
                    finally:
                        pm.close()
                say(f"bench: cold start from a registry: round {i + 1}/{repeat} done")
        finally:
            proxy.close()
    rows["_image"] = {"uncompressed_bytes": [len(layers[0]) + len(layers[1])], "rate_mb_s": [rate], "cmd": [cmd]}
    return rows


def report(rows: dict[str, dict[str, list]]) -> str:
    """The table: seconds min/median/max to first output and to exit, median bytes over the link."""
    img = rows.get("_image", {})
    out = [f"cold start from a registry (link {img.get('rate_mb_s', ['?'])[0]} MB/s; image "
           f"{img.get('uncompressed_bytes', ['?'])[0]} bytes uncompressed; {img.get('cmd', WORKLOAD[-1:])[0]!r})",
           f"  {'':26} {'first output s min/med/max':>28} {'exit s min/med/max':>24} {'bytes (median)':>15}"]

    def mmm(xs: list) -> str:
        xs = [x for x in xs if x is not None]
        return f"{min(xs):.1f}/{statistics.median(xs):.1f}/{max(xs):.1f}" if xs else "-"
    for name, r in rows.items():
        if name.startswith("_"):
            continue
        out.append(f"  {name:26} {mmm(r['first_output_s']):>28} {mmm(r['total_s']):>24} "
                   f"{int(statistics.median(r['bytes'])):>15}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=4.0, help="MB/s of the link (default 4)")
    ap.add_argument("--mib", type=int, default=100, help="MiB of host files in the big layer (default 100)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row (default 3)")
    ap.add_argument("--cmd", default=WORKLOAD[-1], help="the workload (sh -c CMD)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-lazy-"))
    try:
        rows = cold_start(work, args.rate, args.mib, args.repeat, lambda m: print(m, file=sys.stderr), args.cmd)
        print(report(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        cleanup(work)
    return 0


def cleanup(work: Path) -> None:
    for line in open("/proc/self/mountinfo"):
        mp = line.split()[4]
        if mp.startswith(str(work)):
            subprocess.run(["umount", "-l", mp], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
