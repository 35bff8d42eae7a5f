"""Images made by the world load and mount exactly as ``umoci unpack`` unpacks them.

The corpus (:mod:`image_corpus`) is made by umoci (repack, insert, insert --opaque,
insert --whiteout, layers that only imply their parents and stop inside the last
file's padding), skopeo (docker-archive, oci and oci-archive; gzip, zstd, none) and
podman (save in its three formats, build --isolation chroot).  Each item is loaded,
mounted and compared with ``umoci unpack`` of the same image (names, types, modes,
owners, sizes, contents, link targets, xattrs, hard-link groups, and the root); pushed
to a real registry and pulled back, and read back by skopeo; run as a container,
committed, saved, and loaded by podman, which must see the committed tree.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from helpers import diff_snapshots, force_unmount, is_mounted, snapshot, unionfs_cmd
from image_corpus import Item, build, layer_tars, reorder, sh, umoci_unpack
from podman_env import HAVE_PODMAN, Podman
from registry_server import Registry, have_registry

pytestmark = pytest.mark.skipif(
    not (HAVE_PODMAN and shutil.which("umoci") and shutil.which("skopeo") and os.path.exists("/bin/busybox")),
    reason="podman, umoci, skopeo and busybox-static are needed (scripts/setup --test installs them)")

ITEMS = ["umoci", "skopeo-docker-archive", "skopeo-oci-zstd", "skopeo-oci-none", "skopeo-oci-archive",
         "podman-save-umoci", "podman-build-docker-archive", "podman-build-oci-archive", "podman-build-oci-dir"]


def run(store: Path, *args: str, timeout: float = 180) -> str:
    r = subprocess.run(unionfs_cmd("--root", str(store), *args), capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-2000:])
    return r.stdout


def tree(root: Path) -> dict:
    """:func:`helpers.snapshot` plus the root directory itself, with hard links as groups only.

    The link count is left out: a lower file one of whose names a higher layer deletes keeps
    its layer's count in a union (as in kernel overlayfs), where an unpacked rootfs counts the
    names left.  The groups (which names share an inode) are compared.
    """
    out = {k: (v[:6] + (None,) + v[7:] if k != "<hardlinks>" else v) for k, v in snapshot(root).items()}
    st = os.lstat(root)
    out["<root>"] = (oct(st.st_mode), st.st_uid, st.st_gid)
    return out


def same(expected: dict, got: dict) -> None:
    diff = diff_snapshots(expected, got)
    assert not diff, "\n".join(diff)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Item]:
    return {i.name: i for i in build(tmp_path_factory.mktemp("corpus"))}


@pytest.fixture(scope="module")
def references(corpus, tmp_path_factory) -> dict[str, dict]:
    base = tmp_path_factory.mktemp("unpacked")
    return {name: tree(umoci_unpack(item.transport, base / name)) for name, item in corpus.items()}


@pytest.fixture
def mounts(tmp_path):
    """Factory: ``view(store, name)`` -> the tree of image (or container) ``name`` mounted; always unmounted."""
    made: list[Path] = []

    def view(store: Path, name: str, writable: bool = False) -> dict:
        mnt = tmp_path / f"mnt{len(made)}"
        mnt.mkdir()
        made.append(mnt)
        run(store, "mount", *(["--writable"] if writable else []), name, str(mnt))
        try:
            return tree(mnt)
        finally:
            run(store, "umount", str(mnt))
    yield view
    for mnt in made:
        if is_mounted(mnt):
            force_unmount(mnt)


def test_umoci_insert_layers_stop_inside_the_padding(corpus):
    """The world check: the layers really are what Go's reader accepts and Python's tarfile refuses."""
    tars = layer_tars(corpus["umoci"].path, "app")
    cut = [t for t in tars if len(t) % 512]
    assert len(cut) >= 3, [len(t) for t in tars]
    for t in cut:
        assert t[-1024:] != bytes(1024)   # no end-of-archive blocks either
        with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
            with tarfile.open(fileobj=io.BytesIO(t), mode="r|") as tf:
                for _ in tf:
                    pass
    # podman save passes them on byte for byte
    with tarfile.open(corpus["podman-save-umoci"].path) as saved:
        blobs = {saved.extractfile(m).read() for m in saved if m.isreg() and m.size < 1 << 20}
    assert all(t in blobs for t in cut)


@pytest.mark.parametrize("name", ITEMS)
def test_loads_and_mounts_as_umoci_unpacks(corpus, references, mounts, tmp_path, name):
    item = corpus[name]
    store = tmp_path / "store"
    run(store, "load", str(item.path), "--tag", item.tag)
    got = mounts(store, item.tag)
    same(references[name], got)
    # What the corpus is for: an implied directory keeps the lower one's owner, mode and xattrs,
    # and one no layer below has is made root 0755.
    assert got["home/app"][1:4] == (0o750, 1000, 1000) and got["home/app"][7] == {"user.who": b"app"}
    assert got["opt/vendor"][1:4] == (0o755, 0, 0)
    assert "etc/gone" not in got and "srv/data/old" not in got
    for layer in (store / "layers").iterdir():
        assert "implied" not in (layer / "layer.json").read_text()


def test_implied_directories_in_every_layer_order(tmp_path, mounts):
    """Three layers that disagree about /home and /home/app, in all six orders: a repack that has
    both for real, an insert of a directory at /home/app (2000:2000 0700, /home implied) and an insert
    of a file into /home/app (both implied)."""
    layout, bundle, src = tmp_path / "oci", tmp_path / "bundle", tmp_path / "src"
    sh("umoci", "init", "--layout", str(layout))
    sh("umoci", "new", "--image", f"{layout}:x")
    sh("umoci", "unpack", "--image", f"{layout}:x", str(bundle))
    app = bundle / "rootfs/home/app"
    app.mkdir(parents=True)
    os.chown(app, 1000, 1000)
    app.chmod(0o750)
    os.setxattr(app, "user.who", b"repack")
    (app.parent).chmod(0o711)
    os.chown(app.parent, 0, 100)
    sh("umoci", "repack", "--image", f"{layout}:x", str(bundle))
    (src / "dir").mkdir(parents=True)
    (src / "dir/inside").write_text("dir")
    os.chown(src / "dir", 2000, 2000)
    (src / "dir").chmod(0o700)
    os.setxattr(src / "dir", "user.who", b"insert")
    sh("umoci", "insert", "--image", f"{layout}:x", str(src / "dir"), "/home/app")
    (src / "file").write_text("file")
    sh("umoci", "insert", "--image", f"{layout}:x", str(src / "file"), "/home/app/file")
    store = tmp_path / "store"
    seen = set()
    for order in itertools.permutations(range(3)):
        tag = "o" + "".join(map(str, order))
        reorder(layout, "x", list(order), tmp_path / tag)
        expected = tree(umoci_unpack(f"oci:{tmp_path / tag}:x", tmp_path / f"unpack-{tag}"))
        run(store, "load", str(tmp_path / tag), "--tag", f"order/{tag}:1")
        same(expected, mounts(store, f"order/{tag}:1"))
        seen.add((expected["home"][1:4], expected["home/app"][1:4]))
    assert len(seen) == 2, seen   # the orders really give different trees (the repack always has /home)


def test_copy_up_of_an_implied_directory_and_no_marker_leaks(corpus, references, tmp_path, mounts):
    """A container changes /home/app (only implied by the top layers): the copy-up takes the real
    directory's attributes; neither the upper dir, diff, commit nor save carries our marker, and
    umoci reads the saved image as the container's tree."""
    item = corpus["umoci"]
    store = tmp_path / "store"
    run(store, "load", str(item.path), "--tag", item.tag)
    run(store, "create", item.tag, "--name", "c")
    mnt = tmp_path / "c"
    mnt.mkdir()
    run(store, "mount", "c", str(mnt))
    try:
        (mnt / "home/app/new").write_text("new")
        (mnt / "opt/vendor/bin/added").write_text("added")
        st = os.stat(mnt / "home/app")
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 1000, 1000)
        assert os.getxattr(mnt / "home/app", "user.who") == b"app"
        view = tree(mnt)
    finally:
        run(store, "umount", str(mnt))
    (cid,) = [p.name for p in (store / "containers").iterdir()]
    upper = store / "containers" / cid / "upper"
    st = os.lstat(upper / "home/app")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 1000, 1000)
    assert not [x for x in os.listxattr(upper / "home/app") + os.listxattr(upper / "opt/vendor") if "implied" in x]
    assert run(store, "diff", "c") == "C /home\nC /home/app\nA /home/app/new\nC /opt\nC /opt/vendor\n" \
                                      "C /opt/vendor/bin\nA /opt/vendor/bin/added\n"
    run(store, "commit", "c", "corpus/committed:1")
    same(view, mounts(store, "corpus/committed:1"))
    saved = tmp_path / "saved.tar"
    run(store, "save", "corpus/committed:1", "-o", str(saved))
    with tarfile.open(saved) as outer:
        for m in outer:
            if m.name.endswith(".tar"):
                data = outer.extractfile(m).read()
                data += bytes(-len(data) % 512 + 1024)   # umoci's layers, byte for byte: stdlib tarfile wants padding
                with tarfile.open(fileobj=io.BytesIO(data)) as layer:
                    for e in layer:
                        assert not any("unionfs" in k or "overlay" in k for k in e.pax_headers), (e.name, e.pax_headers)
    same(view, tree(umoci_unpack(f"docker-archive:{saved}", tmp_path / "unpacked")))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    if not have_registry():
        pytest.skip("docker-registry is needed (scripts/setup --test installs it)")
    with Registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.mark.parametrize("name", ITEMS)
