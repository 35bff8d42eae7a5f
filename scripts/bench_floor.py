"""The benchmark's floor: a minimal pyfuse3 passthrough of one directory, doing no union work.

scripts/bench mounts kernel overlayfs over the same stack and serves its merged dir through
this daemon, so every request costs pyfuse3 and trio plus one syscall on the kernel's merged
view, and nothing of ours: what unionfs costs above this is ours to cut, what this costs is
pyfuse3's.  Same stack as unionfs (pyfuse3 on trio), long timeouts, replies straight from
``lstat``.  Not for any other use: it follows no policy on symlinks or owners (it runs as root
over a directory the benchmark made).

    bench_floor.py SOURCE MOUNTPOINT [FUSE_OPTION ...]    (foreground; SIGTERM or umount ends it)
    scripts/floor-mount-program -o OPTS MOUNTPOINT         (podman's mount_program, over kernel overlayfs:
                                                            scripts/bench --tools --baseline it)
"""
from __future__ import annotations

import errno
import os
import signal
import sys

import pyfuse3
import trio

TIMEOUT = 86400.0


class Passthrough(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, source: str) -> None:
        super().__init__()
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self.root_ino = os.lstat(source).st_ino
        self.dirs: dict[int, tuple[str, list | None]] = {}   # dir handle -> (path, listing read at first readdir)
        self.next_dh = 1

    # --- names and attributes ------------------------------------------------------------

    def _ino(self, st_ino: int) -> int:
        return pyfuse3.ROOT_INODE if st_ino == self.root_ino else st_ino

    def _entry(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = self._ino(st.st_ino)
        e.generation = 0
        e.entry_timeout = e.attr_timeout = TIMEOUT
        e.st_mode, e.st_nlink, e.st_uid, e.st_gid = st.st_mode, st.st_nlink, st.st_uid, st.st_gid
        e.st_rdev, e.st_size, e.st_blksize, e.st_blocks = st.st_rdev, st.st_size, st.st_blksize, st.st_blocks
        e.st_atime_ns, e.st_mtime_ns, e.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return e

    def _path(self, inode: int) -> str:
        try:
            return self.paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _stat_entry(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        ino = self._ino(st.st_ino)
        if ino != pyfuse3.ROOT_INODE:
            self.paths[ino] = path
        return self._entry(st)

    async def lookup(self, parent_inode, name, ctx=None):
        if name == b".":
            return self._stat_entry(self._path(parent_inode))
        if name == b"..":
            return self._stat_entry(os.path.dirname(self._path(parent_inode)))
        try:
            return self._stat_entry(self._child(parent_inode, name))
        except pyfuse3.FUSEError as e:
            if e.errno == errno.ENOENT:   # a negative entry the kernel keeps
                neg = pyfuse3.EntryAttributes()
                neg.st_ino = 0
                neg.entry_timeout = TIMEOUT
                return neg
            raise

    async def forget(self, inode_list):
        pass   # paths stay known: the floor keeps no lookup counts

    async def getattr(self, inode, ctx=None):
        return self._stat_entry(self._path(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self._path(inode)
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, attr.st_mode, follow_symlinks=False)
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1,
                         follow_symlinks=False)
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                         follow_symlinks=False)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        return self._stat_entry(path)

    async def readlink(self, inode, ctx):
        return os.fsencode(os.readlink(self._path(inode)))

    # --- directories -------------------------------------------------------------------------

    async def opendir(self, inode, ctx):
        dh, self.next_dh = self.next_dh, self.next_dh + 1
        self.dirs[dh] = (self._path(inode), None)
        return dh

    async def readdir(self, fh, start_id, token):
        path, entries = self.dirs[fh]
        if entries is None:
            entries = os.listdir(path)
            self.dirs[fh] = (path, entries)
        for i in range(start_id, len(entries)):
            name = entries[i]
            try:
                st = os.lstat(os.path.join(path, name))
            except OSError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(st), i + 1):
                return
            ino = self._ino(st.st_ino)
            if ino != pyfuse3.ROOT_INODE:
                self.paths[ino] = os.path.join(path, name)

    async def releasedir(self, fh):
        del self.dirs[fh]

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        self._do(os.mkdir, path, mode)
        return self._stat_entry(path)

    async def rmdir(self, parent_inode, name, ctx):
        self._do(os.rmdir, self._child(parent_inode, name))

    async def unlink(self, parent_inode, name, ctx):
        self._do(os.unlink, self._child(parent_inode, name))

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
        self._do(os.rename, old, new)
        st = os.lstat(new)
        self.paths[self._ino(st.st_ino)] = new

    async def symlink(self, parent_inode, name, target, ctx):
        path = self._child(parent_inode, name)
        self._do(os.symlink, os.fsdecode(target), path)
        return self._stat_entry(path)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        path = self._child(new_parent_inode, new_name)
        self._do(os.link, self._path(inode), path, follow_symlinks=False)
        return self._stat_entry(path)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        path = self._child(parent_inode, name)
        self._do(os.mknod, path, mode, rdev)
        return self._stat_entry(path)

    # --- files ---------------------------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        fd = self._do(os.open, self._path(inode), flags & ~os.O_CREAT | os.O_NOFOLLOW)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        fd = self._do(os.open, path, flags | os.O_CREAT | os.O_NOFOLLOW, mode)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self._stat_entry(path)

    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        self._do(os.fdatasync if datasync else os.fsync, fh)

    async def release(self, fh):
        os.close(fh)

    async def statfs(self, ctx):
        s = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        r = pyfuse3.StatvfsData()
        for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                  "f_namemax"):
            setattr(r, k, getattr(s, k))
        return r

    # --- xattrs: answered at once (the benchmark's workloads ask for none that exist) --------

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode, ctx):
        return []

    @staticmethod
    def _do(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None


def mount_program(argv: list[str]) -> int:
    """As podman's ``mount_program`` (``-o lowerdir=…,upperdir=…,workdir=… MNT``): kernel overlayfs
    with those options under a private directory, served on MNT by this floor in the background;
    back once MNT is mounted.  The overlay goes when the floor exits (podman unmounted MNT)."""
    import subprocess
    import tempfile
    import time
    mountpoint = os.path.realpath(argv[-1])
    opts = ",".join(argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-o")
    under = tempfile.mkdtemp(prefix="floor-under-", dir="/var/tmp")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, under], check=True)   # podman's cwd
    floor = subprocess.Popen(
        ["sh", "-c", '"$0" "$1" "$2" "$3"; umount -l "$2"; rmdir "$2"', sys.executable, __file__, under, mountpoint],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(3000):
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == mountpoint for line in f):
                return 0
        if floor.poll() is not None:
            return 1
        time.sleep(0.005)
    return 1


def main() -> int:
    if sys.argv[1:2] == ["--mount-program"]:
        return mount_program(sys.argv[2:])
    source, mountpoint, *options = sys.argv[1:]
    ops = Passthrough(os.path.realpath(source))
    os.umask(0)
    pyfuse3.init(ops, mountpoint, {"fsname=floor", "default_permissions", "allow_other", *options})

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return
            nursery.start_soon(on_signals)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
