"""Concurrency, short (scripts/stress is the long one): processes reading, writing, renaming, unlinking and
creating in shared dirs end with the tree their logs imply; readers during a big copy-up get right answers."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import stress  # noqa: E402


def test_stress_short(tmp_path):
    fig = stress.run(tmp_path / "s", procs=4, seconds=8, seed=5)
    assert fig["problems"] == []
    assert fig["ops"] > 500 and fig["unexpected_errors"] == 0
    assert fig["shared_entries"] > stress.SHARED * stress.LOWER_SHARED / 2


def test_readers_during_a_big_copy_up(tmp_path):
    """The trio loop is one thread: readers wait while the copy-up runs (measured by scripts/stress
    --copyup-probe), but every answer is right and nothing fails."""
    fig = stress.copyup_probe(tmp_path / "p", size_mib=128)
    assert fig["bad_reads"] == 0 and fig["errors"] == [] and fig["reads"] > 10
