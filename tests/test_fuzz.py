"""Bounded fuzzing (hypothesis, a fixed budget, derandomized so the suite is repeatable): the layer
extractor, the outer archive reader and the manifest/config/index parsers get mutated real inputs and
random ones, and nothing but the project's own error (ImageError: one line, exit status 2) may escape.
The Dockerfile parser and its word expansion get mutated real Dockerfiles and random text under the
same rule (their errors are UsageErrors too)."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from image_archives import Img, d, f, hard, layer_tar, oci_layout, sha, sym
from unionfs.fs.formats import Style
from unionfs.image import docker_archive
from unionfs.image import oci_layout as oci
from unionfs.image.archive import DirArchive, TarArchive
from unionfs.image.extract import extract_layer
from unionfs.build import dockerfile, words
from unionfs.errors import UsageError
from unionfs.image.model import Config, ImageError, Reference, parse_json, parse_manifest

# UNIONFS_FUZZ_EXAMPLES=N: a longer, randomized run by hand (the suite's is fixed and repeatable).
_LONG = int(os.environ.get("UNIONFS_FUZZ_EXAMPLES") or 0)
BUDGET = settings(max_examples=_LONG or 300, deadline=None, derandomize=not _LONG, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SEED_LAYER = layer_tar([d("etc"), f("etc/a", b"a" * 700, uid=1000, pax={"SCHILY.xattr.user.x": "1"}),
                        sym("etc/l", "a"), hard("etc/h", "etc/a"), f("etc/.wh.gone"), d("o"),
                        f("o/.wh..wh..opq"), f("o/" + "n" * 120, b"long name")])


@st.composite
def mutated(draw, seed: bytes):
    """``seed`` with a few bytes overwritten, some inserted or deleted, or cut short."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["set", "insert", "delete", "cut"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "cut":
            del data[pos:]
    return bytes(data)


def _extract(blob: bytes) -> None:
    root = tempfile.mkdtemp(prefix="fuzz-layer-")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        extract_layer(io.BytesIO(blob), fd, what="layer", style=Style.OVERLAY, devices=True, space=1 << 26)
    except ImageError:
        pass
    finally:
        os.close(fd)
        shutil.rmtree(root)


@BUDGET
@given(st.one_of(mutated(SEED_LAYER), mutated(gzip.compress(SEED_LAYER, mtime=0)), st.binary(max_size=3000)))
def test_fuzz_layer_extractor(blob):
    _extract(blob)


@BUDGET
@given(st.lists(st.tuples(st.sampled_from(["path", "linkpath", "mtime", "uid", "gid", "size", "uname",
                                            "SCHILY.xattr.user.a", "SCHILY.xattr.", "LIBARCHIVE.xattr.user.b",
                                            "GNU.sparse.map", "GNU.sparse.size", "hdrcharset"]),
                          st.text(max_size=40)), max_size=4),
       st.sampled_from([tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE,
                        tarfile.CHRTYPE, b"x", b"g", tarfile.GNUTYPE_SPARSE]))
