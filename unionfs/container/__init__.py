"""Containers: an image plus one writable layer of its own, and Docker's workflow around it.

Read in this order: ``model`` (the records in ``ROOT/containers/<id>/``: create,
resolve by name or id, mounted or not, remove), ``mounting`` (a container's lower
stack and its mount), ``view`` (the merged view of a container read without FUSE,
or through its mount point), ``diff`` (the changes of the writable layer, as
``docker diff``), ``changeset`` (those changes as an OCI layer tar), ``commit`` (a
new image from a container), ``spec``/``volumes``/``run`` (docker run's options, an
OCI bundle from an image config), ``runtime`` (crun or runc, one subcommand at a
time), ``lifecycle`` (the supervisor of a running container; stop, kill, wait, logs,
exec), ``terminal`` (``-t``), ``commands`` (what the ``create``/``ps``/``rm``/``diff``/
``mount`` subcommands do).
"""