def test_push_pull_and_skopeo_reads_it(corpus, references, registry, mounts, tmp_path, name):
    item = corpus[name]
    src, dst = tmp_path / "src", tmp_path / "dst"
    run(src, "load", str(item.path), "--tag", item.tag)
    ref = f"{registry.host}/{item.tag}"
    run(src, "push", item.tag, ref, "--insecure")
    run(dst, "pull", ref, "--insecure")
    same(references[name], mounts(dst, ref))
    layout = tmp_path / "copied"
    sh("skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:x")
    same(references[name], tree(umoci_unpack(f"oci:{layout}:x", tmp_path / "unpacked")))


@pytest.mark.skipif(not (shutil.which("crun") or shutil.which("runc")), reason="crun is needed")
@pytest.mark.parametrize("name", ["umoci", "podman-build-docker-archive"])
def test_run_commit_save_and_podman_loads_it(corpus, mounts, tmp_path, name):
    item = corpus[name]
    store = tmp_path / "store"
    run(store, "load", str(item.path), "--tag", item.tag)
    out = run(store, "run", "--name", "c", item.tag, "sh", "-c",
              "echo ran > /home/app/ran && chown 1000:1000 /home/app/ran && mkdir -p /opt/vendor/etc && "
              "rm /bin/touch && cat /home/app/notes")
    assert out == "inserted into an existing directory\n"
    run(store, "commit", "c", "corpus/ran:1")
    expected = mounts(store, "corpus/ran:1")
    assert expected["home/app/ran"][2:4] == (1000, 1000) and "bin/touch" not in expected
    assert expected["home/app"][1:4] == (0o750, 1000, 1000)
    saved = tmp_path / "ran.tar"
    run(store, "save", "corpus/ran:1", "-o", str(saved))
    pm = Podman(tmp_path / "podman")
    try:
        pm.run("load", "-q", "-i", str(saved))
        info = json.loads(pm.run("image", "inspect", "corpus/ran:1"))[0]
        ours = json.loads(run(store, "inspect", "corpus/ran:1"))[0]
        assert info["Id"] == ours["Id"].split(":", 1)[1] and info["RootFS"]["Layers"] == ours["RootFS"]["Layers"]
        back = tmp_path / "podman-saved.tar"
        pm.run("save", "-q", "--format", "oci-archive", "-o", str(back), "corpus/ran:1")
    finally:
        pm.close()
    same(expected, tree(umoci_unpack(f"oci-archive:{back}", tmp_path / "unpacked")))


