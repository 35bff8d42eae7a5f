"""Hostile and broken archives: each refused with a clear one-line message, the store unchanged,
nothing written outside the layer directory."""
from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile

import pytest

from helpers import unionfs_cmd
from image_archives import (Entry, Img, config, d, docker_save_legacy, f, hard, layer_tar, oci_layout, sha,
                            store_listing, sym, write_files)


def run(*args):
    return subprocess.run(unionfs_cmd(*args), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.fixture
def store(tmp_path):
    """A store that already holds one good image, so 'unchanged' means something."""
    root = tmp_path / "store"
    good = tmp_path / "good.tar"
    docker_save_legacy(good, [Img([layer_tar([d("etc"), f("etc/os-release", b"ID=good\n")])], ["good:1"])])
    r = run("--root", str(root), "load", str(good))
    assert r.returncode == 0, r.stderr
    return root


def refused(store, archive, message):
    before = store_listing(store)
    r = run("--root", str(store), "load", str(archive))
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    after = store_listing(store)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))
    return r.stderr


OUTSIDE = "/tmp/unionfs-hostile-canary"


@pytest.mark.parametrize("case,entries,message", [
    ("dotdot", [f("etc/../../escape", b"x")], "leaves the layer"),
    ("dotdot-dir", [d("a"), f("../" * 8 + OUTSIDE.lstrip("/"), b"x")], "leaves the layer"),
    ("absolute", [f(OUTSIDE, b"x")], "absolute path"),
    ("hardlink-outside", [hard("pw", "../../../../etc/passwd")], "leaves the layer"),
    ("hardlink-absolute", [hard("pw", "/etc/passwd")], "absolute path"),
    ("hardlink-not-in-layer", [hard("pw", "etc/passwd")], "not a file extracted earlier"),
    ("hardlink-to-dir", [d("dir"), hard("pw", "dir")], "not a file extracted earlier"),
    ("through-symlink", [sym("evil", "/tmp"), f("evil/unionfs-hostile-canary", b"pwned")], "is a symlink"),
    ("through-symlink-deep", [d("a"), sym("a/b", "../../../../tmp"), f("a/b/unionfs-hostile-canary", b"x")],
     "is a symlink"),
    ("symlink-then-dir", [sym("evil", "/tmp"), d("evil/unionfs-hostile-canary")], "is a symlink"),
    ("absurd-size", [Entry("big", b"x" * 512, size=1 << 50)], "claims"),
    ("bare-wh", [d("etc"), f("etc/.wh.", b"")], "not a valid whiteout"),
    ("wh-dotdot", [f(".wh...", b"")], "not a valid whiteout"),
])
def test_hostile_layer_refused(store, tmp_path, case, entries, message):
    if os.path.lexists(OUTSIDE):
        os.unlink(OUTSIDE)
    archive = tmp_path / f"{case}.tar"
    docker_save_legacy(archive, [Img([layer_tar(entries)], [f"evil:{case}"])])
    refused(store, archive, message)
    assert not os.path.lexists(OUTSIDE)
    assert not os.path.exists("/tmp/escape")


def test_truncated_layer(store, tmp_path):
    layer = layer_tar([f("a", b"a" * 5000), f("b", b"b" * 5000)])
    cut = layer[:2048]
    archive = tmp_path / "cut.tar"
    docker_save_legacy(archive, [Img([cut], ["evil:cut"], config=None)])
    refused(store, archive, "corrupt or truncated")


def test_garbage_header_mid_tar(store, tmp_path):
    """tarfile would stop quietly at a bad header after the first; Go (and we) refuse it."""
    layer = layer_tar([f("a", b"a")], end_blocks=False) + b"\x07" * 512 + layer_tar([f("b", b"b")])
    archive = tmp_path / "garbage.tar"
    docker_save_legacy(archive, [Img([layer], ["evil:garbage"])])
    refused(store, archive, "invalid tar header")


def test_diff_id_mismatch(store, tmp_path):
    layer = layer_tar([f("a", b"a")])
    img = Img([layer], ["evil:diffid"])
    img.config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [sha(b"something else")]}}).encode()
    archive = tmp_path / "diffid.tar"
    docker_save_legacy(archive, [img])
    refused(store, archive, "does not match the config's diff_id")


