"""Lazy images, beyond the first read: a fetch in flight holds up nothing else, prefetch landmarks and
recorded prefetch lists order the fill, ``images``/``ps``/``inspect`` show how much is local, and
``push``/``save`` of an image not yet local say how to fill it.  Against the real registry on loopback,
through a proxy that holds a download in flight; the image made by umoci."""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import threading
import time

import pytest

from helpers import diff_snapshots, is_mounted, snapshot
from registry_server import CuttingProxy, Registry, have_registry
from test_image_interop import umoci_image  # noqa: F401  (the module-scoped fixture)
from test_registry_interop import sh
from test_registry_pull_push import ok, run

from unionfs.image import estargz, seekable

pytestmark = pytest.mark.skipif(not (have_registry() and shutil.which("umoci") and shutil.which("skopeo")),
                                reason="docker-registry, umoci and skopeo are needed (scripts/setup --test)")


@pytest.fixture
def esgz_src(tmp_path, umoci_image):  # noqa: F811
    """A store with the umoci image converted to eStargz (16 KiB chunks, so liba.so is 5 chunks); umoci's
    layout of it beside, as ``umoci``."""
    layout, _, docker_archive, _ = umoci_image
    src = tmp_path / "src"
    ok(run(tmp_path, "--root", str(src), "load", str(docker_archive)))
    ok(run(tmp_path, "--root", str(src), "convert", "--estargz", "--chunk-size", "16384",
           "interop/app:docker", "lazy/app:esgz"))
    shutil.copytree(layout, src / "umoci")
    return src


def _layer_of(ref: str, name: str, lazy) -> tuple[str, list]:
    """(blob digest, chunks) of the layer whose TOC has ``name`` as a regular file with content
    (for a layer served through an index: the spans, as [] ; the file table names it)."""
    for p in (lazy / "layers").iterdir():
        if (p / "lazy.toc").exists():
            for e in estargz.parse_toc((p / "lazy.toc").read_bytes(), "t"):
                if e.name == name and e.chunks:
                    return json.loads((p / "lazy.json").read_text())["digest"], e.chunks
        if (p / "lazy.index").exists():
            ix = seekable.decode((p / "lazy.index").read_bytes(), "t")
            if any(m.info.name.lstrip("./") == name and m.info.size for m in ix.members):
                return ix.layer, []
    raise AssertionError(f"{name} in no lazy layer of {ref}")


# the lazy kinds: eStargz as we convert it, or umoci's own gzip layers (pushed by skopeo) with a pushed index
KINDS = ["estargz", "gzip+index"]


def _pushed(tmp_path, src, ref: str, kind: str) -> None:
    if kind == "estargz":
        ok(run(tmp_path, "--root", str(src), "push", "lazy/app:esgz", ref, "--insecure"))
        return
    sh("skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{src / 'umoci'}:app", f"docker://{ref}")
    # small checkpoint spacing and spans: the layers here are small
    ok(run(tmp_path, "index", "--push", "--spacing", "65536", "--span", "4096", ref, "--insecure"))


def _pulled_through(proxy: CuttingProxy, tmp_path, src, kind: str = "estargz"):
    """(reference, lazy store, an empty mount point): the image pushed and pulled --lazy via ``proxy``."""
    ref, lazy, mnt = f"{proxy.host}/lazy/app:1", tmp_path / "lazy", tmp_path / "mnt"
    _pushed(tmp_path, src, ref, kind)
    r = ok(run(tmp_path, "--root", str(lazy), "pull", "--lazy", "--whole-below", "0", ref, "--insecure"))
    assert "0 pulled whole" in r.stderr, r.stderr
    mnt.mkdir()
    return ref, lazy, mnt


