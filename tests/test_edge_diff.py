"""Edge cases of pjdfstest and unionmount-testsuite, each result compared with kernel overlayfs
(``index=on,redirect_dir=on``) over the same lower layer: 255/256-byte names, paths past PATH_MAX,
open flags, permissions as other users, times and link counts, rename in every combination."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import edgecases as ec
from helpers import diff_snapshots, mkdirs, overlay_mount, snapshot

KO_OPTS = "index=on,redirect_dir=on"

# Where we differ on purpose (README, "Where we differ from kernel overlayfs"): label -> our outcome.
KNOWN = {
    # pyfuse3 has no tmpfile handler: the kernel answers EOPNOTSUPP for us.
    "open(dir, O_TMPFILE|O_RDWR)": ("err", errno.errorcode[errno.EOPNOTSUPP]),
}

CATEGORIES = {
    "names": (ec.names_lower, ec.name_cases),
    "deep paths": (ec.deep_lower, ec.deep_cases),
    "open flags": (ec.open_lower, ec.open_cases),
    "permissions": (ec.perm_lower, ec.perm_cases),
    "times and link counts": (ec.times_lower, ec.times_cases),
    "rename": (ec.rename_lower, ec.rename_cases),
}


def _open_dirs_to_others(tmp_path: Path) -> None:
    for p in (tmp_path, *tmp_path.parents):  # pytest's temp dirs are private: let other uids through
        if p in (Path("/tmp"), Path("/")):
            break
        os.chmod(p, 0o755)


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_edge_cases_match_kernel(tmp_path, union_mount, category):
    build, cases = CATEGORIES[category]
    _open_dirs_to_others(tmp_path)
    lower, up_k, wk_k, up_u, wk_u, ko, ko2, wk2 = mkdirs(
        tmp_path, "lower", "up_k", "wk_k", "up_u", "wk_u", "ko", "ko2", "wk2")
    os.chmod(lower, 0o755)
    build(lower)
    with overlay_mount(ko, [lower], up_k, wk_k, KO_OPTS):
        m = union_mount([lower], up_u, wk_u, options=["allow_other"])
        pair = ec.Pair(ko, m.mnt)
        cases(pair)
        known = [d for d in pair.diffs if d.split(": kernel ")[0] in KNOWN and
                 d.endswith(f"unionfs {KNOWN[d.split(': kernel ')[0]]!r}")]
        pair.diffs = [d for d in pair.diffs if d not in known]
        print(f"{category}: {pair.count} results compared, {len(known)} known differences")
        pair.check()
        theirs = snapshot(ko, skip_unstatable=True)
        assert diff_snapshots(snapshot(m.mnt), theirs) == []
        m.stop()
    # Kernel overlayfs over the upper dir we wrote shows the same tree (hard links aside: our index).
    with overlay_mount(ko2, [lower], up_u, wk2, "redirect_dir=on,index=off"):
        over_ours = snapshot(ko2, skip_unstatable=True)
    skip = {n for snap in (over_ours, theirs) for g in snap["<hardlinks>"] for n in g} | {"<hardlinks>"}

    def clean(snap):
        return {k: v[:6] + (None,) + ({x: y for x, y in v[7].items() if not x.startswith("trusted.unionfs.")},)
                for k, v in snap.items() if k not in skip}
    assert diff_snapshots(clean(over_ours), clean(theirs)) == []
