"""Images to and from registries that speak the OCI distribution API.

``auth``      credentials (``unionfs login``, Docker's config.json), WWW-Authenticate challenges
``client``    the ``/v2/`` API on httpx: manifests, blobs, uploads, errors as one line
``pull``      registry -> store: platform choice, parallel resumable downloads, the load pipeline
``push``      store -> registry: HEAD, cross-repository mount, monolithic or chunked uploads
``commands``  the ``pull``, ``push``, ``login`` and ``logout`` subcommands
"""