def test_layer_digest_mismatch(store, tmp_path):
    layout = tmp_path / "layout"
    files = oci_layout(layout, [Img([layer_tar([f("a", b"a")])], ["x"], compression="gzip")])
    blob = next(n for n, data in files.items() if data[:2] == b"\x1f\x8b")
    (layout / blob).write_bytes(__import__("gzip").compress(layer_tar([f("a", b"evil")])))
    refused(store, layout, "does not match its digest")


def test_config_digest_mismatch(store, tmp_path):
    archive = tmp_path / "d25.tar"
    files = oci_layout(None, [Img([layer_tar([f("a", b"a")])], ["evil:cfg"])], docker25=True)
    cfg_name = json.loads(files["manifest.json"])[0]["Config"]
    files[cfg_name] = files[cfg_name].replace(b'"tests"', b'"evil!"')
    with tarfile.open(archive, "w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    refused(store, archive, "does not match its digest")


def test_layer_count_mismatch(store, tmp_path):
    img = Img([layer_tar([f("a", b"a")]), layer_tar([f("b", b"b")])], ["evil:count"])
    img.config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [sha(img.layers[0])]}}).encode()
    archive = tmp_path / "count.tar"
    docker_save_legacy(archive, [img])
    refused(store, archive, "lists 1 diff_ids")


def test_member_symlink_leaving_archive(store, tmp_path):
    archive = tmp_path / "link.tar"
    cfg = Img([layer_tar([])], []).config_bytes()
    with tarfile.open(archive, "w") as tf:
        for name, data in {"manifest.json": json.dumps([{"Config": "c.json", "RepoTags": ["evil:link"],
                                                          "Layers": ["l/layer.tar"]}]).encode(),
                           "c.json": cfg}.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("l/layer.tar")
        ti.type, ti.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        tf.addfile(ti)
    refused(store, archive, "links outside the archive")


@pytest.mark.parametrize("content,message", [
    (b"not a tar at all" * 100, "not a readable tar archive"),
    (b"", "not a readable tar archive"),
])
def test_not_an_archive(store, tmp_path, content, message):
    p = tmp_path / "junk"
    p.write_bytes(content)
    refused(store, p, message)


def test_neither_format(store, tmp_path):
    p = tmp_path / "plain.tar"
    with tarfile.open(p, "w") as tf:
        ti = tarfile.TarInfo("hello")
        tf.addfile(ti, io.BytesIO(b""))
    refused(store, p, "neither a docker save archive")


def test_bad_tag_in_archive(store, tmp_path):
    archive = tmp_path / "tag.tar"
    docker_save_legacy(archive, [Img([layer_tar([f("a", b"a")])], ["Evil:x"])])
    refused(store, archive, "invalid repository name")


