"""What ``load``, ``images``, ``inspect`` and ``history`` show, in Docker's words and units.

Only formatting: it reads the store and changes nothing, and prints nothing itself.
"""
from __future__ import annotations

import datetime as dt
import re

from .load import Loaded
from .model import Image
from .store import Store


def loaded_lines(loaded: Loaded, quiet: bool = False) -> list[tuple[str, bool]]:
    """What ``load`` says of one image: (line, to stderr), as ``docker load`` names what it loaded."""
    out = [(f"Loaded image: {t}", False) for t in loaded.tags]
    if not loaded.tags:
        out.append((f"Loaded image ID: {loaded.image_id}", False))
        if loaded.ref_names:
            out.append((f"unionfs: note: the OCI ref name(s) {', '.join(loaded.ref_names)} name no repository; "
                        "name the image with --tag REPO:TAG", True))
    if not quiet:
        out.append((f"layers: {loaded.new_layers} extracted, {loaded.reused_layers} already in the store", True))
    return out


def human_size(n: int) -> str:
    """Docker's units: decimal, three significant digits (``7.8MB``)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.3g}{unit}" if unit != "B" else f"{int(size)}B"
        size /= 1000
    raise AssertionError


def parse_time(text: str | None) -> dt.datetime | None:
    """RFC 3339 as images carry it (nanoseconds, ``Z`` or an offset); None if absent or unparsable."""
    if not text:
        return None
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$", text.strip())
    if not m:
        return None
    frac = (m.group(2) or ".0")[:7]
    tz = m.group(3) or "Z"
    try:
        return dt.datetime.fromisoformat(m.group(1) + frac + ("+00:00" if tz == "Z" else tz))
    except ValueError:
        return None


def human_ago(text: str | None, now: dt.datetime | None = None) -> str:
    t = parse_time(text)
    if t is None:
        return "N/A"
    now = now or dt.datetime.now(dt.timezone.utc)
    s = int((now - t).total_seconds())
    if s < 0:
        return "in the future"
    if s < 1:
        return "Less than a second ago"
    if s < 60:
        return "1 second ago" if s == 1 else f"{s} seconds ago"
    m = s // 60
    if m == 1:
        return "About a minute ago"
    if m < 60:
        return f"{m} minutes ago"
    h = m // 60
    if h == 1:
        return "About an hour ago"
    if h < 48:
        return f"{h} hours ago"
    d = h // 24
    if d < 14:
        return f"{d} days ago"
    if d < 60:
        return f"{d // 7} weeks ago"
    if d < 365 * 2:
        return f"{d // 30} months ago"
    return f"{d // 365} years ago"


def _printable(cell: str) -> str:
    """A table cell from an image (history, comments) with control characters shown as escapes: an image
    must not send escape sequences to the terminal or break the table into lines."""
    return cell if cell.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in cell)


def table(headers: list[str], rows: list[list[str]]) -> str:
    rows = [[_printable(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["   ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers] + rows]
    return "\n".join(lines)


def images_table(store: Store, no_trunc: bool = False, hide: set[str] = frozenset()) -> str:
    """``hide``: untagged images not to list (a build's intermediate steps, as docker hides them)."""
    tags = store.tags()
    rows = []
    for image_id in store.image_ids():
        if image_id in hide and image_id not in tags.values():
            continue
        img = store.image(image_id)
        short = image_id if no_trunc else image_id[7:19]
        names = sorted(t for t, i in tags.items() if i == image_id) or \
            sorted({rd.split("@")[0] + ":<none>" for rd in img.repo_digests}) or ["<none>:<none>"]
        for name in names:
            repo, _, tag = name.rpartition(":")
            rows.append([repo, tag, short, human_ago(img.config.created), human_size(img.size),
                         img.config.created or ""])
    rows.sort(key=lambda r: (r[5], r[0], r[1]), reverse=True)   # newest first, as docker lists
    return table(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"], [r[:5] for r in rows])


_CONFIG_KEYS = ("Hostname", "Domainname", "User", "AttachStdin", "AttachStdout", "AttachStderr", "ExposedPorts",
                "Tty", "OpenStdin", "StdinOnce", "Env", "Cmd", "Image", "Volumes", "WorkingDir", "Entrypoint",
                "OnBuild", "Labels", "StopSignal")


def inspect(store: Store, img: Image) -> dict:
    """The fields of ``docker image inspect``."""
    c = img.config.config
    config = {k: c.get(k) for k in _CONFIG_KEYS}
    for k in ("Hostname", "Domainname", "User", "WorkingDir", "Image"):
        config[k] = config[k] or ""
    for k in ("AttachStdin", "AttachStdout", "AttachStderr", "Tty", "OpenStdin", "StdinOnce"):
        config[k] = bool(config[k])
    return {
        "Id": img.id,
        "RepoTags": list(img.repo_tags),
        "RepoDigests": list(img.repo_digests),
        "Parent": "",
        "Comment": img.config.history[-1].comment if img.config.history else "",
        "Created": img.config.created or "",
        "Author": img.config.author,
        "Config": config,
        "Architecture": img.config.architecture,
        "Os": img.config.os,
        "Size": img.size,
        "GraphDriver": {"Name": "unionfs",
                        "Data": {"LowerDir": ":".join(store.lower_dirs([ly.diff_id for ly in img.layers]))}},
        "RootFS": {"Type": "layers", "Layers": list(img.config.diff_ids)},
        "Metadata": {"ManifestDigest": img.manifest_digest},
    }


def history_table(img: Image, no_trunc: bool = False) -> str:
    """One row per history entry, newest first; entries without a layer are marked ``<empty>``."""
    rows = []
    layer_iter = iter(zip(img.config.diff_ids, img.layer_sizes))
    entries = list(img.config.history)
    if not entries:  # an image without history: one row per layer
        for diff_id, size in layer_iter:
            rows.append([diff_id[7:19], "N/A", "", human_size(size), ""])
    for h in entries:
        if h.empty_layer:
            layer, size = "<empty>", "0B"
        else:
            diff_id, n = next(layer_iter)
            layer, size = (diff_id if no_trunc else diff_id[7:19]), human_size(n)
        by = h.created_by.replace("\n", " ").replace("\t", " ")
        if not no_trunc and len(by) > 45:
            by = by[:44] + "…"
        rows.append([layer, human_ago(h.created), by, size, h.comment])
    rows.reverse()
    return table(["LAYER", "CREATED", "CREATED BY", "SIZE", "COMMENT"], rows)