def test_implied_opaque_and_recreated_directories(tmp_path, mounts):
    """Layers no tool here writes but the spec allows, with umoci unpack as the judge: an opaque
    marker in a directory the layer only implies (the directory stays, with its attributes, its old
    contents go), and a whiteout of a directory the same layer then implies anew."""
    from image_archives import Img, d, f, layer_tar, oci_layout
    base = layer_tar([d("srv"), d("srv/data", 0o2775, gid=50, pax={"SCHILY.xattr.user.who": "base"}),
                      f("srv/data/old", b"old"), d("home"), d("home/app", 0o750, uid=1000, gid=1000),
                      f("home/app/old", b"old")])
    top = layer_tar([f("srv/data/.wh..wh..opq"), f("srv/data/new", b"new"),
                     f("home/.wh.app"), f("home/app/fresh", b"fresh")], end_blocks=False)
    layout = tmp_path / "oci"
    oci_layout(layout, [Img([base, top], ["x"], compression="gzip")])
    expected = tree(umoci_unpack(f"oci:{layout}:x", tmp_path / "unpacked"))
    assert expected["srv/data"][1:4] == (0o2775, 0, 50) and "srv/data/old" not in expected
    assert expected["home/app"][1:4] == (0o755, 0, 0) and "home/app/old" not in expected
    store = tmp_path / "store"
    run(store, "load", str(layout), "--tag", "spec/x:1")
    same(expected, mounts(store, "spec/x:1"))
