"""Containers: an image plus one writable layer of its own, and Docker's workflow around it.

Read in this order: ``model`` (the records in ``ROOT/containers/<id>/``: create,
resolve by name or id, mounted or not, remove), ``view`` (the merged view of a
container read without FUSE, or through its mount point), ``diff`` (the changes of
the writable layer, as ``docker diff``), ``changeset`` (those changes as an OCI
layer tar), ``commit`` (a new image from a container), ``runtime`` (an OCI bundle
from an image config, and running it with crun or runc), ``commands`` (what the
``create``/``ps``/``rm``/``diff``/``commit``/``run`` subcommands do).
"""