def test_device_nodes_refused_without_root(tmp_path):
    """As non-root, device nodes are refused (simulated with the extractor's flag)."""
    from unionfs.fs.formats import Style
    from unionfs.image.extract import HostileLayer, extract_layer
    layer = layer_tar([Entry("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666)])
    root = tmp_path / "root"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(HostileLayer, match="only root may create device nodes"):
            extract_layer(io.BytesIO(layer), fd, what="layer", style=Style.XWHITEOUT, devices=False, space=1 << 30)
        # ... and the same layer extracts as root
        for p in sorted(root.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        ex = extract_layer(io.BytesIO(layer), fd, what="layer", style=Style.OVERLAY, devices=True, space=1 << 30)
    finally:
        os.close(fd)
    assert ex.diff_id == sha(layer)
    st = os.lstat(root / "dev/null")
    assert os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3


def test_interrupted_import_leaves_nothing_registered(store, tmp_path):
    """A load killed in the middle of extracting: no image, tag or layer appears; the next writer cleans up."""
    layers = [layer_tar([f(f"f{i}", b"x" * 100) for i in range(50)]), layer_tar([f("g", b"g")])]
    archive = tmp_path / "big.tar"
    docker_save_legacy(archive, [Img(layers, ["killed:1"])])
    before = store_listing(store)
    script = ("import os, signal, sys\n"
              "from unionfs.image import extract\n"
              "orig = extract.LayerWriter.add\n"
              "def add(self, m, t):\n"
              "    orig(self, m, t)\n"
              "    if self.entries == 20: os.kill(os.getpid(), signal.SIGKILL)\n"
              "extract.LayerWriter.add = add\n"
              "from unionfs.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([*unionfs_cmd()[:1], "-c", script, "--root", str(store), "load", str(archive)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -9, r.stderr
    after = store_listing(store)
    new = sorted(set(after) - set(before))
    assert new and all(p.startswith("tmp/") for p in new), new    # only work in progress
    r = run("--root", str(store), "images")
    assert "killed" not in r.stdout
    assert run("--root", str(store), "tag", "good:1", "good:2").returncode == 0   # the next writer
    after = store_listing(store)
    assert not [p for p in after if p.startswith("tmp/")]
    assert {p for p in after if p.startswith("layers/")} == {p for p in before if p.startswith("layers/")}


# --- malformed input: each class as a docker save archive and as an OCI layout -------------------------

GOOD = Img([layer_tar([d("etc"), f("etc/os-release", b"ID=good\n")])], ["good:1"])   # what the store fixture holds
DEEP = b"[" * 5000 + b"]" * 5000


def _bytes(doc) -> bytes:
    return doc if isinstance(doc, bytes) else json.dumps(doc).encode()


def hostile_oci(path, layers: list[bytes], *, cfg: bytes | None = None, manifest=None, desc=None, index=None,
                ref_name="evil") -> None:
    """An OCI layout whose digests are all right except where a hook changes what it is given: ``manifest``,
    ``desc`` (the index's descriptor of it) and ``index`` each take the document and may return a new one
    (bytes for anything that is not JSON)."""
    blobs = {}
    cfg = cfg if cfg is not None else Img(layers, []).config_bytes()
    blobs[sha(cfg)] = cfg
    descs = []
    for layer in layers:
        blobs[sha(layer)] = layer
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(layer), "size": len(layer)})
    m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(cfg), "size": len(cfg)},
         "layers": descs}
    m = _bytes((manifest(m) or m) if manifest else m)
    blobs[sha(m)] = m
    dsc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(m), "size": len(m),
           "annotations": {"org.opencontainers.image.ref.name": ref_name}}
    dsc = (desc(dsc) or dsc) if desc else dsc
    idx = {"schemaVersion": 2, "manifests": [dsc]}
    idx = _bytes((index(idx) or idx) if index else idx)
    files = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}', "index.json": idx}
    files.update({f"blobs/sha256/{k[7:]}": v for k, v in blobs.items()})
    write_files(files, target=path)


def _set(key, value):
    def hook(doc):
        doc[key] = value
    return hook


def _set_ann(value):
    def hook(doc):
        doc["annotations"] = {"org.opencontainers.image.ref.name": value}
    return hook


def _config_with(**top) -> bytes:
    c = json.loads(Img([layer_tar([f("a", b"a")])], []).config_bytes())
    c.update(top)
    return json.dumps(c).encode()


def _config_cfg(**cfg) -> bytes:
    return config([sha(layer_tar([f("a", b"a")]))], **cfg)


ONE = [layer_tar([f("a", b"a")])]

