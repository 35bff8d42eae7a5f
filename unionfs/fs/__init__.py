"""The union semantics: layers, the overlay rules, the inode table, the upper layer. No FUSE.

Read in this order: ``sys`` (every syscall on a layer), ``formats`` (every
on-disk format, both directions), ``layers`` (the stack and its directory fds),
``inodes`` (the inode table), ``readdir`` (merged listings and their cache),
``lookup`` (resolution down the layers), ``union`` (the read side), ``upper``
(the work dir, the index, our meta xattrs), ``copyup``, ``dirops`` (new
entries, removal, rename) and ``writable`` (files, attributes; the writable
union), ``mount`` (opening a union), ``idmap`` (owner shifting).  Nothing here
imports pyfuse3, trio, :mod:`unionfs.fuse` or the image tool
(``tests/test_imports.py`` checks it).
"""
