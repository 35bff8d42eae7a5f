"""unionfs: a union filesystem for container images, in Python, served through FUSE."""

__version__ = "0.1.0"
