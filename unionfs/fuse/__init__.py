"""The FUSE side: the pyfuse3 adapter and the daemon that mounts, serves and unmounts.

``operations`` turns each request into a call of the union semantics
(:mod:`unionfs.fs`) and its answer into a reply; ``daemon`` parses mount options,
runs the trio loop and keeps the pidfiles.  Neither decides what the
filesystem means: that is :mod:`unionfs.fs`, which never imports this package.
"""
