"""Every syscall unionfs makes on a layer, in one place (like overlayfs's ``ovl_do_*``).

Invariant: nothing here resolves a path through a symlink inside a layer.  Every
call takes a directory fd and a *single* name component; the final component is
never followed (``O_NOFOLLOW`` / ``AT_SYMLINK_NOFOLLOW``), and intermediate
components do not exist because names never contain ``/``.  Multi-component
paths are only opened with :func:`open_beneath`, which uses ``openat2`` with
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`` or walks component by component.
It must not know layers or overlay formats: it is given fds and names.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import threading

import xattr as _xattr

log = logging.getLogger("unionfs.sys")

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
O_PATH = getattr(os, "O_PATH", 0o10000000)

AT_EMPTY_PATH = 0x1000
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_openat2 = 437  # same number on every architecture (new syscall table)
_have_openat2: bool | None = None


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _check_name(name: bytes) -> None:
    if not name or b"/" in name or name in (b".", b".."):
        raise OSError(errno.EINVAL, "invalid name component", name)


def open_beneath(dirfd: int, relpath: bytes, flags: int = O_DIR, noatime: bool = False) -> int:
    """Open ``relpath`` below ``dirfd`` without following any symlink or leaving the tree."""
    if noatime:
        return _noatime(lambda f: open_beneath(dirfd, relpath, f), flags)
    global _have_openat2
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if not relpath:
        return os.open(".", flags & ~os.O_NOFOLLOW, dir_fd=dirfd)
    if _have_openat2 is not False:
        how = _OpenHow(flags, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(_SYS_openat2, dirfd, relpath, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            _have_openat2 = True
            return fd
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM) or _have_openat2:
            raise OSError(err, os.strerror(err), relpath)
        _have_openat2 = False
    parts = [p for p in relpath.split(b"/") if p]
    fd = os.dup(dirfd)
    try:
        for i, part in enumerate(parts):
            _check_name(part)
            last = i == len(parts) - 1
            nfd = os.open(part, flags if last else O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


# --- reading --------------------------------------------------------------

def lstat_at(dirfd: int, name: bytes) -> os.stat_result:
    return os.stat(name, dir_fd=dirfd, follow_symlinks=False)


def fstat(fd: int) -> os.stat_result:
    return os.fstat(fd)


def _noatime(opener, flags: int) -> int:
    """Open with O_NOATIME, as overlayfs opens lower files and dirs: reading through the union
    leaves the layer's atime alone.  Not the owner and no CAP_FOWNER (EPERM): a plain open."""
    try:
        return opener(flags | os.O_NOATIME)
    except PermissionError:
        return opener(flags)


def open_dir_at(dirfd: int, name: bytes, noatime: bool = False) -> int:
    _check_name(name)
    if noatime:
        return _noatime(lambda f: os.open(name, f, dir_fd=dirfd), O_DIR)
    return os.open(name, O_DIR, dir_fd=dirfd)


def open_at(dirfd: int, name: bytes, flags: int, mode: int = 0o600, noatime: bool = False) -> int:
    _check_name(name)
    if noatime:
        return _noatime(lambda f: os.open(name, f | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd), flags)
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)


def readlink_at(dirfd: int, name: bytes) -> bytes:
    return os.readlink(name, dir_fd=dirfd)


def scandir(dirfd: int):
    """Entries of the directory ``dirfd`` (``os.scandir`` works on a dup, so dirfd stays usable)."""
    return os.scandir(dirfd)


def exists_at(dirfd: int, name: bytes) -> bool:
    try:
        os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def exists_beneath(dirfd: int, relpath: bytes) -> bool:
    """Does ``relpath`` exist below ``dirfd``, resolved without following any symlink?"""
    try:
        os.close(open_beneath(dirfd, relpath, O_PATH))
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink on the way: not ours to follow
            return False
        raise


def statvfs(fd: int) -> os.statvfs_result:
    return os.fstatvfs(fd)


# --- xattrs ----------------------------------------------------------------
# xattr calls on a name go through /proc/self/fd/DIRFD/NAME with the l*xattr
# variants: the directory is the one we hold open, and NAME is not followed.

def _xpath(dirfd: int, name: bytes | None) -> bytes:
    if name is None:
        return b"/proc/self/fd/%d" % dirfd
    return b"/proc/self/fd/%d/%s" % (dirfd, name)


