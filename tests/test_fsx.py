"""The file exerciser (scripts/fsx.py), short: a few thousand random reads, writes, truncates, mmap reads and
writes, posix_fallocate/fallocate, fsyncs and reopens on files that start in a lower layer, with remounts."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import fsx  # noqa: E402


@pytest.mark.parametrize("seed", [1, 2])
def test_fsx_short(tmp_path, seed):
    f = fsx.run(ops=2500, seed=seed, files=3, maxlen=128 * 1024, remount_every=1000, full_every=100,
                base=tmp_path / "fsx")
    assert f.ops == 2500 and f.mismatches == 0
    assert f.counts["remounts"] == 2
    for kind in ("read", "write", "mapread", "mapwrite", "truncate", "ftruncate", "posix_fallocate", "reopen"):
        assert f.counts[kind] > 20, (kind, f.counts)
    assert f.counts["fallocate EOPNOTSUPP"] == f.counts["fallocate"]   # pyfuse3 has no fallocate handler


def test_fsx_notices_a_difference(tmp_path):
    """The checker is not blind: a byte changed behind its back in the upper dir is a mismatch."""
    f = fsx.Fsx(tmp_path / "fsx", seed=3, files=1, maxlen=4096)
    try:
        f.mount()
        while f.ops < 50:
            f.op()
        f.model["file0"][:1] = b"\x00" if f.model["file0"][:1] != b"\x00" else b"\x01"
        if len(f.model["file0"]) == 0:
            f.model["file0"].extend(b"x")
        with pytest.raises(fsx.Mismatch):
            f.check_all()
    finally:
        f.unmount()
