"""The differential test's operations, run as the unprivileged user on two mounts (a child process).

``python rootless_diff.py OURS KERNEL SEED STEPS INITIAL_JSON`` applies the generator's operations
to both roots, the kernel first, and prints JSON: the first mismatch (or null), the number of
directory renames the kernel refused with EXDEV (rootless kernel overlayfs has no redirect_dir),
and both trees as :func:`helpers.snapshot` sees them (values as repr, for JSON).

Where the kernel says EXDEV to a rename, ours must succeed; the rename is then undone on ours
(renamed back, which goes through the redirect it wrote), so the two trees stay comparable.
"""
from __future__ import annotations

import json
import os
import stat
import sys

from difftest import Generator, apply
from helpers import snapshot

RENAMES = ("rename", "rename_noreplace", "rename_exchange")


def snapshot_as_user(root: str) -> dict:
    """helpers.snapshot as JSON-ready reprs; dirs the user closed to itself are opened for the walk."""
    # The user cannot walk a dir it made 0600: opened up for the walk, its own mode reported.
    closed = {}
    for dirpath, dirnames, _ in os.walk(root, onerror=None):
        for n in dirnames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o500 != 0o500:
                closed[os.path.relpath(p, root)] = stat.S_IMODE(st.st_mode)
                os.chmod(p, stat.S_IMODE(st.st_mode) | 0o700)
    out = snapshot(root, skip_unstatable=True)
    for rel, mode in sorted(closed.items(), reverse=True):
        out[rel] = (out[rel][0], mode, *out[rel][2:])
        os.chmod(os.path.join(root, rel), mode)
    return {k: repr(v) for k, v in out.items()}


def run(ours: str, kernel: str, seed: int, steps: int, initial: list[str]) -> dict:
    gen = Generator(seed, initial)
    log: list[str] = []
    exdev = 0
    mismatch = None
    for step in range(steps):
        op, args = gen.next()
        want = apply(kernel, op, args)
        if op in RENAMES and want == ("err", "EXDEV"):
            a, b = args
            if op == "rename_exchange" or not os.path.lexists(os.path.join(ours, b)):
                got = apply(ours, op, args)
                back = apply(ours, "rename_exchange" if op == "rename_exchange" else "rename", (b, a))
                log.append(f"{step}: {op}{args} -> kernel EXDEV, ours {got}, back {back}")
                exdev += 1
                if got != ("ok", None) or back != ("ok", None):
                    mismatch = "\n".join(log[-20:])
                    break
            continue
        got = apply(ours, op, args)
        log.append(f"{step}: {op}{args} -> {want}")
        if got != want:
            mismatch = "\n".join(log[-20:]) + f"\nunionfs gave {got}"
            break

    return {"mismatch": mismatch, "exdev": exdev, "ours": snapshot_as_user(ours), "kernel": snapshot_as_user(kernel)}


if __name__ == "__main__":
    o, k, seed, steps, initial = sys.argv[1:6]
    print(json.dumps(run(o, k, int(seed), int(steps), json.loads(initial))))