def getxattr_at(dirfd: int, name: bytes | None, attr: str) -> bytes:
    """xattr ``attr`` of ``name`` in ``dirfd`` (of the directory itself when name is None).

    ``os.getxattr``: one syscall for a value that fits its first buffer, where the ``xattr``
    package asks the size first (two)."""
    if name is None:
        return os.getxattr(dirfd, attr)
    return os.getxattr(_xpath(dirfd, name), attr, follow_symlinks=False)


_SYS_getxattrat = 464  # Linux 6.13, the same number on every architecture
_AT_SYMLINK_NOFOLLOW = 0x100
_NO_XATTR = (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)


class _XattrArgs(ctypes.Structure):
    _fields_ = [("value", ctypes.c_uint64), ("size", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


_getxattrat = [True]   # off once the kernel says ENOSYS
_xargs = _XattrArgs(0, 0, 0)   # size 0: the value's size only, nothing copied
# A prototype of its own for this call (argument conversion in C, not a ctypes object per
# argument per call): every argument as wide as its type, as the variadic syscall(2) reads them.
_getxattrat_call = ctypes.CDLL(None, use_errno=True).syscall
_getxattrat_call.restype = ctypes.c_long
_getxattrat_call.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_char_p,
                             ctypes.c_void_p, ctypes.c_size_t)
_XARGS_PTR = ctypes.addressof(_xargs)
_XARGS_SIZE = ctypes.sizeof(_XattrArgs)
_encoded: dict[str, bytes] = {}   # xattr names asked for, encoded once


def _encode(attr: str) -> bytes:
    battr = _encoded.get(attr)
    if battr is None:
        battr = _encoded.setdefault(attr, attr.encode())
    return battr


_VALUE_MAX = 4096   # a larger value takes the path through /proc/self/fd
_buffers = threading.local()   # one value buffer per thread (copy-up and lazy fetches run in threads)


def _value_buffer() -> tuple[int, int]:
    """This thread's value buffer and the getxattrat arguments pointing at it (addresses)."""
    b = getattr(_buffers, "b", None)
    if b is None:
        buf = ctypes.create_string_buffer(_VALUE_MAX)
        args = _XattrArgs(ctypes.addressof(buf), _VALUE_MAX, 0)
        _buffers.keep = (buf, args)
        b = _buffers.b = (ctypes.addressof(buf), ctypes.addressof(args))
    return b


def has_xattr_at(dirfd: int, name: bytes, attr: str) -> bool:
    """Does ``name`` in ``dirfd`` carry ``attr``?  Asked on every lookup of a layer file, so one
    getxattrat(2), fd-relative (0.4-1.6 µs here), where the kernel has it; else one lgetxattr(2)
    through /proc/self/fd (4-5 µs)."""
    _check_name(name)
    if _getxattrat[0]:
        # Every argument as wide as its type: a variadic call passes bare ints as 32 bits.
        r = _getxattrat_call(_SYS_getxattrat, dirfd, name, _AT_SYMLINK_NOFOLLOW, _encode(attr), _XARGS_PTR,
                             _XARGS_SIZE)
        if r >= 0:
            return True
        err = ctypes.get_errno()
        if err in _NO_XATTR:
            return False
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), name)
        _getxattrat[0] = False
    try:
        os.getxattr(_xpath(dirfd, name), attr, follow_symlinks=False)
        return True
    except OSError as e:
        if e.errno in _NO_XATTR:
            return False
        raise


def getxattr_or_none(dirfd: int, name: bytes | None, attr: str) -> bytes | None:
    """xattr ``attr`` of ``name`` in ``dirfd``, None where it has none.  Asked of upper entries on
    every lookup (our metadata, redirects): one fd-relative getxattrat(2) where the kernel has it."""
    if name is not None and _getxattrat[0]:
        _check_name(name)
        value, args = _value_buffer()
        r = _getxattrat_call(_SYS_getxattrat, dirfd, name, _AT_SYMLINK_NOFOLLOW, _encode(attr), args, _XARGS_SIZE)
        if r >= 0:
            return ctypes.string_at(value, r)
        err = ctypes.get_errno()
        if err in _NO_XATTR:
            return None
        if err == errno.ENOSYS:
            _getxattrat[0] = False
        elif err != errno.ERANGE:   # ERANGE: bigger than the buffer, read below
            raise OSError(err, os.strerror(err), name)
    try:
        return getxattr_at(dirfd, name, attr)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return None
        raise


_SYS_listxattrat = 465  # Linux 6.13, as getxattrat
_AT_EMPTY_PATH = 0x1000
_listxattrat = [True]   # off once the kernel says ENOSYS
_listxattrat_call = ctypes.CDLL(None, use_errno=True).syscall
_listxattrat_call.restype = ctypes.c_long
_listxattrat_call.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_void_p,
                              ctypes.c_size_t)


