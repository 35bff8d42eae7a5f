"""The error types every layer of unionfs shares.

It sits at the bottom of the import graph: the filesystem, images, containers,
registries and the command line all raise these, and only the command line
turns them into one line on stderr and exit status 2.  It imports nothing of
unionfs.
"""
from __future__ import annotations


class UsageError(Exception):
    """A mistake in what the user asked for, or bad input: shown as one line, exit status 2."""


def one_line(error: BaseException) -> str:
    """An error as the one line the command line prints after ``unionfs: ``."""
    return "; ".join(str(error).splitlines())
