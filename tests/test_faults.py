"""Faults: an exception inside a handler, and a daemon killed in the middle of a copy-up."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import force_unmount, is_mounted
from stacks import write

# The daemon, with Union.attr_from_stat (what lookup and getattr build attributes with) broken
# for one name: the injected fault.
FAULTY_DAEMON = """
import sys
from unionfs.fs import union
real = union.Union.attr_from_stat
def attr_from_stat(self, node, st):
    if node.name == b"poison":
        raise RuntimeError("injected fault")
    return real(self, node, st)
union.Union.attr_from_stat = attr_from_stat
from unionfs.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _wait(mnt, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while not is_mounted(mnt):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_handler_exception_is_eio_and_the_mount_keeps_serving(tmp_path):
    lower, mnt, log = tmp_path / "lower", tmp_path / "mnt", tmp_path / "log"
    lower.mkdir()
    mnt.mkdir()
    write(lower, "poison", b"x")
    write(lower, "fine", b"still here")
    proc = subprocess.Popen([sys.executable, "-c", FAULTY_DAEMON, "mount", "-f", "--log", str(log),
                             "--lower", str(lower), str(mnt)], stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        _wait(mnt, proc)
        with pytest.raises(OSError) as e:
            os.stat(mnt / "poison")
        assert e.value.errno == errno.EIO
        assert (mnt / "fine").read_bytes() == b"still here"     # the daemon survived
        assert proc.poll() is None
        text = log.read_text()
        assert "internal error in lookup" in text and "injected fault" in text  # logged with context
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        proc.wait(timeout=20)
        if is_mounted(mnt):
            force_unmount(mnt)


def test_kill_during_copy_up_leaves_old_or_new(tmp_path):
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    data = os.urandom(1 << 20) * 400  # 400 MiB: the copy-up takes a while
    (lower / "big").write_bytes(data)
    cmd = [sys.executable, "-m", "unionfs", "mount", "-f", "--log", str(tmp_path / "log"), "--lower", str(lower),
           "--upper", str(upper), "--work", str(work), str(mnt)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        _wait(mnt, proc)
        writer = subprocess.Popen([sys.executable, "-c", f"open({str(mnt / 'big')!r}, 'ab').write(b'!')"],
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not os.listdir(work / "work") and time.monotonic() < deadline:
            time.sleep(0.005)   # the copy-up has started in the work dir
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=20)
        writer.wait(timeout=20)
    finally:
        if is_mounted(mnt):
            force_unmount(mnt)
    assert not (upper / "big").exists() or (upper / "big").stat().st_size == len(data) + 1
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        _wait(mnt, proc)
        assert os.listdir(work / "work") == []                  # leftovers cleaned at mount
        seen = (mnt / "big").read_bytes()
        assert seen in (data, data + b"!")                      # the old view or the new one
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        proc.wait(timeout=20)
        if is_mounted(mnt):
            force_unmount(mnt)


# --- many handlers, many exception types -------------------------------------------------

FAULTS = [
    # (target, exception, trigger word)
    ("unionfs.fs.union:Union.list_names", "RuntimeError", "brokendir"),          # readdir
    ("unionfs.fs.union:Union.lookup_attr", "KeyError", "badentry"),              # lookup, and readdir mid-way
    ("unionfs.fs.writable:WritableUnion.write", "AssertionError", "poison"),     # write (the data)
    ("unionfs.fs.writable:WritableUnion.create", "MemoryError", "newpoison"),    # create
    ("unionfs.fs.writable:WritableUnion.rename", "RecursionError", "renpoison"),  # rename
    ("unionfs.fs.writable:WritableUnion.setattr", "ZeroDivisionError", "attrpoison"),  # setattr
    ("unionfs.fs.writable:WritableUnion.unlink", "TypeError", "unlpoison"),      # unlink
    ("unionfs.fs.copyup:copy_xattrs", "RuntimeError", "cupoison"),               # half-way through a copy-up
    ("unionfs.fs.inodes:InodeTable.forget", "KeyError", "always"),               # forget (no answer possible)
]


def _eio(fn, *args):
    with pytest.raises(OSError) as e:
        fn(*args)
    assert e.value.errno == errno.EIO, (fn, args, e.value)


def test_faults_in_every_kind_of_handler_are_eio_logged_and_survived(tmp_path):
    from inject import InjectedMount
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
    write(lower, "brokendir/f", b"1")
    for n in ("a", "badentry", "z"):
        write(lower, f"mixed/{n}", n.encode())
    write(lower, "renpoison", b"r")
    write(lower, "attrpoison", b"s")
    write(lower, "unlpoison", b"u")
    write(lower, "cupoison", b"lower data")
    write(lower, "fine", b"still here")
    spec = {"faults": [{"target": t, "exc": e, "when": w} for t, e, w in FAULTS]}
    # Write-through, so that each write(2) is one WRITE request and its fault reaches that call
    # (with the writeback cache it would reach the close).
    m = InjectedMount(mnt, [lower], upper, work, options=["writeback=0"], log=tmp_path / "log", spec=spec)
    m.start()
    try:
        _eio(os.listdir, mnt / "brokendir")
        _eio(os.stat, mnt / "mixed" / "badentry")
        (mnt / "mixed2").mkdir()          # readdir whose entries fail half-way: a listing is never cached broken
        _eio(os.listdir, mnt / "mixed")
        with open(mnt / "w", "wb", buffering=0) as f:
            f.write(b"good")
            _eio(f.write, b"poison pill")
            f.write(b" again")
        assert (mnt / "w").read_bytes() == b"good again"
        _eio(open, mnt / "newpoison", "wb")
        _eio(os.rename, mnt / "renpoison", mnt / "elsewhere")
        _eio(os.chmod, mnt / "attrpoison", 0o600)
        _eio(os.unlink, mnt / "unlpoison")
        _eio(open, mnt / "cupoison", "ab")
        # forget: unlinking files makes the kernel drop their inodes and send FORGET
        for i in range(20):
            (mnt / f"tmp{i}").write_bytes(b"x")
            os.unlink(mnt / f"tmp{i}")
        deadline = time.monotonic() + 10
        while "internal error in forget" not in m.log.read_text() and time.monotonic() < deadline:
            os.listdir(mnt)
            time.sleep(0.05)
        # Everything answered, nothing crashed: the daemon serves on, and sees what it saw before.
        assert m.proc.poll() is None
        assert (mnt / "fine").read_bytes() == b"still here"
        assert (mnt / "cupoison").read_bytes() == b"lower data"
        assert sorted(os.listdir(mnt / "mixed2")) == []
        assert (mnt / "renpoison").exists() and not (mnt / "elsewhere").exists()
        assert oct((mnt / "attrpoison").stat().st_mode & 0o777) == oct(0o644)
        assert (mnt / "unlpoison").exists() and not (mnt / "newpoison").exists()
        (mnt / "after").write_bytes(b"ok")
        assert (mnt / "after").read_bytes() == b"ok"
        text = m.log.read_text()
        for handler in ("readdir", "lookup", "write", "create", "rename", "setattr", "unlink", "open"):
            assert f"internal error in {handler}(" in text, handler
        assert "internal error in forget" in text
        for _, exc, _ in FAULTS:
            assert f"{exc}: injected fault" in text or f"{exc}: 'injected fault" in text, exc
    finally:
        m.stop()
    # The failed copy-up left nothing: no upper copy, a clean work dir.
    assert not (upper / "cupoison").exists()
    assert os.listdir(work / "work") == []
    assert (lower / "cupoison").read_bytes() == b"lower data"


def test_every_handler_is_guarded():
    """Every request handler of Operations turns unexpected exceptions into EIO (pyfuse3 would end its
    loop on them): the async ones are wrapped by _guard, forget (sync, no answer) catches everything."""
    import inspect

    import pyfuse3
    import trio

    from unionfs.fuse import operations
    handlers = [n for n, f in vars(pyfuse3.Operations).items() if inspect.iscoroutinefunction(f)]
    assert len(handlers) > 20
    unguarded = []
    for name in handlers:
        impl = getattr(operations.Operations, name)
        if impl is getattr(pyfuse3.Operations, name):
            continue  # pyfuse3's own default: raises FUSEError(ENOSYS)
        if getattr(impl, "__wrapped__", None) is None:
            unguarded.append(name)
    # flush is not wrapped: its whole body is one FUSEError. forget is a plain function (pyfuse3 awaits
    # only what is awaitable) that catches everything itself. Check both, rather than trust them.
    assert sorted(unguarded) == ["flush", "forget"], unguarded
    assert not inspect.iscoroutinefunction(operations.Operations.forget)
    with pytest.raises(pyfuse3.FUSEError):
        trio.run(operations.Operations.flush, object(), 1)

    class Broken:
        def __getattr__(self, name):
            raise MemoryError("broken " + name)

    ops = operations.Operations.__new__(operations.Operations)
    ops.inodes = Broken()
    ops.forget([(5, 1)])  # logged, never raised

    class Union:
        changed, dirty_dirs = set(), set()
        readonly = False

        def __getattr__(self, name):
            raise AssertionError("broken " + name)
    ops.union = Union()
    ops.inodes = Broken()
    for name in ("getattr", "lookup", "readdir", "write", "unlink"):
        args = {"getattr": (2, None), "lookup": (1, b"x", None), "readdir": (1, 0, None),
                "write": (1, 0, b"x"), "unlink": (1, b"x", None)}[name]
        with pytest.raises(pyfuse3.FUSEError) as e:
            trio.run(getattr(ops, name), *args)
        assert e.value.errno == errno.EIO, name