def listxattr_at(dirfd: int, name: bytes | None) -> list[str]:
    """The xattr names of ``name`` in ``dirfd`` (of the directory itself when name is None).  Asked
    of every directory a lookup finds: one fd-relative listxattrat(2) where the kernel has it (the
    xattr package makes two calls, through /proc/self/fd)."""
    if _listxattrat[0]:
        if name is not None:
            _check_name(name)
        value, _ = _value_buffer()
        r = _listxattrat_call(_SYS_listxattrat, dirfd, b"" if name is None else name,
                              _AT_SYMLINK_NOFOLLOW | (_AT_EMPTY_PATH if name is None else 0), value, _VALUE_MAX)
        if r > 0:
            names = ctypes.string_at(value, r).split(b"\0")
            names.pop()
            return [n.decode("utf-8") for n in names]
        if r == 0:
            return []
        err = ctypes.get_errno()
        if err in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        if err == errno.ENOSYS:
            _listxattrat[0] = False
        elif err != errno.ERANGE:   # ERANGE: more names than the buffer holds, read below
            raise OSError(err, os.strerror(err), name)
    try:
        if name is None:   # os.listxattr: one syscall (the xattr package: two when there are any)
            return os.listxattr(dirfd)
        return os.listxattr(_xpath(dirfd, name), follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise


def setxattr_at(dirfd: int, name: bytes | None, attr: str, value: bytes, flags: int = 0) -> None:
    log.debug("setxattr %r %r %s", name, attr, value[:40])
    if name is None:
        os.setxattr(dirfd, attr, value, flags)
    else:
        os.setxattr(_xpath(dirfd, name), attr, value, flags, follow_symlinks=False)


def removexattr_at(dirfd: int, name: bytes | None, attr: str) -> None:
    log.debug("removexattr %r %r", name, attr)
    if name is None:
        _xattr.removexattr(dirfd, attr)
    else:
        _xattr.removexattr(_xpath(dirfd, name), attr, symlink=True)


# --- writing (used by the writable layer) ----------------------------------

def mkdir_at(dirfd: int, name: bytes, mode: int) -> None:
    _check_name(name)
    log.debug("mkdir %r %o", name, mode)
    os.mkdir(name, mode, dir_fd=dirfd)


def mknod_at(dirfd: int, name: bytes, mode: int, rdev: int = 0) -> None:
    _check_name(name)
    log.debug("mknod %r %o %d", name, mode, rdev)
    os.mknod(name, mode, rdev, dir_fd=dirfd)


def symlink_at(target: bytes, dirfd: int, name: bytes) -> None:
    _check_name(name)
    log.debug("symlink %r -> %r", name, target)
    os.symlink(target, name, dir_fd=dirfd)


def link_at(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes) -> None:
    _check_name(oldname)
    _check_name(newname)
    log.debug("link %r -> %r", oldname, newname)
    os.link(oldname, newname, src_dir_fd=olddirfd, dst_dir_fd=newdirfd, follow_symlinks=False)


O_TMPFILE = getattr(os, "O_TMPFILE", 0o20000000 | os.O_DIRECTORY)


def open_tmpfile(dirfd: int, mode: int = 0o600) -> int | None:
    """A new regular file with no name yet, in directory ``dirfd`` (O_TMPFILE, as overlayfs's
    copy-up makes it): a crash before :func:`link_tmpfile` leaves nothing behind.  None where the
    filesystem cannot (EOPNOTSUPP, EISDIR on kernels without it): the caller uses a named temp."""
    try:
        return os.open(".", O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode, dir_fd=dirfd)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            return None
        raise


def link_tmpfile(fd: int, newdirfd: int, newname: bytes) -> None:
    """Give the O_TMPFILE file ``fd`` its name (EEXIST if taken, as RENAME_NOREPLACE).  Through
    /proc/self/fd, which needs no CAP_DAC_READ_SEARCH (AT_EMPTY_PATH would): the magic link is our
    own fd, not a path of a layer."""
    _check_name(newname)
    log.debug("link tmpfile -> %r", newname)
    os.link(b"/proc/self/fd/%d" % fd, newname, dst_dir_fd=newdirfd, follow_symlinks=True)


def unlink_at(dirfd: int, name: bytes) -> None:
    _check_name(name)
    log.debug("unlink %r", name)
    os.unlink(name, dir_fd=dirfd)


def rmdir_at(dirfd: int, name: bytes) -> None:
    _check_name(name)
    log.debug("rmdir %r", name)
    os.rmdir(name, dir_fd=dirfd)


def rename_at(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int = 0) -> None:
    """renameat2(2); flags are RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT."""
    _check_name(oldname)
    _check_name(newname)
    log.debug("rename %r -> %r flags=%d", oldname, newname, flags)
    if flags == 0:
        os.rename(oldname, newname, src_dir_fd=olddirfd, dst_dir_fd=newdirfd)
        return
    r = _libc.renameat2(olddirfd, oldname, newdirfd, newname, ctypes.c_uint(flags))
    if r != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), oldname)


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]  # MAX_HANDLE_SZ


