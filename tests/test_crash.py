"""Crash safety: the daemon SIGKILLed before a chosen syscall of renames, whiteouts, opaque dirs,
hard-link copy-ups and a large copy-up; and ``unionfs commit`` killed before each of its renames.
Each operation is all or nothing, the work dir is cleaned at the next mount, later operations work,
and the store has nothing half-registered. scripts/crash-test runs every crash point, and random ones."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from container_images import change_everything, ok, run, store  # noqa: F401
from crashlib import SCENARIOS, Failure, Runner, check_store_after, commit_crash, store_state
from helpers import is_mounted

BY_NAME = {s.name: s for s in SCENARIOS}


@pytest.mark.parametrize("name", ["rename-dirs", "whiteouts", "opaque", "large-copy-up", "metacopy"])
def test_kill_at_chosen_points_is_all_or_nothing(tmp_path, name):
    r = Runner(BY_NAME[name], tmp_path / name)
    r.reference()
    assert r.points > len(r.sc.steps)
    # Seven crash points spread over the scenario (the first and last included), always the same.
    points = sorted({1, r.points} | {1 + (r.points - 1) * k // 6 for k in range(1, 6)})
    outcomes = [r.crash_at(n) for n in points]
    assert outcomes[0] == (0, False)                      # before anything: the old view
    assert {step for step, _ in outcomes} != {0}          # the points reach into later steps


@pytest.mark.parametrize("name", ["hardlinks", "hardlinks-lower-names"])
def test_hard_links_keep_link_counts_at_every_point(tmp_path, name):
    """Hard links through the index: copy-up, link, unlink and rename of upper names and of names
    only in the lower layer are each all or nothing at every crash point, link counts included; and
    kernel overlayfs (index=on) accepts every crashed upper and work dir and shows the same tree."""
    r = Runner(BY_NAME[name], tmp_path / "hl")
    r.kernel_check = True
    r.reference()
    for n in range(1, r.points + 1):
        r.crash_at(n)


def test_commit_killed_before_each_rename_leaves_old_or_new(store, tmp_path):  # noqa: F811
    ok(store, "create", "app:1", "--name", "c")
    mnt = tmp_path / "m"
    mnt.mkdir()
    ok(store, "mount", "c", str(mnt))
    try:
        change_everything(mnt)
    finally:
        ok(store, "umount", str(mnt))
    assert not is_mounted(mnt)
    before = store_state(store)
    outcomes = []
    for n in range(1, 40):
        copy = tmp_path / f"store{n}"
        subprocess.run(["cp", "-a", str(store), str(copy)], check=True)
        what = commit_crash(copy, "c", "committed:1", n)
        happened = check_store_after(copy, before, "committed:1", lambda *a: ok(copy, *a))
        outcomes.append((what, happened))
        if what == "completed":
            break
        if happened:   # registered before the kill: the image must be whole and mount
            m2 = tmp_path / f"m{n}"
            m2.mkdir()
            ok(copy, "mount", "committed:1", str(m2))
            ok(copy, "umount", str(m2))
        shutil.rmtree(copy)
    assert outcomes[-1] == ("completed", True), outcomes
    assert ("killed", False) in outcomes and len(outcomes) >= 3