DOCKER_CASES = {   # manifest.json and config classes, as a docker save archive (Docker < 25)
    "deep-manifest.json": (dict(mutate=lambda m: DEEP), "nested more than 64 levels"),
    "deep-config": (dict(config=_config_with(x=json.loads(b"[" * 500 + b"]" * 500))), "nested more than 64 levels"),
    "very-deep-config": (dict(config=b'{"rootfs": ' + DEEP + b"}"), "nested more than 64 levels"),
    "RepoTags-number": (dict(mutate=lambda m: m[0].update(RepoTags=5)), "RepoTags is an integer, not a list"),
    "RepoTags-holding-number": (dict(mutate=lambda m: m[0].update(RepoTags=[5])), "image reference 5: not a string"),
    "RepoTags-holding-null": (dict(mutate=lambda m: m[0].update(RepoTags=[None])), "image reference null"),
    "Layers-object": (dict(mutate=lambda m: m[0].update(Layers={})), "lacks Config or Layers"),
    "history-number": (dict(config=_config_with(history=5)), "history is an integer, not a list"),
    "config-string": (dict(config=_config_with(config="x")), "config is a string, not an object"),
    "Env-number": (dict(config=_config_cfg(Env=[1])), "Env holds an integer"),
    "Cmd-string-object": (dict(config=_config_cfg(Cmd={"a": 1})), "Cmd is an object, not a list"),
    "Labels-list": (dict(config=_config_cfg(Labels=[1])), "Labels is a list, not an object"),
    "Labels-holding-number": (dict(config=_config_cfg(Labels={"a": 1})), "Labels['a'] is an integer"),
    "manifest.json-not-json": (dict(mutate=lambda m: b"\xff\xfe"), "not JSON"),
    "huge-manifest.json": (dict(mutate=lambda m: b" " * (9 << 20) + b"[]"), "implausibly large"),
}


@pytest.mark.parametrize("case", sorted(DOCKER_CASES))
def test_malformed_docker_archive(store, tmp_path, case):
    kw, message = DOCKER_CASES[case]
    img = Img(list(ONE), ["evil:1"], config=kw.get("config"))
    archive = tmp_path / "evil.tar"
    docker_save_legacy(archive, [img], mutate=kw.get("mutate"))
    refused(store, archive, message)


OCI_CASES = {   # index.json, manifest, config and descriptor classes, as an OCI layout directory
    "deep-index": (dict(index=lambda i: DEEP), "nested more than 64 levels"),
    "deep-manifest": (dict(manifest=lambda m: b'{"layers": ' + DEEP + b"}"), "nested more than 64 levels"),
    "deep-config": (dict(cfg=b'{"rootfs": ' + DEEP + b"}"), "nested more than 64 levels"),
    "deep-annotation": (dict(desc=lambda d: d.update(annotations={"x": json.loads(b"[" * 100 + b"]" * 100)})),
                        "nested more than 64 levels"),
    "ref-name-number": (dict(desc=_set_ann(5)), "['org.opencontainers.image.ref.name'] is an integer"),
    "ref-name-object": (dict(desc=_set_ann({"a": "b"})), "['org.opencontainers.image.ref.name'] is an object"),
    "ref-name-newline": (dict(desc=_set_ann("a\nb")), "ref name 'a\\nb' is neither a tag"),
    "annotations-string": (dict(desc=_set("annotations", "x")), "annotations is a string, not an object"),
    "mediaType-number": (dict(desc=_set("mediaType", 5)), "mediaType is an integer, not a string"),
    "manifest-mediaType-number": (dict(manifest=_set("mediaType", 5)), "mediaType is an integer, not a string"),
    "layer-mediaType-list": (dict(manifest=lambda m: m["layers"][0].update(mediaType=[1])),
                             "mediaType is a list, not a string"),
    "size-string": (dict(desc=_set("size", "12")), "size is a string, not an integer"),
    "size-true": (dict(manifest=lambda m: m["layers"][0].update(size=True)), "size is true or false"),
    "size-negative": (dict(manifest=lambda m: m["layers"][0].update(size=-1)), "bad size -1"),
    "platform-string": (dict(desc=_set("platform", "linux")), "platform is a string, not an object"),
    "manifests-object": (dict(index=_set("manifests", {})), "no manifests"),
    "digest-number": (dict(desc=_set("digest", 5)), "not a sha256 digest: 5"),
    "index-not-json": (dict(index=lambda i: b"{"), "not JSON"),
    "index-nested-forever": (dict(desc=lambda d: d.update(mediaType="application/vnd.oci.image.index.v1+json"),
                                  manifest=lambda m: {"manifests": [{"digest": "sha256:" + "0" * 64}]}),
                             "is missing"),
}