@pytest.mark.parametrize("kind", KINDS)
def test_a_fetch_in_flight_holds_up_nothing_else(tmp_path, esgz_src, kind):
    """While one read's chunk (or span) download is held in flight: stat, listing and reads of local content
    through the same mount answer; a second read of the same file waits for that fetch; no range is fetched
    twice.  For an eStargz layer and for a plain gzip layer served through its index."""
    with Registry(tmp_path / "reg") as reg, CuttingProxy(reg.port) as proxy:
        ref, lazy, mnt = _pulled_through(proxy, tmp_path, esgz_src, kind)
        digest, chunks = _layer_of(ref, "usr/lib/liba.so", lazy)
        assert len(chunks) == (5 if kind == "estargz" else 0)
        ok(run(tmp_path, "--root", str(lazy), "mount", "--no-fill", ref, str(mnt), "--log", str(tmp_path / "d.log")))
        try:
            assert (mnt / "etc/hosts").read_bytes() == b"10.0.0.1 app\n"   # now local
            proxy.hold_digest = digest
            got: dict[str, bytes] = {}
            done = {k: threading.Event() for k in ("first", "second")}

            def reader(key: str) -> None:
                try:
                    got[key] = (mnt / "usr/lib/liba.so").read_bytes()
                finally:
                    done[key].set()
            first = threading.Thread(target=reader, args=("first",), daemon=True)
            first.start()
            assert proxy.held.wait(60), "the read never reached the registry"
            second = threading.Thread(target=reader, args=("second",), daemon=True)
            second.start()
            # the download is in flight: the rest of the mount answers meanwhile
            assert (mnt / "usr/lib/liba.so").stat().st_size == 70000
            assert "liba.so" in {p.name for p in (mnt / "usr/lib").iterdir()}
            assert (mnt / "etc/hosts").read_bytes() == b"10.0.0.1 app\n"
            assert not done["first"].is_set() and not done["second"].is_set()
            proxy.release.set()
            first.join(60)
            second.join(60)
            assert got == {"first": b"a" * 70000, "second": b"a" * 70000}
        finally:
            proxy.release.set()
            print((tmp_path / "d.log").read_text())
            ok(run(tmp_path, "umount", str(mnt)))
            assert not is_mounted(mnt)
        ranges = [rng for d, rng in proxy.blob_gets() if d == digest]
        if kind == "estargz":
            wanted = {f"bytes={c.offset}-" for c in chunks}
            hits = [r for r in ranges if r and any(r.startswith(w) for w in wanted)]
            assert len(hits) == len(set(hits)) == 5, ranges   # every chunk once, though two reads wanted it
        else:   # spans: no byte of the blob requested twice, though two reads wanted them
            spans = sorted(tuple(int(x) for x in r[len("bytes="):].split("-")) for r in ranges if r)
            assert spans and all(a[1] < b[0] for a, b in zip(spans, spans[1:])), ranges


@pytest.mark.parametrize("kind", KINDS)
def test_local_share_shown_and_save_fetches_the_rest(tmp_path, esgz_src, kind):
    """images, ps and inspect show how much of each lazy layer is local; save of a lazy image fetches the rest
    first (a line per layer), after which the layers are ordinary; with the registry gone it is one line, exit 2,
    naming the way out, and the store keeps what it had.  For eStargz layers and gzip layers with an index."""
    lazy = tmp_path / "lazy"
    with Registry(tmp_path / "reg") as reg:
        ref = f"{reg.host}/lazy/app:1"
        _pushed(tmp_path, esgz_src, ref, kind)
        ok(run(tmp_path, "--root", str(lazy), "pull", "--lazy", "--whole-below", "0", ref, "--insecure"))
        layers = [p for p in (lazy / "layers").iterdir() if (p / "lazy.json").exists()]
        assert len(layers) == 4
        report = ok(run(tmp_path, "--root", str(lazy), "images")).stdout
        assert report.count("bytes local (") == 4, report
        (info,) = json.loads(ok(run(tmp_path, "--root", str(lazy), "inspect", ref)).stdout)
        assert len(info["LazyLayers"]) == 4
        # eStargz: the TOC and footer are local from the start; an index is no part of the blob
        low = 0 if kind == "estargz" else -1
        assert all(low < x["LocalBytes"] < x["Size"] and x["LocalPercent"] < 100 for x in info["LazyLayers"]), info
        cid = ok(run(tmp_path, "--root", str(lazy), "create", ref)).stdout.strip()
        ps = ok(run(tmp_path, "--root", str(lazy), "ps", "-a")).stdout
        lazy_rows = [x for x in ps.splitlines() if "bytes local (" in x]
        assert len(lazy_rows) == 4 and all(x.startswith(cid[:12]) for x in lazy_rows), ps
        ok(run(tmp_path, "--root", str(lazy), "rm", cid))

        reg.stop()
        r = run(tmp_path, "--root", str(lazy), "save", "-o", str(tmp_path / "out.tar"), ref)
        assert r.returncode == 2, r.stderr
        errs = [x for x in r.stderr.splitlines() if x.startswith("unionfs:")]
        assert len(errs) == 1 and "not all local" in errs[0] and "unionfs pull" in errs[0], r.stderr
        assert all((p / "lazy.json").exists() for p in layers) and not (tmp_path / "out.tar").exists()

        reg.start()
        if kind == "gzip+index":   # one file read: its spans count, and only they
            mnt = tmp_path / "mnt"
            mnt.mkdir()
            ok(run(tmp_path, "--root", str(lazy), "mount", "--no-fill", ref, str(mnt)))
            try:
                assert (mnt / "usr/lib/liba.so").read_bytes() == b"a" * 70000
            finally:
                ok(run(tmp_path, "umount", str(mnt)))
            (info,) = json.loads(ok(run(tmp_path, "--root", str(lazy), "inspect", ref)).stdout)
            assert sum(x["LocalBytes"] > 0 for x in info["LazyLayers"]) == 1, info
        r = ok(run(tmp_path, "--root", str(lazy), "save", "-o", str(tmp_path / "out.tar"), ref))
        assert r.stderr.count("fetching the rest") == 4 and r.stderr.count(": complete") == 4, r.stderr
    assert all((p / "lazy.done").exists() and not (p / "lazy.json").exists() for p in layers)
    assert "bytes local" not in ok(run(tmp_path, "--root", str(lazy), "images")).stdout
    (info,) = json.loads(ok(run(tmp_path, "--root", str(lazy), "inspect", ref)).stdout)
    assert "LazyLayers" not in info
    # an outside reader takes the archive: skopeo copies every layer out of it, digests checked
    sh("skopeo", "copy", "-q", f"docker-archive:{tmp_path / 'out.tar'}", f"oci:{tmp_path / 'back'}:c")
    manifest = json.loads(sh("skopeo", "inspect", "--raw", f"oci:{tmp_path / 'back'}:c"))
    assert len(manifest["layers"]) == 4


