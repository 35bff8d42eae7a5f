"""Directory operations of the writable layer: new entries, removal, rename (overlayfs's ``dir.c``).

Owns the namespace rules: a whiteout where a lower name is removed, an opaque
directory made over one, ``overlay.redirect`` when a directory with lower
parts is renamed, each change built in the work dir and swapped in with one
``renameat2``.  It is mixed into :class:`~unionfs.fs.writable.WritableUnion`
(``self`` is that union: its copy-up, its upper layer and its node lookups);
it must not read or write file data or attributes (``writable``) nor know FUSE.
"""
from __future__ import annotations

import errno
import os
import stat

from . import formats, metacopy
from . import sys as ovl
from .inodes import Node


class DirOps:
    # --- new entries ---------------------------------------------------------------

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Node:
        return self._make(parent, name, mode, uid, gid, rdev=rdev)[0]

    def mkdir(self, parent: Node, name: bytes, mode: int, uid: int, gid: int) -> Node:
        return self._make(parent, name, stat.S_IFDIR | stat.S_IMODE(mode), uid, gid)[0]

    def symlink(self, parent: Node, name: bytes, target: bytes, uid: int, gid: int) -> Node:
        return self._make(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)[0]

    def _check_new(self, parent: Node, name: bytes) -> tuple[bool, bool]:
        """Refuse a name that exists; say whether a whiteout holds it and whether lower layers do."""
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if len(name) > 255:
            raise OSError(errno.ENAMETOOLONG, "name too long")
        if formats.is_oci_marker(name):
            # `.wh.` names are whiteouts in image layers: such a file could never be committed.
            raise OSError(errno.EINVAL, "names starting with .wh. are reserved for whiteouts")
        upper = self._upper_entry(parent, name) if self.in_upper(parent) else None
        if upper is not None:
            if not formats.is_whiteout_at(self.stack.dir_fd(0, parent), name, upper):
                raise OSError(errno.EEXIST, "file exists")
            return True, True
        if self.lower_exists(parent, name):
            raise OSError(errno.EEXIST, "file exists")
        return False, False

    def _make(self, parent: Node, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
              target: bytes | None = None, keep_open: int | None = None) -> tuple[Node, int | None]:
        """Create an entry in the upper layer. With ``keep_open`` (flags), a regular file's fd is returned."""
        over_whiteout, _ = self._check_new(parent, name)
        self.dirty_dirs.add(parent.ino)
        self.copy_up.dir_chain(parent)
        pfd = self.stack.dir_fd(0, parent)
        uid, gid, sgid_parent = self._owner(parent, uid, gid)
        kind = stat.S_IFMT(mode)
        perm = stat.S_IMODE(mode)
        if kind == stat.S_IFDIR and sgid_parent:
            perm |= stat.S_ISGID
        # A directory where a lower one was removed is opaque (the whiteout says so).
        opaque = kind == stat.S_IFDIR and over_whiteout
        override = None
        if self.override is not None and kind == stat.S_IFLNK and self._euid != 0:
            uid, gid = self._euid, self._egid   # no record can go on a symlink: the user's own (shows as root's)
        elif self.override is not None:
            # xattr_permissions: the owner, mode and type are recorded; a user's entry is the user's
            # own, read-write for the user, a device or fifo a regular file (formats.stored_kind).
            override = formats.Override(uid, gid, perm, kind, rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0)
            if self._euid != 0:
                uid, gid = self._euid, self._egid
                kind, rdev = formats.stored_kind(kind), 0
                perm = formats.stored_perm(kind, perm)
        if override is not None:
            fd, st = self._make_in_work_dir(pfd, name, kind, perm, uid, gid, rdev, target, opaque,
                                            override.encode())
        elif not over_whiteout and uid == self._euid and (gid == self._egid or sgid_parent):
            # Created by the daemon's own user (root in a container), the entry has its owner and
            # mode from the creating syscall itself, as overlayfs creates in place: atomic as is.
            fd, st = self._make_in_place(pfd, name, kind, perm, rdev, target)
        else:
            fd, st = self._make_in_work_dir(pfd, name, kind, perm, uid, gid, rdev, target, opaque)
        if fd is not None and keep_open is None:
            os.close(fd)
            fd = None
        # Nothing of this name exists below (checked above), so the new entry is all there is.
        self.upper.unmarked.pop((st.st_dev, st.st_ino), None)  # a number reused: not a copy-up's any more
        node = Node(self.inodes.ino_for(st.st_dev, st.st_ino), parent, name, (0,), st.st_mode)
        old = self.inodes.find(node.ino)
        if old is not None:
            # The upper filesystem reused the number of a removed entry the kernel has not
            # forgotten yet.
            self.inodes.reuse(old, parent, name)
        node = self.inodes.remember(node)
        self.forget_xattrs(node)   # names kept for a removed object of that number are not its own
        return node, fd

    @staticmethod
    def _make_in_place(pfd: int, name: bytes, kind: int, perm: int, rdev: int,
                       target: bytes | None) -> tuple[int | None, os.stat_result]:
        fd: int | None = None
        if kind == stat.S_IFDIR:
            ovl.mkdir_at(pfd, name, perm)
        elif kind == stat.S_IFLNK:
            ovl.symlink_at(target or b"", pfd, name)
        elif kind == stat.S_IFREG:
            fd = ovl.open_at(pfd, name, os.O_RDWR | os.O_CREAT | os.O_EXCL, perm)
        else:
            ovl.mknod_at(pfd, name, kind | perm, rdev)
        st = ovl.fstat(fd) if fd is not None else ovl.lstat_at(pfd, name)
        if kind != stat.S_IFLNK and stat.S_IMODE(st.st_mode) != perm:
            ovl.chmod_at(pfd, name, perm)  # a umask (outside the daemon, which runs without one)
            st = ovl.fstat(fd) if fd is not None else ovl.lstat_at(pfd, name)
        return fd, st

    def _make_in_work_dir(self, pfd: int, name: bytes, kind: int, perm: int, uid: int, gid: int, rdev: int,
                          target: bytes | None, opaque: bool,
                          override: bytes | None = None) -> tuple[int | None, os.stat_result]:
        """Built in the work dir with its owner and mode (and ``override``, the recorded ones, on a
        regular file or directory), then renamed into place: a crash never leaves a new entry with
        the daemon's owner or a half-set mode (and a whiteout it replaces goes in the same rename)."""
        where, tname = self.upper.work_fd, self.upper.temp_name()
        fd: int | None = None
        try:
            if kind == stat.S_IFDIR:
                ovl.mkdir_at(where, tname, 0o700)
                dfd = ovl.open_dir_at(where, tname)
                try:
                    if opaque:
                        formats.mark_opaque(dfd, self.upper.style)
                    if override is not None:
                        ovl.fsetxattr(dfd, self.override, override)
                    st = _own(dfd, uid, gid, perm)
                finally:
                    os.close(dfd)
            elif kind == stat.S_IFLNK:
                ovl.symlink_at(target or b"", where, tname)
                ovl.chown_at(where, tname, uid, gid)
                st = ovl.lstat_at(where, tname)
            elif kind == stat.S_IFREG:
                fd = ovl.open_at(where, tname, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                if override is not None:
                    ovl.fsetxattr(fd, self.override, override)
                st = _own(fd, uid, gid, perm)
            else:
                ovl.mknod_at(where, tname, kind | 0o600, rdev)
                ovl.chown_at(where, tname, uid, gid)
                ovl.chmod_at(where, tname, perm)
                st = ovl.lstat_at(where, tname)
            self._swap_in(where, tname, pfd, name, kind == stat.S_IFDIR)
        except BaseException:
            if fd is not None:
                os.close(fd)
            ovl.remove_tree_at(where, tname)
            raise
        return fd, st

    def _swap_in(self, wfd: int, tname: bytes, pfd: int, name: bytes, is_dir: bool) -> None:
        """Atomically put work/tname at pfd/name, replacing a whiteout there if any."""
        if self._exists(pfd, name):
            if is_dir:
                ovl.rename_at(wfd, tname, pfd, name, ovl.RENAME_EXCHANGE)
                ovl.remove_tree_at(wfd, tname)  # the whiteout, now in the work dir
            else:
                ovl.rename_at(wfd, tname, pfd, name)
        else:
            ovl.rename_at(wfd, tname, pfd, name, ovl.RENAME_NOREPLACE)

    @staticmethod
    def _exists(fd: int, name: bytes) -> bool:
        return ovl.exists_at(fd, name)

    def link(self, node: Node, parent: Node, name: bytes) -> Node:
        if node.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory")
        self._check_new(parent, name)
        self.dirty_dirs.add(parent.ino)
        self.copy_up(node, meta=self.metacopy_on)  # a lower hard link goes through the index
        if self.is_metacopy(node):
            metacopy.pin_data(self, node)  # the new name must find the data too
        self.copy_up.dir_chain(parent)
        pfd = self.stack.dir_fd(0, parent)
        sfd, sname = self.locate(node)
        if ovl.getxattr_or_none(sfd, sname, self.upper.origin_xattr) is not None:
            self.upper.mark_impure(pfd)  # as overlayfs: a name with an origin makes its directory impure
        if self._upper_entry(parent, name) is not None:
            tname = self.upper.temp_name()
            ovl.link_at(sfd, sname, self.upper.work_fd, tname)
            self._swap_in(self.upper.work_fd, tname, pfd, name, False)
        else:
            ovl.link_at(sfd, sname, pfd, name)
        if not node.indexed:
            # Several names, no index (as in overlayfs): remember them, to reach the inode by another
            # if the one we use goes.
            aliases = self._aliases.setdefault(node.ino, [])
            for entry in ((node.parent, node.name), (parent, name)):
                if entry not in aliases:
                    aliases.append(entry)
        return node

    # --- removal ---------------------------------------------------------------------

    def unlink(self, parent: Node, name: bytes) -> None:
        node = self.lookup(parent, name)
        if node.is_dir:
            raise OSError(errno.EISDIR, "is a directory")
        self._remove(parent, name, node)

    def rmdir(self, parent: Node, name: bytes) -> None:
        node = self.lookup(parent, name)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if self.list_names(node):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        self._remove(parent, name, node)
        self.stack.forget_fd(node.ino)

    def _remove(self, parent: Node, name: bytes, node: Node) -> None:
        self.dirty_dirs.add(parent.ino)
        self._link_up(node)
        real = self._real_if_linked(node)
        self.copy_up.dir_chain(parent)
        pfd = self.stack.dir_fd(0, parent)
        whiteout = self.lower_exists(parent, name)
        upper = self._upper_entry(parent, name)
        if whiteout:
            if upper is not None:
                self._whiteout_over(pfd, name)
            else:
                formats.make_whiteout(pfd, name, self.upper.style)
            self._whiteouts_in(parent, pfd)
        elif upper is not None:
            if stat.S_ISDIR(upper.st_mode):
                try:
                    ovl.rmdir_at(pfd, name)
                except OSError as e:
                    if e.errno != errno.ENOTEMPTY:
                        raise
                    tname = self.upper.temp_name()  # only whiteouts left inside: move away, then clean
                    ovl.rename_at(pfd, name, self.upper.work_fd, tname)
                    ovl.remove_tree_at(self.upper.work_fd, tname)
            else:
                ovl.unlink_at(pfd, name)
        last = self._name_removed(node) if node.indexed else real is None or real.st_nlink < 2
        if last and not node.is_dir:
            # Reached through its open files from now on, if any; and what the kernel still sends
            # for it (the writeback cache's times) must not land on whatever takes the name.
            node.unlinked = True
        elif not last:
            self._relocate(node, parent, name, real)

    def _real_if_linked(self, node: Node) -> os.stat_result | None:
        """The real inode of an upper non-directory with several names, before one of them goes."""
        if node.is_dir or node.indexed or not self.in_upper(node):
            return None
        try:
            st = self.real_stat(node)
        except OSError:
            return None
        return st if st.st_nlink > 1 else None

    # --- rename ----------------------------------------------------------------------

    def rename(self, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes, flags: int) -> None:
        if flags & ~(ovl.RENAME_EXCHANGE | ovl.RENAME_NOREPLACE):
            # As overlayfs: RENAME_WHITEOUT (and anything newer) is not for a union's users.
            raise OSError(errno.EINVAL, "unsupported rename flags")
        node = self.lookup(old_parent, old_name)
        target = self.resolve(new_parent, new_name)
        if target is not None:
            target = self.inodes.remember(target)
        exchange = bool(flags & ovl.RENAME_EXCHANGE)
        if flags & ovl.RENAME_NOREPLACE and target is not None:
            raise OSError(errno.EEXIST, "file exists")
        if exchange and target is None:
            raise OSError(errno.ENOENT, "no such file or directory")
        if formats.is_oci_marker(new_name):
            raise OSError(errno.EINVAL, "names starting with .wh. are reserved for whiteouts")
        if target is node:
            if old_parent is new_parent and old_name == new_name:
                return
        if target is not None and not exchange:
            if node.is_dir and not target.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory")
            if target.is_dir and not node.is_dir:
                raise OSError(errno.EISDIR, "is a directory")
            if target.is_dir and self.list_names(target):
                raise OSError(errno.ENOTEMPTY, "directory not empty")
        target_real = None
        if target is not None and not exchange and target is not node:
            self._link_up(target)
            target_real = self._real_if_linked(target)
        self.dirty_dirs.update((old_parent.ino, new_parent.ino))
        self.copy_up.dir_chain(old_parent)
        self.copy_up.dir_chain(new_parent)
        self._prepare_move(node, new_parent)
        if exchange:
            self._prepare_move(target, old_parent)
        elif target is not None and target.is_dir:
            self._empty_upper_dir(new_parent, new_name)
        ofd = self.stack.dir_fd(0, old_parent)
        nfd = self.stack.dir_fd(0, new_parent)
        if old_parent is not new_parent:
            # As overlayfs: a directory that gets an entry with an origin is marked impure.
            if ovl.getxattr_or_none(ofd, old_name, self.upper.origin_xattr) is not None:
                self.upper.mark_impure(nfd)
            if exchange and ovl.getxattr_or_none(nfd, new_name, self.upper.origin_xattr) is not None:
                self.upper.mark_impure(ofd)
        if exchange:
            ovl.rename_at(ofd, old_name, nfd, new_name, ovl.RENAME_EXCHANGE)
        else:
            whiteout = self.lower_exists(old_parent, old_name)
            dest = self._upper_entry(new_parent, new_name)
            if node.is_dir and dest is not None and not stat.S_ISDIR(dest.st_mode):
                # A directory onto a whiteout: swap them, the whiteout lands at the old name.
                ovl.rename_at(ofd, old_name, nfd, new_name, ovl.RENAME_EXCHANGE)
                if not whiteout:
                    ovl.unlink_at(ofd, old_name)
            elif whiteout:
                self._rename_whiteout(ofd, old_name, nfd, new_name)
            else:
                ovl.rename_at(ofd, old_name, nfd, new_name)
            if whiteout:
                self._whiteouts_in(old_parent, ofd)
            if target is not None and target is not node and not target.is_dir:
                last = self._name_removed(target) if target.indexed else \
                    target_real is None or target_real.st_nlink < 2
                if last:
                    target.unlinked = True   # as in _remove
                elif not last:
                    self._relocate(target, new_parent, new_name, target_real)
        self.inodes.move(node, new_parent, new_name)
        if target is not node:   # rename(2) between two names of one inode changes nothing
            self._alias_moved(node, old_parent, old_name, new_parent, new_name)
        if exchange and target is not None:
            self.inodes.move(target, old_parent, old_name)
            self._alias_moved(target, new_parent, new_name, old_parent, old_name)

    def _alias_moved(self, node: Node, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes) -> None:
        """A name of a hard-linked upper file moved: its list of names follows, or once the name the
        mount reaches it by goes, :meth:`_relocate` finds none of the others (ENOENT, or EIO where
        the kernel meets another type at the number) and loses the file."""
        aliases = self._aliases.get(node.ino)
        if aliases is None:
            return
        aliases[:] = [e for e in aliases if e != (old_parent, old_name)]
        if (new_parent, new_name) not in aliases:
            aliases.append((new_parent, new_name))

    def _rename_whiteout(self, ofd: int, old: bytes, nfd: int, new: bytes) -> None:
        if self.upper.style is not formats.Style.XWHITEOUT:
            try:
                ovl.rename_at(ofd, old, nfd, new, ovl.RENAME_WHITEOUT)
                return
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
                    raise
        ovl.rename_at(ofd, old, nfd, new)
        formats.make_whiteout(ofd, old, self.upper.style)

    def _prepare_move(self, node: Node, new_parent: Node) -> None:
        """Copy up what moves; a directory with lower parts records where it came from."""
        if not node.is_dir:
            self.copy_up(node, meta=self.metacopy_on)
            if self.is_metacopy(node):
                metacopy.pin_data(self, node)  # the data stays at the old path
            return
        has_lower = any(not self.stack.is_upper(i) for i in node.layers)
        if has_lower:
            lower_path = node.redirect if node.redirect is not None else self.lower_path(node)
            self._pin_lower_paths(node)
            self.copy_up(node)
            fd = self.stack.dir_fd(0, node)
            if node.redirect is None:
                self.upper.set_redirect(fd, lower_path)
                node.redirect = lower_path
        elif any(not self.stack.is_upper(i) for i in new_parent.layers):
            # A pure upper directory moving into a merged one: lower entries of the
            # same name must not merge into it.
            formats.mark_opaque(self.stack.dir_fd(0, node), self.upper.style)

    def _pin_lower_paths(self, node: Node) -> None:
        """A directory about to move keeps its lower dirs: from now on they are named from each
        layer's root, not through its (new) parent."""
        node.paths = tuple(None if self.stack.is_upper(i) else b"/" + self.layer_path(node, i)
                           for i in node.layers)

    def _empty_upper_dir(self, parent: Node, name: bytes) -> None:
        """Before renaming over an (empty) merged dir, drop its upper copy's whiteouts."""
        upper = self._upper_entry(parent, name)
        if upper is None or not stat.S_ISDIR(upper.st_mode):
            return
        pfd = self.stack.dir_fd(0, parent)
        try:
            ovl.rmdir_at(pfd, name)
            if self.lower_exists(parent, name):
                formats.make_whiteout(pfd, name, self.upper.style)
                self._whiteouts_in(parent, pfd)
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            self._whiteout_over(pfd, name)
            self._whiteouts_in(parent, pfd)

    def _whiteouts_in(self, parent: Node, pfd: int) -> None:
        """Rootless, an upper dir that got an xattr whiteout is marked so, and its node looks for them."""
        if self.upper.style is formats.Style.XWHITEOUT:
            formats.mark_xwhiteouts(pfd, self.upper.style)
            if 0 not in parent.xwh:
                parent.xwh = (0, *parent.xwh)

    def _whiteout_over(self, pfd: int, name: bytes) -> None:
        """Replace the upper entry ``name`` by a whiteout in one step: built in the work dir, swapped in
        with ``RENAME_EXCHANGE``, the old entry removed there."""
        tname = self.upper.temp_name()
        formats.make_whiteout(self.upper.work_fd, tname, self.upper.style)
        ovl.rename_at(self.upper.work_fd, tname, pfd, name, ovl.RENAME_EXCHANGE)
        ovl.remove_tree_at(self.upper.work_fd, tname)


def _own(fd: int, uid: int, gid: int, perm: int) -> os.stat_result:
    """Give a new entry built in the work dir its owner, then its mode (chown clears setuid)."""
    ovl.fchown(fd, uid, gid)
    ovl.fchmod(fd, perm)
    return ovl.fstat(fd)