@pytest.mark.parametrize("case", sorted(OCI_CASES))
def test_malformed_oci_layout(store, tmp_path, case):
    kw, message = OCI_CASES[case]
    layout = tmp_path / "evil"
    hostile_oci(layout, list(ONE), **kw)
    refused(store, layout, message)


def test_neighbours_of_malformed_input_load(store, tmp_path):
    """What the checks must not refuse: RepoTags null (docker save of an untagged image), JSON 60 levels deep,
    bare ref names that are not tags, an empty annotations object."""
    archive = tmp_path / "untagged.tar"
    docker_save_legacy(archive, [Img(list(ONE), [], config=_config_with(x=json.loads(b"[" * 60 + b"]" * 60)))],
                       mutate=lambda m: m[0].update(RepoTags=None))
    r = run("--root", str(store), "load", str(archive))
    assert r.returncode == 0 and "Loaded image ID: sha256:" in r.stdout, r.stderr
    layout = tmp_path / "layout"
    hostile_oci(layout, [layer_tar([f("b", b"b")])], ref_name="1.0+build")
    r = run("--root", str(store), "load", str(layout), "--tag", "ok:1")
    assert r.returncode == 0, r.stderr


TAR_CASES = {   # layer tar headers: each refused in one line, in both archive forms
    "nul-in-pax-path": ([f("x", b"x", pax={"path": "a\x00b"})], "path 'a\\x00b' holds a NUL byte"),
    "nul-in-pax-linkpath": ([sym("x", "t", pax={"linkpath": "/etc\x00/passwd"})], "holds a NUL byte"),
    "nul-in-hardlink": ([f("t", b"t"), hard("x", "t", pax={"linkpath": "t\x00"})], "holds a NUL byte"),
    "mtime-1e30": ([f("x", b"x", pax={"mtime": "1e30"})], "mtime 1e+30 is out of range"),
    "mtime-nan": ([f("x", b"x", pax={"mtime": "nan"})], "out of range"),
    "uid-2^40": ([f("x", b"x", uid=1 << 40)], "uid 1099511627776 is out of range"),
    "gid-minus-5": ([f("x", b"x", gid=-5)], "gid -5 is out of range"),
    "uid-minus-1": ([f("x", b"x", uid=-1)], "uid -1 is out of range"),
    "deep-5000": ([d("/".join(["a"] * 5000))], "is longer than 4096 bytes"),
    "component-300": ([f("d/" + "n" * 300, b"x")], "a component is longer than 255 bytes"),
    "symlink-target-5000": ([sym("x", "t" * 5000)], "link target"),
    "xattr-name-nul": ([f("x", b"x", pax={"SCHILY.xattr.user.a\x00b": "v"})], "not a valid xattr"),
    "xattr-value-100k": ([f("x", b"x", pax={"SCHILY.xattr.user.big": "v" * 100_000})], "not a valid xattr"),
    "device-major-2^40": ([Entry("dev/x", type=tarfile.CHRTYPE, devmajor=1 << 40, size=0)], "out of range"),
    "gnu-uid-2^40": ([Entry("x", uid=1 << 40, size=0)], "uid 1099511627776 is out of range"),
    "gnu-gid-minus-5": ([Entry("x", gid=-5, size=0)], "gid -5 is out of range"),
    "gnu-mtime-2^60": ([Entry("x", mtime=1 << 60, size=0)], "out of range"),
}


def _pax_bomb() -> bytes:
    """A PAX header claiming 1 GiB: tarfile would read it into memory whole."""
    ti = tarfile.TarInfo("././@PaxHeader")
    ti.type, ti.size = tarfile.XHDTYPE, 1 << 30
    return ti.tobuf(tarfile.USTAR_FORMAT) + b"0" * 1024


@pytest.mark.parametrize("form", ["docker", "oci"])
@pytest.mark.parametrize("case", sorted(TAR_CASES) + ["pax-bomb"])
def test_malformed_layer_header(store, tmp_path, case, form):
    if case == "pax-bomb":
        layer, message = _pax_bomb(), "extended header of 1073741824 bytes"
    else:
        entries, message = TAR_CASES[case]
        layer = layer_tar(entries)
    if form == "docker":
        archive = tmp_path / "evil.tar"
        docker_save_legacy(archive, [Img([layer], ["evil:1"])])
    else:
        archive = tmp_path / "evil"
        hostile_oci(archive, [layer])
    err = refused(store, archive, message)
    assert len(err) < 600, err