@pytest.mark.skipif(not os.path.exists("/bin/busybox") or not (shutil.which("crun") or shutil.which("runc")),
                    reason="busybox-static and crun or runc are needed")
def test_record_prefetch_orders_the_estargz_layer_and_the_fill(tmp_path):
    """run --record-prefetch notes what the run read, in order; convert --estargz writes those files first and
    then .prefetch.landmark (umoci unpacks the result to the same tree); a lazy mount of the pushed image fetches
    the landmark's files before anything else, ahead of the recorded access order; a recorded list of the lazy
    store's own goes first too."""
    from container_images import busybox_image
    from registry_server import Registry
    from test_registry_interop import registry_rootfs
    from unionfs.image import prefetch
    from unionfs.image.store import Store
    from unionfs.registry.lazy import fill_for
    src, lazy = tmp_path / "src", tmp_path / "lazy"
    busybox_image(tmp_path / "bb.tar", "bb:1")
    ok(run(tmp_path, "--root", str(src), "load", str(tmp_path / "bb.tar")))
    r = ok(run(tmp_path, "--root", str(src), "run", "--rm", "--user", "0", "--record-prefetch", "bb:1",
               "cat", "/etc/group"))
    assert r.stdout.startswith("root:x:0:")
    image_id = Store(str(src)).resolve("bb:1")
    recorded = prefetch.load(Store(str(src)), image_id)
    # the user lookup reads passwd and group, then the command's binary runs and reads group again
    assert {"bin/busybox", "etc/group"} <= set(recorded) and len(recorded) == len(set(recorded)), recorded
    ok(run(tmp_path, "--root", str(src), "convert", "--estargz", "--chunk-size", "65536", "bb:1", "bb:esgz"))
    store = Store(str(src))
    (layer,) = store.image(store.resolve("bb:esgz")).layers
    with tarfile.open(store.blob_path(layer.digest)) as t:
        names = [m.name for m in t.getmembers()]
    regs = [n for n in names if n in recorded]
    at = names.index(estargz.PREFETCH_LANDMARK)
    assert regs == recorded and all(names.index(n) < at for n in regs), names
    assert names[-1] == estargz.TOC_NAME
    assert prefetch.load(store, store.resolve("bb:esgz")) == recorded   # the copy keeps the list
    with Registry(tmp_path / "reg") as reg, CuttingProxy(reg.port) as proxy:
        ref = f"{proxy.host}/lazy/bb:1"
        ok(run(tmp_path, "--root", str(src), "push", "bb:esgz", ref, "--insecure"))
        want = registry_rootfs(f"{reg.host}/lazy/bb:1", tmp_path)   # outside tools: skopeo copies, umoci unpacks
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        ok(run(tmp_path, "--root", str(src), "mount", "bb:1", str(mnt)))
        try:
            original = snapshot(mnt)
        finally:
            ok(run(tmp_path, "umount", str(mnt)))
        extra = {estargz.TOC_NAME, estargz.PREFETCH_LANDMARK}
        assert not diff_snapshots({k: v for k, v in want.items() if k not in extra}, original)

        ok(run(tmp_path, "--root", str(lazy), "pull", "--lazy", "--whole-below", "0", ref, "--insecure"))
        (ldir,) = [p for p in (lazy / "layers").iterdir() if (p / "lazy.json").exists()]
        toc = {e.name: e for e in estargz.parse_toc((ldir / "lazy.toc").read_bytes(), "t")}
        (ldir / "lazy-access").write_text('"etc/passwd"\n')   # an earlier mount's reads: after the landmark's files
        before = len(proxy.blob_gets())
        ok(run(tmp_path, "--root", str(lazy), "mount", ref, str(mnt), "--log", str(tmp_path / "d.log")))
        try:
            deadline = time.monotonic() + 120   # a bound on waiting, not a measurement
            while (ldir / "lazy.json").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert (ldir / "lazy.done").exists(), (tmp_path / "d.log").read_text()
        finally:
            ok(run(tmp_path, "umount", str(mnt)))
        starts = [int(rng[len("bytes="):].split("-")[0]) for _, rng in proxy.blob_gets()[before:] if rng]
        first = [c.offset for n in recorded for c in toc[n].chunks]
        assert starts[:len(first)] == first, (starts, first)

    # a recorded list of the lazy store's own (run --record-prefetch --lazy) orders the fill too
    lstore = Store(str(lazy))
    lid = lstore.resolve(ref)
    (ldir / "lazy.done").rename(ldir / "lazy.json")   # lazy again, for the hook's choice alone
    prefetch.save(lstore, lid, ["etc/passwd", "bin/busybox"])
    fill = fill_for(lstore, lstore.image(lid).config.diff_ids, lid)
    fill._index()
    assert fill._layers[0].prefetch == ["etc/passwd", "bin/busybox"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_copy_up_fetching_holds_up_nothing_else(tmp_path, esgz_src, kind):
    """A --writable mount: appending to a lazy file copies it up whole; while its fetch is held in flight, the
    rest of the mount answers; then the copy-up completes with the verified content (either lazy kind)."""
    with Registry(tmp_path / "reg") as reg, CuttingProxy(reg.port) as proxy:
        ref, lazy, mnt = _pulled_through(proxy, tmp_path, esgz_src, kind)
        digest, _ = _layer_of(ref, "usr/lib/liba.so", lazy)
        ok(run(tmp_path, "--root", str(lazy), "mount", "--writable", "--no-fill", ref, str(mnt),
               "--log", str(tmp_path / "d.log")))
        try:
            assert (mnt / "etc/hosts").read_bytes() == b"10.0.0.1 app\n"
            proxy.hold_digest = digest
            done = threading.Event()

            def append() -> None:
                try:
                    with open(mnt / "usr/lib/liba.so", "ab") as f:
                        f.write(b"x")
                finally:
                    done.set()
            writer = threading.Thread(target=append, daemon=True)
            writer.start()
            assert proxy.held.wait(60), "the copy-up never reached the registry"
            assert (mnt / "etc/hosts").read_bytes() == b"10.0.0.1 app\n"
            assert (mnt / "usr/lib").is_dir() and (mnt / "usr/lib/liba.so").stat().st_size == 70000
            assert not done.is_set()
            proxy.release.set()
            writer.join(60)
            assert (mnt / "usr/lib/liba.so").read_bytes() == b"a" * 70000 + b"x"
        finally:
            proxy.release.set()
            print((tmp_path / "d.log").read_text())
            ok(run(tmp_path, "umount", str(mnt)))
            assert not is_mounted(mnt)