def test_fuzz_pax_headers(pax, kind):
    """Real PAX headers with arbitrary values for the keys the reader interprets."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("member")
        ti.type, ti.linkname = kind, "target"
        ti.pax_headers = dict(pax)
        try:
            tf.addfile(ti, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
        except (ValueError, UnicodeError, tarfile.TarError):
            return   # not even writable: nothing to read
    _extract(buf.getvalue())


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
                    max_leaves=20)
DIGEST = sha(b"x")


def _docs():
    """Real documents (a manifest, an index descriptor, a config, a manifest.json entry) with one field
    replaced by arbitrary JSON."""
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": DIGEST, "size": 1},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": DIGEST, "size": 1}]}
    cfg = json.loads(Img([SEED_LAYER], []).config_bytes())
    cfg["history"] = [{"created_by": "x"}]
    return {"manifest": manifest, "config": cfg, "config.config": cfg["config"], "config.rootfs": cfg["rootfs"],
            "layer": manifest["layers"][0]}


@st.composite
def poked(draw):
    docs = _docs()
    which = draw(st.sampled_from(sorted(docs)))
    doc = docs[which]
    key = draw(st.sampled_from(sorted(doc) + ["annotations", "platform", "Labels", "Env"]))
    doc[key] = draw(JSON)
    return json.dumps(docs["manifest"] if which in ("manifest", "layer") else docs["config"]).encode()


@BUDGET
@given(st.one_of(poked(), JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200),
                 st.integers(0, 3000).map(lambda n: b'{"a":' + b"[" * n + b"]" * n + b"}")))
def test_fuzz_json_parsers(raw):
    for parse in (lambda: parse_manifest(raw), lambda: Config.parse(raw), lambda: parse_json(raw, "x")):
        try:
            parse()
        except ImageError:
            pass


@BUDGET
@given(st.one_of(st.text(max_size=300), st.from_regex(r"[a-z0-9./:@_-]{0,80}", fullmatch=True)),
       st.booleans())
def test_fuzz_references(text, allow_digest):
    try:
        Reference.parse(text, allow_digest=allow_digest)
    except ImageError:
        pass


LAYOUT = oci_layout(None, [Img([SEED_LAYER], ["t"])], docker25=True)


@BUDGET
@given(st.sampled_from(sorted(n for n in LAYOUT if not n.startswith("blobs/") or len(LAYOUT[n]) < 2000)),
       st.data())
def test_fuzz_layout_and_docker_archive_readers(name, data):
    """One file of a Docker >= 25 archive (an OCI layout with manifest.json) mutated or replaced by arbitrary
    JSON; both readers, over the directory and over a tar of it."""
    files = dict(LAYOUT)
    files[name] = data.draw(st.one_of(mutated(files[name]), JSON.map(lambda v: json.dumps(v).encode())))
    base = tempfile.mkdtemp(prefix="fuzz-layout-")
    try:
        root = os.path.join(base, "layout")
        for n, content in files.items():
            os.makedirs(os.path.dirname(os.path.join(root, n)), exist_ok=True)
            with open(os.path.join(root, n), "wb") as fh:
                fh.write(content)
        with tarfile.open(os.path.join(base, "layout.tar"), "w") as tf:
            tf.add(root, arcname=".")
        for archive in (DirArchive(root), TarArchive(os.path.join(base, "layout.tar"))):
            with archive:
                for reader in (docker_archive.read, oci.read):
                    try:
                        for img in reader(archive):
                            archive.read_verified(img.config_name, img.config_digest, "config")
                    except ImageError:
                        pass
    finally:
        shutil.rmtree(base)


def _tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for n, content in files.items():
            ti = tarfile.TarInfo(n)
            ti.size = len(content)
            tf.addfile(ti, io.BytesIO(content))
    return buf.getvalue()


@BUDGET
@given(st.one_of(mutated(_tar_of(LAYOUT)), mutated(gzip.compress(_tar_of(LAYOUT), mtime=0)), st.binary(max_size=2000)))
def test_fuzz_outer_archive(blob):
    """A mutated archive (or arbitrary bytes) as the file given to load: the reader and both formats."""
    with tempfile.NamedTemporaryFile(prefix="fuzz-archive-") as tmp:
        tmp.write(blob)
        tmp.flush()
        try:
            with TarArchive(tmp.name) as archive:
                for reader in (docker_archive.read, oci.read):
                    try:
                        for img in reader(archive):
                            archive.read_verified(img.config_name, img.config_digest, "config")
                            for ly in img.layers:   # every layer member the reader names can be read
                                if archive.exists(ly.name):
                                    with archive.open(ly.name) as f:
                                        while f.read(1 << 20):
                                            pass
                    except ImageError:
                        pass
        except ImageError:
            pass


@pytest.mark.skipif(bool(_LONG), reason="a long run by hand")
def test_budget_is_bounded():
    assert BUDGET.max_examples <= 300 and BUDGET.derandomize


SEED_DOCKERFILE = r"""# syntax=docker/dockerfile:1
# escape=\
ARG BASE=bb:1
FROM ${BASE} AS build
ENV A=1 B="two words" C=${A:-x} D=\$E
LABEL k=v "k 2"="v 2"
RUN echo $A \
    && echo done
RUN <<EOF
echo heredoc
EOF
COPY --chown=1000:1000 --chmod=0644 a* /dst/
COPY <<-"END" /etc/motd
	hello ${A}
	END
ADD ["src", "/d st/"]
WORKDIR ${HOME:+/home}/x
USER app:app
EXPOSE 80/tcp 53/udp
VOLUME ["/data"]
ONBUILD RUN true
HEALTHCHECK --interval=5s CMD ["true"]
STOPSIGNAL SIGTERM
SHELL ["/bin/sh", "-c"]
ENTRYPOINT ["/bin/sh"]
CMD echo $B
FROM scratch
COPY --from=build /dst /
"""


@BUDGET
@given(st.one_of(mutated(SEED_DOCKERFILE.encode()), st.binary(max_size=600)))
def test_fuzz_dockerfile_parser(blob):
    """A mutated Dockerfile (or random bytes): parsing, and every instruction's word expansion, give a
    Dockerfile or one UsageError (the file and line named), never anything else."""
    text = blob.decode("utf-8", errors="replace")
    try:
        df = dockerfile.parse(text, "Dockerfile")
    except UsageError as e:
        assert "\n" not in str(e).strip() or str(e).startswith("Dockerfile"), str(e)
        return
    env = {"A": "1", "HOME": "/root"}
    for ins in df.instructions:
        for expand in (words.words, words.pairs):
            try:
                expand(ins.rest, env, df.escape)
            except UsageError:
                pass
