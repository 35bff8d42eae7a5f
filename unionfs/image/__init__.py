"""Docker's image model on top of the union filesystem.

One module per idea, after go-containerregistry's ``pkg/v1``:

``model``          immutable values: Reference, Layer, Config/History, Image; manifest parsing
``archive``        images as named files (directory or tar) both ways: sources, blobs verified by digest; sinks
``platform``       platforms, and the one rule that picks an image of an index (load and pull)
``oci_layout``     the OCI image layout, read and written; the OCI manifest of a stored image
``docker_archive`` ``docker save`` archives: both forms read, the legacy one written
``streams``        a stored layer read back for export, verified (as kept, or as a plain tar)
``compression``    gzip/zstd/bzip2/xz by magic bytes; hashing streams (digest, diff_id)
``extract``        layer tar -> directory, fd-relative, whiteouts in overlayfs's format
``store``          the content-addressed local store: layers by diff_id, blobs, images, tags, lock, GC
``load``           source -> store, atomically; the layers and images commit and build make, recorded
``save``           store -> docker save archive or OCI layout: which images, the output appearing whole
``mutate``         a new config from an old one plus a step (commit, build): --change, diff_ids, history
``report``         what ``images``, ``inspect`` and ``history`` show
``commands``       ``tag``, ``rmi``, mounting an image read-only

Imports run downhill in that order of ideas (model, archive, compression, store at the bottom);
nothing here imports containers, builds, registries or the command line, and every file a layer
holds is written through :mod:`unionfs.fs.sys` and :mod:`unionfs.fs.formats` (by ``extract``).
"""