_FS_IOC_GETFSUUID = 0x80111500  # _IOR(0x15, 0, struct fsuuid2 {u8 len; u8 uuid[16]}), Linux >= 6.5


def name_to_handle_at(dirfd: int, name: bytes) -> tuple[int, bytes]:
    """The file handle of ``name`` in ``dirfd`` (not followed if a symlink): (type, bytes).

    What overlayfs keeps in ``overlay.origin`` and names index entries after (``exportfs_encode_fh``
    with no parent: the same handle as ``name_to_handle_at`` with flags 0).
    """
    _check_name(name)
    fh = _FileHandle(handle_bytes=128)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(dirfd, name, ctypes.byref(fh), ctypes.byref(mount_id), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name)
    return fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes])


def open_by_handle_at(mount_fd: int, handle_type: int, handle: bytes, flags: int = O_PATH) -> int:
    """Open a file by its handle on the filesystem of ``mount_fd`` (needs CAP_DAC_READ_SEARCH)."""
    fh = _FileHandle(handle_bytes=len(handle), handle_type=handle_type)
    ctypes.memmove(fh.f_handle, handle, len(handle))
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(fh), flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def fs_uuid(fd: int) -> bytes:
    """The uuid of the filesystem holding ``fd`` (the kernel's ``s_uuid``, which overlayfs puts in
    its file handles); 16 zero bytes where the filesystem has none or the kernel cannot say."""
    buf = bytearray(17)
    try:
        fcntl.ioctl(fd, _FS_IOC_GETFSUUID, buf)
    except OSError as e:
        log.debug("FS_IOC_GETFSUUID: %s", e)
        return bytes(16)
    return bytes(buf[1:1 + min(buf[0], 16)]).ljust(16, b"\0")


def fchmod(fd: int, mode: int) -> None:
    os.fchmod(fd, mode)


_SYS_fchmodat2 = 452   # Linux 6.6, the same number on every architecture
_fchmodat2 = [True]    # off once the kernel says ENOSYS


def chmod_at(dirfd: int, name: bytes, mode: int) -> None:
    """chmod a name that is not a symlink (checked by the caller), never following one: one
    fchmodat2(2) with AT_SYMLINK_NOFOLLOW where the kernel has it, else open it O_PATH first."""
    _check_name(name)
    if _fchmodat2[0]:
        r = _libc.syscall(ctypes.c_long(_SYS_fchmodat2), ctypes.c_int(dirfd), name, ctypes.c_uint(mode),
                          ctypes.c_uint(_AT_SYMLINK_NOFOLLOW))
        if r == 0:
            return
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), name)
        _fchmodat2[0] = False
    fd = open_at(dirfd, name, O_PATH)
    try:
        os.chmod(b"/proc/self/fd/%d" % fd, mode)
    finally:
        os.close(fd)


def chown_at(dirfd: int, name: bytes, uid: int, gid: int) -> None:
    os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)


def utime_at(dirfd: int, name: bytes, ns: tuple[int, int]) -> None:
    os.utime(name, ns=ns, dir_fd=dirfd, follow_symlinks=False)


def fsync(fd: int, datasync: bool = False) -> None:
    (os.fdatasync if datasync else os.fsync)(fd)


_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_CHUNK = 4 << 20


def start_writeback(fd: int, off: int, length: int) -> None:
    """Start writing ``length`` bytes at ``off`` to the disk, without waiting (sync_file_range(2)
    SYNC_FILE_RANGE_WRITE): the disk writes one chunk of a copy while the next is copied, so the
    fsync at the end waits for the last chunk only.  A hint: no durability by itself."""
    if _libc.sync_file_range(fd, off, length, _SYNC_FILE_RANGE_WRITE) != 0:
        log.debug("sync_file_range: %s", os.strerror(ctypes.get_errno()))


