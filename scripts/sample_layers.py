"""Build a small sample layer stack: a base layer, an update that deletes and replaces, an app layer.

Usage: python scripts/sample_layers.py DIR   (creates DIR/base, DIR/update, DIR/app)
"""
import os
import shutil
import sys
from pathlib import Path


def put(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


def main(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    base, update, app = root / "base", root / "update", root / "app"
    put(base / "etc/os-release", 'NAME="Sample Linux"\nVERSION="1.0"\n')
    put(base / "etc/motd", "Welcome to the base layer\n")
    put(base / "bin/hello", "#!/bin/sh\necho hello from the base layer\n", 0o755)
    put(base / "var/cache/old.db", "stale cache\n")
    put(base / "var/cache/index", "stale index\n")
    put(base / "usr/share/doc/readme", "base docs\n")
    os.symlink("/bin/hello", base / "bin/hi")

    put(update / "etc/os-release", 'NAME="Sample Linux"\nVERSION="1.1"\n')
    os.mknod(update / "etc/motd", 0o600 | 0o020000, 0)             # whiteout: deleted in this layer
    (update / "var/cache").mkdir(parents=True)
    os.setxattr(update / "var/cache", "trusted.overlay.opaque", b"y")  # opaque: cache replaced wholesale
    put(update / "var/cache/fresh.db", "fresh cache\n")
    put(update / "usr/share/doc/changelog", "1.1: fixed things\n")

    put(app / "app/main.py", "print('hello from the app layer')\n", 0o755)
    put(app / "etc/app.conf", "port=8080\n")
    (app / "usr/share/doc").mkdir(parents=True)
    (app / "usr/share/doc/.wh.readme").touch()                        # OCI-style whiteout
    for d in (base, update, app):
        os.chmod(d, 0o755)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
