"""Images from Dockerfiles: ``unionfs build`` (see builder.py)."""