def copy_data(src: int, dst: int, length: int, sparse: bool = True, writeback: bool = False) -> None:
    """Copy the first ``length`` bytes of ``src`` into the empty ``dst`` kernel-side (reflink where
    the filesystem can), never through Python; holes stay holes (SEEK_DATA/SEEK_HOLE), so a sparse
    file's copy is as sparse, as overlayfs's copy-up keeps it.  ``sparse`` False (the caller saw
    ``st_blocks * 512 >= length``: no room for a hole): no probing, one copy_file_range(2) for it
    all (the kernel copies up to 2 GiB in one call), no ftruncate unless the file came up short.
    ``writeback`` (an fsync follows): copied in chunks of WRITEBACK_CHUNK, each one's write-out
    started as soon as it is copied (:func:`start_writeback`); 64 MiB here: copy and fdatasync
    41 ms in one piece, 25 ms in chunks."""
    if not sparse:
        if _copy_range(src, dst, 0, length, writeback) < length:
            os.ftruncate(dst, length)
        return
    off = 0
    while off < length:
        try:
            data = os.lseek(src, off, os.SEEK_DATA)
            hole = os.lseek(src, data, os.SEEK_HOLE)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break   # nothing but a hole up to the end
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data, hole = off, length   # no SEEK_DATA here: all of it is data
        if data >= length:
            break
        _copy_range(src, dst, data, min(hole, length) - data, writeback)
        off = hole
    os.ftruncate(dst, length)   # a hole at the end


def _copy_range(src: int, dst: int, off: int, length: int, writeback: bool = False) -> int:
    """Copy ``length`` bytes at ``off``; the offset reached (short if ``src`` ends before).
    ``writeback``: in chunks, each one's write-out started at once (see copy_data)."""
    end = off + length
    while off < end:
        want = min(end - off, WRITEBACK_CHUNK) if writeback else end - off
        try:
            n = os.copy_file_range(src, dst, want, off, off)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            n = _copy_pread(src, dst, off, want)
        if n == 0:
            break
        if writeback and want < end - off:   # not the last chunk: the fsync waits for that one
            start_writeback(dst, off, n)
        off += n
    return off


def _copy_pread(src: int, dst: int, off: int, length: int) -> int:
    buf = os.pread(src, min(length, 1 << 20), off)
    if buf:
        os.pwrite(dst, buf, off)
    return len(buf)


# --- image extraction (unionfs.image.extract; also uses fchown, futimens, remove_tree_at below) ---

def fsetxattr(fd: int, attr: str, value: bytes) -> None:
    """Set an xattr on an fd we opened ourselves (O_NOFOLLOW), so nothing is resolved by path."""
    _xattr.setxattr(fd, attr, value)


def fchown(fd: int, uid: int, gid: int) -> None:
    os.chown(fd, uid, gid)


def futimens(fd: int, ns: tuple[int, int]) -> None:
    os.utime(fd, ns=ns)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_UTIME_OMIT = (1 << 30) - 2


_futimens = ctypes.CDLL(None, use_errno=True).futimens
_futimens.restype = ctypes.c_int
_futimens.argtypes = (ctypes.c_int, ctypes.c_void_p)


def set_mtime(fd: int, mtime_ns: int) -> None:
    """futimens of the mtime alone (the atime left as it is: UTIME_OMIT); under the writeback cache
    once per WRITE, so through a prototype and a per-thread pair of timespecs."""
    times = getattr(_buffers, "times", None)
    if times is None:
        times = _buffers.times = (_Timespec * 2)((0, _UTIME_OMIT), (0, 0))
    m = times[1]
    m.tv_sec, m.tv_nsec = divmod(mtime_ns, 1_000_000_000)
    if _futimens(fd, times) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def ftruncate(fd: int, size: int) -> None:
    os.ftruncate(fd, size)


def pwrite(fd: int, data: bytes, off: int) -> int:
    return os.pwrite(fd, data, off)


def remove_tree_at(dirfd: int, name: bytes) -> None:
    """Remove ``name`` below ``dirfd`` recursively, never following a symlink (for work-dir cleanup)."""
    try:
        st = lstat_at(dirfd, name)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        unlink_at(dirfd, name)
        return
    fd = open_dir_at(dirfd, name)
    try:
        with os.scandir(fd) as it:
            names = [os.fsencode(e.name) for e in it]
        for child in names:
            remove_tree_at(fd, child)
    finally:
        os.close(fd)
    rmdir_at(dirfd, name)
