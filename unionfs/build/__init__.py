"""Images from Dockerfiles: ``unionfs build``.

``dockerfile`` parses, ``words`` substitutes, ``context`` and ``paths`` read sources without
leaving their roots, ``copying`` and ``layer`` turn COPY/ADD into a layer tar, ``runstep`` runs a
RUN in a container, ``cache`` maps steps to images, ``builder`` drives the stages.  A new config is
:mod:`unionfs.image.mutate`'s and is recorded by :mod:`unionfs.image.load`, as for ``commit``:
nothing here makes a config or a manifest of its own.
"""
