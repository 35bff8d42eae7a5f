"""Docker's image model on top of the union filesystem.

One module per idea, after go-containerregistry's ``pkg/v1``:

``model``          immutable values: Reference, Layer, Config/History, Image; manifest parsing
``archive``        sources as named files (directory or tar), blobs verified by digest
``platform``       platforms, and the one rule that picks an image of an index (load and pull)
``oci_layout``     reading an OCI image layout
``docker_archive`` reading both forms of ``docker save``
``compression``    gzip/zstd/bzip2/xz by magic bytes; hashing streams (digest, diff_id)
``extract``        layer tar -> directory, fd-relative, whiteouts in overlayfs's format
``store``          the content-addressed local store: layers by diff_id, blobs, images, tags, lock, GC
``load``           source -> store, atomically
``save``           store -> docker save archive or OCI layout
``mutate``         a new config from an old one plus a step (commit, build): --change, diff_ids, history
``report``         what ``images``, ``inspect`` and ``history`` show
``commands``       ``tag``, ``rmi``, mounting an image read-only
"""
