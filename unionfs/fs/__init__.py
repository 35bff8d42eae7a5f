"""The filesystem: layers, the union rules, the inode table and the FUSE adapter.

Read in this order: ``sys`` (every syscall on a layer), ``formats`` (whiteouts,
opaque dirs, private xattrs), ``layers`` (the stack and its directory fds),
``inodes`` (the inode table), ``union`` (lookup, readdir, the read side),
``writable`` and ``copyup`` (the upper layer), ``dircache`` (readdir listings
kept between calls), ``operations`` (the pyfuse3 adapter), ``daemon`` (mount,
serve, unmount).
"""