def test_deep_nesting_within_bounds_loads_and_mounts(store, tmp_path):
    """2,000 levels (4,000 bytes of path, PATH_MAX's neighbour): extracted without recursion and without
    an fd per level, and the deepest file reads back through the mount."""
    deep = "/".join(["a"] * 2000)
    archive = tmp_path / "deep.tar"
    docker_save_legacy(archive, [Img([layer_tar([d(deep), f(deep[:-2] + "/x", b"deep")])], ["deep:1"])])
    r = run("--root", str(store), "load", str(archive))
    assert r.returncode == 0, r.stderr
    layer = store / "layers" / sha(layer_tar([d(deep), f(deep[:-2] + "/x", b"deep")]))[7:] / "root"
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(1999):
            nfd = os.open("a", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        assert os.read(os.open("x", os.O_RDONLY, dir_fd=fd), 10) == b"deep"
    finally:
        os.close(fd)


@pytest.mark.parametrize("name,message", [
    ("/" + "x" * 10_000, "... (10001 characters)"),
    ("/a\nb", "absolute path '/a\\nb'"),
    ("/a\rb\x1b[2J", "absolute path '/a\\rb\\x1b[2J'"),
])
def test_names_quoted_unambiguously_and_capped(store, tmp_path, name, message):
    archive = tmp_path / "name.tar"
    docker_save_legacy(archive, [Img([layer_tar([f(name, b"x")])], ["evil:1"])])
    err = refused(store, archive, message)
    assert len(err) < 400, len(err)


def test_long_tag_quoted_and_capped(store, tmp_path):
    archive = tmp_path / "tag.tar"
    docker_save_legacy(archive, [Img(list(ONE), ["evil:" + "x" * 10_000])])
    err = refused(store, archive, "invalid tag")
    assert len(err) < 600, len(err)


# --- integrity: blobs are recorded only once checked against their diff_id -------------------------------

def _save(store, out, *fmt):
    r = run("--root", str(store), "save", "good:1", "-o", str(out), *fmt)
    assert r.returncode == 0, r.stderr
    return out


def _tree_bytes(path) -> dict:
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return {"": path.read_bytes()}


@pytest.mark.parametrize("form", ["docker", "oci"])
def test_blob_substitution_refused(store, tmp_path, form):
    """An archive with the stored image's config byte for byte (the same id) but other layer bytes is refused,
    though the diff_id it claims is stored; the original still saves (both formats) byte-identical and
    reloads with the same id."""
    before = {fmt: _tree_bytes(_save(store, tmp_path / f"before-{fmt}", *(["--format", "oci"] if fmt == "oci" else [])))
              for fmt in ("docker", "oci")}
    evil_layer = layer_tar([d("etc"), f("etc/os-release", b"ID=evil\n")])
    cfg = GOOD.config_bytes()
    if form == "docker":
        archive = tmp_path / "evil.tar"
        docker_save_legacy(archive, [Img([evil_layer], ["good:1"], config=cfg)])
    else:
        archive = tmp_path / "evil"
        hostile_oci(archive, [__import__("gzip").compress(evil_layer)], cfg=cfg, ref_name="1")
    refused(store, archive, "does not match the config's diff_id")
    assert run("--root", str(store), "tag", "good:1", "good:2").returncode == 0   # a writer: GC runs
    for fmt in ("docker", "oci"):
        out = _save(store, tmp_path / f"after-{fmt}", *(["--format", "oci"] if fmt == "oci" else []))
        assert _tree_bytes(out) == before[fmt], fmt
        fresh = tmp_path / f"fresh-{fmt}"
        r = run("--root", str(fresh), "load", str(out))
        assert r.returncode == 0, r.stderr
        assert json.loads(run("--root", str(fresh), "inspect", "good:1").stdout)[0]["Id"] == sha(cfg)


def test_reload_of_a_stored_image_keeps_its_record(store, tmp_path):
    """The same image again, with its layer gzip-compressed (other blob, same diff_id): accepted, and the
    stored record (manifest, blobs) is not replaced."""
    rec = next((store / "images").iterdir())
    old = rec.read_bytes()
    layout = tmp_path / "gz"
    hostile_oci(layout, [__import__("gzip").compress(GOOD.layers[0], mtime=0)], cfg=GOOD.config_bytes())
    r = run("--root", str(store), "load", str(layout), "--tag", "good:gz")
    assert r.returncode == 0 and "0 extracted, 1 already" in r.stderr, r.stderr
    assert rec.read_bytes() == old
    tags = json.loads((store / "repositories.json").read_bytes())
    assert tags["good:gz"] == tags["good:1"] == sha(GOOD.config_bytes())


def test_counts_bounded(store, tmp_path):
    """An image of 501 layers, an archive of 1,001 images: refused before any is read."""
    layers = [sha(b"%d" % i) for i in range(501)]
    img = Img(list(ONE), ["evil:1"], config=config(layers))
    archive = tmp_path / "layers.tar"
    docker_save_legacy(archive, [img], mutate=lambda m: m[0].update(Layers=[m[0]["Layers"][0]] * 501))
    refused(store, archive, "501 layers, more than the 500")
    layout = tmp_path / "many"
    hostile_oci(layout, list(ONE), index=lambda i: i.update(manifests=i["manifests"] * 1001))
    refused(store, layout, "1001 manifests, more than 1000")


def test_unknown_image_name_quoted(store):
    for name, message in (("no\nsuch", "unionfs: 'no\\nsuch': invalid repository name 'no\\nsuch'"),
                          ("no-such:x\ty", "unionfs: 'no-such:x\\ty': invalid tag 'x\\ty'"),
                          ("nosuch:1", "unionfs: 'nosuch:1': no such image")):
        r = run("--root", str(store), "inspect", name)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), r.stderr


