"""Cold start from a registry: ``run --lazy`` of an eStargz image against ``pull`` + ``run``, and podman's pull,
all through one rate-limited loopback proxy (a link of --rate MB/s shared by every connection) in front of
Debian's docker-registry.  Prints seconds and bytes over the link for each.  Measures; asserts nothing.

The image: a busybox layer (the shell) and a layer of --mib MiB of real files from the host's
/usr/lib/x86_64-linux-gnu, as a Debian userland is; the workload starts ``sh`` and prints one line.
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


def first_output(cmd: list[str]) -> tuple[float, float, str]:
    """(seconds to the first line of output, seconds to exit, the line)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    t1 = time.monotonic()
    _, err = p.communicate(timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: {err}")
    return t1 - t0, time.monotonic() - t0, line.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=4.0, help="MB/s of the link (default 4)")
    ap.add_argument("--mib", type=int, default=100, help="MiB of host files in the big layer (default 100)")
    ap.add_argument("--cmd", default="echo started; ls / > /dev/null", help="the workload (sh -c CMD)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-lazy-"))
    rows = {}
    try:
        layers = [busybox_layer(), host_files_layer(args.mib)]
        cfg = config([sha(x) for x in layers], Cmd=["sh"], Env=["PATH=/usr/bin:/bin"])
        docker_save_legacy(work / "img.tar", [Img([gzip.compress(x, 6) for x in layers], ["bench/app:1"], config=cfg)])
        src = work / "src"
        u(src, "load", str(work / "img.tar"))
        u(src, "convert", "--estargz", "bench/app:1", "bench/app:esgz")
        with Registry(work / "reg") as reg:
            u(src, "push", "bench/app:1", f"{reg.host}/bench/app:gz", "--insecure")
            u(src, "push", "bench/app:esgz", f"{reg.host}/bench/app:esgz", "--insecure")
            u(src, "index", "--push", f"{reg.host}/bench/app:gz", "--insecure")   # once, by the publisher
            link = Link(args.rate * 1e6)
            proxy = ThrottledProxy(reg.port, link)
            try:
                workload = ["sh", "-c", args.cmd]
                for name, tag in (("pull+run gzip", "gz"), ("pull+run eStargz", "esgz")):
                    store = work / f"s-{tag}"
                    sent, t0 = link.sent, time.monotonic()
                    u(store, "pull", f"{proxy.host}/bench/app:{tag}", "--insecure")
                    t_pull = time.monotonic() - t0
                    first, total, line = first_output([*UNIONFS, "--root", str(store), "run", "--rm", "--user", "0",
                                                       f"{proxy.host}/bench/app:{tag}", *workload])
                    rows[name] = {"first_output_s": t_pull + first, "total_s": t_pull + total,
                                  "bytes": link.sent - sent, "line": line}
                for name, tag in (("run --lazy eStargz", "esgz"), ("run --lazy gzip+index", "gz")):
                    store = work / f"s-lazy-{tag}"
                    sent = link.sent
                    first, total, line = first_output([*UNIONFS, "--root", str(store), "run", "--rm", "--user", "0",
                                                       "--lazy", "--insecure", f"{proxy.host}/bench/app:{tag}",
                                                       *workload])
                    rows[name] = {"first_output_s": first, "total_s": total, "bytes": link.sent - sent, "line": line}
                if shutil.which("podman"):
                    pr = work / "podman"
                    sent, t0 = link.sent, time.monotonic()
                    r = subprocess.run(["podman", "--root", str(pr / "root"), "--runroot", str(pr / "run"),
                                        "--storage-driver", "vfs", "pull", "-q", "--tls-verify=false",
                                        f"{proxy.host}/bench/app:gz"], capture_output=True, text=True, timeout=1800)
                    if r.returncode == 0:
                        rows["podman pull gzip"] = {"first_output_s": None, "total_s": time.monotonic() - t0,
                                                    "bytes": link.sent - sent, "line": ""}
                    else:
                        print(f"podman pull failed: {r.stderr.strip()[-300:]}", file=sys.stderr)
                    subprocess.run(["podman", "--root", str(pr / "root"), "--runroot", str(pr / "run"),
                                    "--storage-driver", "vfs", "system", "reset", "-f"], capture_output=True)
            finally:
                proxy.close()
        print(f"link {args.rate} MB/s; image: {len(layers[0]) + len(layers[1])} bytes uncompressed")
        print(f"{'':22} {'first output s':>14} {'total s':>9} {'bytes over the link':>20}")
        for name, r in rows.items():
            fo = f"{r['first_output_s']:.1f}" if r["first_output_s"] is not None else "-"
            print(f"{name:22} {fo:>14} {r['total_s']:9.1f} {r['bytes']:20d}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        for line in open("/proc/self/mountinfo"):
            mp = line.split()[4]
            if mp.startswith(str(work)):
                subprocess.run(["umount", "-l", mp], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