def test_many_directories_with_few_fds(store, tmp_path):
    """1,500 directories (some replaced by files and back) extract under a limit of 700 open files: the
    extractor keeps at most 512 directory fds, also while it applies modes and whiteouts at the end
    (it used to hold one per directory there: any layer with more directories than the fd limit failed)."""
    import resource
    entries = [d(f"d{i}") for i in range(1500)] + [f(f"d{i}/x", b"x") for i in range(0, 1500, 7)]
    entries += sum(([f(f"d{i}", b"file"), d(f"d{i}")] for i in range(0, 1500, 11)), [])
    archive = tmp_path / "dirs.tar"
    docker_save_legacy(archive, [Img([layer_tar(entries)], ["dirs:1"])])

    def few_fds():
        resource.setrlimit(resource.RLIMIT_NOFILE, (700, 700))
    r = subprocess.run(unionfs_cmd("--root", str(store), "load", str(archive)), capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL, preexec_fn=few_fds)
    assert r.returncode == 0, r.stderr
    root = store / "layers" / sha(layer_tar(entries))[7:] / "root"
    assert len(os.listdir(root)) == 1500 and (root / "d7/x").read_bytes() == b"x"
    assert os.path.isdir(root / "d11") and not os.listdir(root / "d11")


def test_history_cannot_write_escape_sequences(store, tmp_path):
    hist = [{"created_by": "/bin/sh -c \x1b]0;pwned\x07 echo\nhi", "comment": "a\rb\x1b[2J"}]
    archive = tmp_path / "hist.tar"
    docker_save_legacy(archive, [Img(list(ONE), ["hist:1"], history=hist)])
    assert run("--root", str(store), "load", str(archive)).returncode == 0
    out = run("--root", str(store), "history", "hist:1", "--no-trunc").stdout
    assert "\x1b" not in out and "\r" not in out and len(out.splitlines()) == 2, out
    assert "\\x1b]0;pwned\\x07 echo hi" in out and "a\\rb\\x1b[2J" in out, out
